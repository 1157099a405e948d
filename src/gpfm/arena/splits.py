"""Patient-level, class-stratified, seeded train/val/test splits: the one split generator of the arena.

Every protocol works on a *samples table*: one row per sample with columns `sample_id`, `case_id` (the patient:
all of a patient's samples always land in one partition), optional `stratum` (class label, or event status for
survival; partitions keep each stratum's share), optional `cohort` ("internal" / "external") and optional
`split` (an official train/val/test assignment). Protocols (`split: {protocol: ..., ...}` in a task spec):

- `holdout`      one train/val/test split, `ratios` [0.7, 0.1, 0.2] (paper's splits712; test CIs by bootstrap).
- `monte_carlo`  `k` (10) independent stratified splits at `ratios` [0.8, 0.1, 0.1] (paper's splits/).
- `kfold`        `k` (5) folds: each fold is the test set once; the validation set is carved from the training
                 part (`val_fraction` 0.1 of its cases), never the test fold (GPFM-METHOD R3).
- `csv`          a user split file (`path`, may contain {fold}): long format (`sample_id`|`slide_id`|`case_id`,
                 `split` in train/val/test, optional `fold`) or CLAM wide format (columns train, val, test).
                 No val, or `ignore_val: true`: val carved from train (`val_fraction`).
- `official`     the `split` column of the samples (ROI sets). No test split: the official val becomes the test
                 set; no (remaining) val: carved from train - so validation never equals test.
- `external`     train/val from the internal cohort (`val_fraction`, `k` repeats with different val carves),
                 test = every sample of the external cohort.

`check_no_leakage` asserts that no case_id is in two partitions; the runner calls it on every split it uses.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gpfm.io import GpfmError, write_text

log = logging.getLogger("gpfm.arena")
PARTITIONS = ("train", "val", "test")
PROTOCOLS: dict[str, dict[str, Any]] = {  # protocol -> its settings and their defaults
    "holdout": {"ratios": [0.7, 0.1, 0.2]},
    "monte_carlo": {"k": 10, "ratios": [0.8, 0.1, 0.1]},
    "kfold": {"k": 5, "val_fraction": 0.1},
    "csv": {"path": None, "val_fraction": 0.1, "ignore_val": False},
    "official": {"val_fraction": 0.1},
    "external": {"k": 1, "val_fraction": 0.1},
}


@dataclass(frozen=True)
class Split:
    """One fold: sample ids per partition (sorted, so equal splits compare equal)."""

    fold: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def partitions(self) -> dict[str, tuple[str, ...]]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def restrict(self, keep: Iterable[str]) -> Split:
        """The same split without the samples not in `keep` (e.g. slides without features for one encoder)."""
        keep = set(keep)
        return Split(self.fold, *(tuple(s for s in ids if s in keep) for ids in (self.train, self.val, self.test)))

    @property
    def sizes(self) -> dict[str, int]:
        return {f"n_{k}": len(v) for k, v in self.partitions().items()}


def _split(fold: int, parts: Mapping[str, Iterable[str]]) -> Split:
    return Split(fold, *(tuple(sorted(map(str, parts.get(p, ())))) for p in PARTITIONS))


# ------------------------------------------------------------------------------------------ validation
def validate_split_spec(spec: Mapping[str, Any], where: str = "split") -> None:
    """Check protocol name and setting keys (empty spec: the handler's default protocol is used)."""
    if not spec:
        return
    proto = spec.get("protocol")
    if proto not in PROTOCOLS:
        raise GpfmError(f"{where}: split.protocol must be one of {', '.join(PROTOCOLS)} (got {proto!r})")
    bad = sorted(set(spec) - {"protocol"} - set(PROTOCOLS[proto]))
    if bad:
        raise GpfmError(f"{where}: unknown split setting '{bad[0]}' for protocol {proto} "
                        f"(valid: {', '.join(PROTOCOLS[proto])})")
    if proto == "csv" and not spec.get("path"):
        raise GpfmError(f"{where}: split protocol csv needs 'path' (a split CSV, relative to the spec file)")
    if "ratios" in spec:
        r = spec["ratios"]
        if not (isinstance(r, list | tuple) and len(r) == 3 and all(float(x) >= 0 for x in r)
                and abs(sum(map(float, r)) - 1) < 1e-6 and float(r[0]) > 0 and float(r[2]) > 0):
            raise GpfmError(f"{where}: split.ratios must be three non-negative numbers (train, val, test) "
                            f"summing to 1 with train and test > 0 (got {r!r})")
    if "k" in spec and (not isinstance(spec["k"], int) or spec["k"] < 1):
        raise GpfmError(f"{where}: split.k must be a positive integer (got {spec['k']!r})")
    if "val_fraction" in spec and not 0 <= float(spec["val_fraction"]) < 1:
        raise GpfmError(f"{where}: split.val_fraction must lie in [0, 1) (got {spec['val_fraction']!r})")


def _cases(samples: pd.DataFrame) -> pd.DataFrame:
    """One row per case: case_id and its stratum (the most frequent stratum among its samples)."""
    for col in ("sample_id", "case_id"):
        if col not in samples.columns:
            raise GpfmError(f"splits: samples table needs a '{col}' column")
    if samples["sample_id"].duplicated().any():
        raise GpfmError(f"splits: sample_id {samples['sample_id'][samples['sample_id'].duplicated()].iloc[0]!r} "
                        "appears twice; sample ids must be unique")
    strat = samples["stratum"].astype(str) if "stratum" in samples.columns else pd.Series("all", samples.index)
    df = pd.DataFrame({"case_id": samples["case_id"].astype(str), "stratum": strat})
    mode = df.groupby("case_id", sort=True)["stratum"].agg(lambda s: s.value_counts().sort_index().idxmax())
    return mode.reset_index()


def _allocate(n: int, fractions: list[float], stratum: str, need: str) -> list[int]:
    """Integer sizes summing to n, near n * fractions, at least 1 for every non-zero fraction."""
    want = [i for i, f in enumerate(fractions) if f > 0]
    if n < len(want):
        raise GpfmError(f"class '{stratum}' has {n} case(s) but {need} needs at least {len(want)} "
                        f"(one per partition); merge or drop the class, or use fewer folds")
    exact = np.array(fractions, float) * n
    sizes = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - sizes), kind="stable")[: n - sizes.sum()]:
        sizes[i] += 1
    for i in want:
        if sizes[i] == 0:
            sizes[int(np.argmax(sizes))] -= 1
            sizes[i] = 1
    return sizes.tolist()


def _stratified(cases: pd.DataFrame, fractions: list[float], rng: np.random.Generator, need: str
                ) -> list[list[str]]:
    """Partition case ids by `fractions`, class by class (strata in sorted order, cases shuffled by `rng`)."""
    parts: list[list[str]] = [[] for _ in fractions]
    for stratum, grp in cases.groupby("stratum", sort=True):
        ids = grp["case_id"].to_numpy()[rng.permutation(len(grp))]
        start = 0
        for p, size in enumerate(_allocate(len(ids), fractions, str(stratum), need)):
            parts[p].extend(ids[start:start + size])
            start += size
    return parts


def _to_split(fold: int, samples: pd.DataFrame, case_parts: Mapping[str, Iterable[str]],
              where: str = "split") -> Split:
    part_of: dict[str, str] = {}
    for p, ids in case_parts.items():
        for c in ids:
            if part_of.setdefault(c, p) != p:
                raise GpfmError(f"{where}: fold {fold}: case {c!r} is in both {part_of[c]} and {p} "
                                "(patient-level leakage)")
    part = samples["case_id"].astype(str).map(part_of)
    return _split(fold, {p: samples.loc[part == p, "sample_id"] for p in PARTITIONS})


def _rng(seed: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, *more])


# -------------------------------------------------------------------------------------------- protocols
def monte_carlo_splits(samples: pd.DataFrame, k: int = 10, ratios: tuple | list = (0.8, 0.1, 0.1),
                       seed: int = 0) -> list[Split]:
    """k independent stratified, patient-level train/val/test splits at `ratios`."""
    cases = _cases(samples)
    need = f"a {':'.join(f'{r:g}' for r in ratios)} split"
    return [_to_split(i, samples, dict(zip(PARTITIONS, _stratified(cases, list(ratios), _rng(seed, i), need))))
            for i in range(k)]


def holdout_split(samples: pd.DataFrame, ratios: tuple | list = (0.7, 0.1, 0.2), seed: int = 0) -> list[Split]:
    """One stratified, patient-level train/val/test split (default 7:1:2)."""
    return monte_carlo_splits(samples, 1, ratios, seed)


def _carve_val(cases: pd.DataFrame, train_cases: Iterable[str], val_fraction: float,
               rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Split training cases into (train, val), stratified; val_fraction 0 -> no validation set."""
    sub = cases[cases["case_id"].isin(set(train_cases))]
    if val_fraction <= 0:
        return sub["case_id"].tolist(), []
    train, val = _stratified(sub, [1 - val_fraction, val_fraction], rng, "the validation carve")
    return train, val


def kfold_splits(samples: pd.DataFrame, k: int = 5, val_fraction: float = 0.1, seed: int = 0) -> list[Split]:
    """Stratified patient-level k-fold CV; each fold's validation set comes from its training part only."""
    cases = _cases(samples)
    rng = _rng(seed)
    fold_of: dict[str, int] = {}
    for stratum, grp in cases.groupby("stratum", sort=True):
        if len(grp) < k:
            raise GpfmError(f"class '{stratum}' has {len(grp)} case(s) but {k}-fold cross-validation needs "
                            f"at least {k}; use fewer folds or merge the class")
        ids = grp["case_id"].to_numpy()[rng.permutation(len(grp))]
        offset = int(rng.integers(k))  # so small classes do not all fill fold 0 first
        fold_of.update({c: (j + offset) % k for j, c in enumerate(ids)})
    out = []
    for i in range(k):
        test = [c for c, f in fold_of.items() if f == i]
        train, val = _carve_val(cases, (c for c, f in fold_of.items() if f != i), val_fraction, _rng(seed, i, 1))
        out.append(_to_split(i, samples, {"train": train, "val": val, "test": test}))
    return out


def official_split(samples: pd.DataFrame, val_fraction: float = 0.1, seed: int = 0) -> list[Split]:
    """The samples' own `split` column; missing test -> official val is the test set; missing val -> carved."""
    if "split" not in samples.columns:
        raise GpfmError("split protocol 'official' needs a split column (train/val/test) in the data")
    part = samples["split"].astype(str).str.lower().replace({"valid": "val", "validation": "val"})
    bad = sorted(set(part) - set(PARTITIONS))
    if bad:
        raise GpfmError(f"official split: unknown split value '{bad[0]}' (use train, val or test)")
    if "test" not in set(part):
        part = part.replace({"val": "test"})
    cases = _cases(samples)
    parts = {p: samples.loc[part == p, "case_id"].astype(str).unique().tolist() for p in PARTITIONS}
    if not parts["val"]:
        parts["train"], parts["val"] = _carve_val(cases, parts["train"], val_fraction or 0.1, _rng(seed))
    return [_to_split(0, samples, parts)]


def external_split(samples: pd.DataFrame, k: int = 1, val_fraction: float = 0.1, seed: int = 0) -> list[Split]:
    """Train/val on the internal cohort, test on all of the external cohort (k val carves)."""
    if "cohort" not in samples.columns or not (samples["cohort"] == "external").any():
        raise GpfmError("split protocol 'external' needs an external cohort: add 'external: {labels: ...}' "
                        "to the task spec")
    internal = samples[samples["cohort"] != "external"]
    ext_cases = samples.loc[samples["cohort"] == "external", "case_id"].astype(str).unique().tolist()
    cases = _cases(internal)
    out = []
    for i in range(k):
        train, val = _carve_val(cases, cases["case_id"], val_fraction, _rng(seed, i))
        out.append(_to_split(i, samples, {"train": train, "val": val, "test": ext_cases}))
    return out


def csv_splits(path: str | Path, samples: pd.DataFrame, val_fraction: float = 0.1, ignore_val: bool = False,
               seed: int = 0) -> list[Split]:
    """Splits from user CSV file(s): long or CLAM wide format; `{fold}` in the path reads fold 0, 1, ..."""
    path = str(path)
    files = [Path(path)]
    if "{fold}" in path:
        files = []
        while Path(path.format(fold=len(files))).is_file():
            files.append(Path(path.format(fold=len(files))))
    if not files or not files[0].is_file():
        raise GpfmError(f"split file {path} not found; fix split.path (relative to the spec file)")
    frames: list[tuple[int, Path, pd.DataFrame]] = []
    for f in files:
        df = pd.read_csv(f, dtype=str)
        if {"train", "val", "test"} & set(df.columns) and "split" not in df.columns:  # CLAM wide format
            df = pd.DataFrame([(v, p) for p in PARTITIONS if p in df.columns for v in df[p].dropna()],
                              columns=["id", "split"])
        else:
            idcol = next((c for c in ("sample_id", "slide_id", "case_id") if c in df.columns), None)
            if idcol is None or "split" not in df.columns:
                raise GpfmError(f"{f}: a split CSV needs 'split' and one of sample_id/slide_id/case_id columns, "
                                f"or CLAM columns train,val,test (has: {', '.join(df.columns)})")
            df = df.rename(columns={idcol: "id"})
        if "fold" in df.columns and len(files) == 1:
            frames += [(int(k), f, g) for k, g in df.groupby(df["fold"].astype(int), sort=True)]
        else:
            frames.append((len(frames), f, df))
    cases = _cases(samples)
    by_sample = dict(zip(samples["sample_id"].astype(str), samples["case_id"].astype(str)))
    known_cases = set(cases["case_id"])
    out = []
    for fold, f, df in frames:
        part = df["split"].astype(str).str.lower().replace({"valid": "val", "validation": "val"})
        ids = df["id"].astype(str)
        case = ids.map(lambda s: by_sample.get(s, s if s in known_cases else None))
        unknown = int(case.isna().sum())
        if unknown:
            log.warning("split file %s fold %d: %d id(s) not in the labels (ignored)", f, fold, unknown)
        parts = {p: case[(part == p) & case.notna()].unique().tolist() for p in PARTITIONS}
        if ignore_val or not parts["val"]:
            parts["val"] = []
            parts["train"], parts["val"] = _carve_val(cases, parts["train"], val_fraction, _rng(seed, fold))
        split = _to_split(fold, samples, parts, f"{f} (set split.ignore_val: true if its val equals test)")
        listed = sum(map(len, split.partitions().values()))
        if listed < len(samples):
            log.warning("split file %s fold %d: %d labelled sample(s) not in the split (unused)", f, fold,
                        len(samples) - listed)
        out.append(split)
    return out


def n_folds(spec: Mapping[str, Any], base_dir: str | Path = ".") -> int:
    """How many folds `spec` gives, without building them (the runner's job list needs it before any data)."""
    proto = spec.get("protocol", "monte_carlo")
    if proto in ("holdout", "official"):
        return 1
    if proto != "csv":
        return int(spec.get("k", PROTOCOLS[proto]["k"]))
    path = str(spec["path"]) if Path(spec["path"]).is_absolute() else str(Path(base_dir) / spec["path"])
    if "{fold}" in path:
        k = 0
        while Path(path.format(fold=k)).is_file():
            k += 1
        return k
    if not Path(path).is_file():
        raise GpfmError(f"split file {path} not found; fix split.path (relative to the spec file)")
    df = pd.read_csv(path, dtype=str)
    return int(df["fold"].nunique()) if "fold" in df.columns else 1


def make_splits(spec: Mapping[str, Any], samples: pd.DataFrame, seed: int = 0, base_dir: str | Path = ".",
                default: Mapping[str, Any] | None = None) -> list[Split]:
    """Splits for a task from its `split` spec (`default` spec when empty), checked for leakage."""
    spec = dict(spec or default or {"protocol": "monte_carlo"})
    validate_split_spec(spec)
    proto = spec.pop("protocol")
    kw = {**{k: v for k, v in PROTOCOLS[proto].items() if k != "path"}, **spec}
    if proto == "csv":
        p = Path(kw.pop("path"))
        p = p if p.is_absolute() else Path(base_dir) / p
        splits = csv_splits(p, samples, seed=seed, **kw)
    else:
        fn = {"holdout": holdout_split, "monte_carlo": monte_carlo_splits, "kfold": kfold_splits,
              "official": official_split, "external": external_split}[proto]
        splits = fn(samples, seed=seed, **kw)
    for s in splits:
        check_no_leakage(s, samples)
    return splits


# --------------------------------------------------------------------------------------- checks and files
def check_no_leakage(split: Split, samples: pd.DataFrame, where: str = "split") -> None:
    """Raise when a case_id (patient) or sample is in two partitions of `split`."""
    case_of = dict(zip(samples["sample_id"].astype(str), samples["case_id"].astype(str)))
    seen: dict[str, str] = {}
    for p, ids in split.partitions().items():
        for s in ids:
            c = case_of.get(s, s)
            if seen.setdefault(c, p) != p:
                raise GpfmError(f"{where}: fold {split.fold}: case {c!r} is in both {seen[c]} and {p} "
                                "(patient-level leakage)")


def split_frame(split: Split, samples: pd.DataFrame) -> pd.DataFrame:
    """One row per sample of `split`: sample_id, case_id, partition."""
    case_of = dict(zip(samples["sample_id"].astype(str), samples["case_id"].astype(str)))
    rows = [(i, case_of.get(i, i), p) for p, ids in split.partitions().items() for i in ids]
    return pd.DataFrame(rows, columns=["sample_id", "case_id", "partition"])


def save_splits(splits: list[Split], samples: pd.DataFrame, folder: str | Path,
                write_text: Callable[[Path, str], None] = write_text) -> None:
    """Write `folder/fold_<k>.csv` (sample_id, case_id, partition) for every split, atomically."""
    for s in splits:
        write_text(Path(folder) / f"fold_{s.fold}.csv", split_frame(s, samples).to_csv(index=False))


def load_splits(folder: str | Path) -> list[Split]:
    """Read splits written by save_splits (fold order); [] when the folder has none."""
    files = sorted(Path(folder).glob("fold_*.csv"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    out = []
    for f in files:
        df = pd.read_csv(f, dtype=str)
        out.append(_split(int(re.sub(r"\D", "", f.stem)), {p: df.loc[df["partition"] == p, "sample_id"]
                                                           for p in PARTITIONS}))
    return out
