"""Shared pieces of the generative arena tasks (report generation, VQA): label tables, feature bags, training.

Label tables are CSV, JSON (a list of records, or a mapping holding one such list) or JSON lines; column names are
matched case-insensitively. Every sample's visual input is a *bag* of frozen features (N, D):

- slide level: `<features_dir>/<slide_id>.h5` (`gpfm extract`), dataset `features` (N, D): one bag per slide.
- image level: the image-set files `<features_dir>/<split>.h5` of `gpfm extract --images` (datasets `features`,
  `labels`, `paths`). A row names its image by a relative path (as given to extract) or by an id that is matched
  against file stems: exactly (one image, N = 1), else as the prefix of ``{id}_*`` file names (all patches of a
  PatchGastricADC22 slide form the bag). The split file an image came from (train/val/test) becomes its
  official split when the table has no `split` column.

Bags are held in memory when they fit in `cache_gb`, otherwise read from their HDF5 file when a batch needs them.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import posixpath
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gpfm.io import GpfmError, read_h5

log = logging.getLogger("gpfm.arena")


# ---------------------------------------------------------------------------------------------- tables
def read_table(path: str | Path) -> pd.DataFrame:
    """A label table as strings with lower-case column names (CSV, JSON or JSON lines)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".jsonl":
            df = pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
        elif path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise GpfmError(f"{path}: a JSON label table must be a list of records (or hold exactly one)")
                data = lists[0]
            df = pd.DataFrame(data)
        else:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise GpfmError(f"{path}: cannot read the label table ({e})") from e
    df.columns = [str(c).strip().lower() for c in df.columns]
    return df


def pick_column(df: pd.DataFrame, names: Sequence[str], where: str | Path, what: str,
                required: bool = True) -> str | None:
    """The first of `names` that `df` has; an error naming the file and the accepted names otherwise."""
    for n in names:
        if n in df.columns:
            return n
    if required:
        raise GpfmError(f"{where}: no {what} column (expected one of: {', '.join(names)}; has: "
                        f"{', '.join(df.columns)})")
    return None


def text_value(v: object) -> str:
    """A table cell as text ('' for missing)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(v).strip()


# ------------------------------------------------------------------------------------------------ bags
@dataclass
class Bags:
    """Bag key -> (N, D) float32 features, from an in-memory image matrix or per-slide HDF5 files."""

    dim: int
    matrix: np.ndarray | None = None  # image level: every image's feature (M, D)
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # image level: key -> rows of `matrix`
    files: dict[str, Path] = field(default_factory=dict)  # slide level: key -> features file
    cache: dict[str, np.ndarray] = field(default_factory=dict)

    def get(self, key: str) -> np.ndarray:
        if self.matrix is not None:
            return self.matrix[self.rows[key]]
        if key in self.cache:
            return self.cache[key]
        return _read_bag(self.files[key], self.dim)

    def keys(self) -> list[str]:
        return list(self.rows) if self.matrix is not None else list(self.files)


def _read_bag(path: Path, dim: int | None = None) -> np.ndarray:
    x = read_h5(path, ["features"])[0]["features"]
    if x.ndim != 2:
        raise GpfmError(f"{path}: 'features' must be (N, D), got shape {x.shape}; re-run gpfm extract")
    if dim is not None and x.shape[1] != dim:
        raise GpfmError(f"{path}: features have dim {x.shape[1]} but other slides of this encoder have {dim}; "
                        "re-extract it with the same encoder")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise GpfmError(f"{path}: features contain NaN or inf; re-extract this slide")
    return x


def slide_bags(features_dir: Path, slide_ids: Sequence[str], cache_gb: float = 4.0
               ) -> tuple[Bags, dict[str, list[str]]]:
    """Bags of the slides that have a features file with tiles; excluded {reason: [slide ids]}."""
    import h5py

    if not Path(features_dir).is_dir():
        raise GpfmError(f"{features_dir}: features folder not found; run `gpfm extract` or fix --features")
    excluded: dict[str, list[str]] = {}
    files, shapes = {}, {}
    for sid in dict.fromkeys(slide_ids):
        f = Path(features_dir) / f"{sid}.h5"
        if not f.is_file():
            excluded.setdefault("no features file", []).append(sid)
            continue
        try:
            with h5py.File(f, "r") as h:
                shapes[sid] = h["features"].shape
        except (OSError, KeyError) as e:
            raise GpfmError(f"{f}: not a features file ({e}); delete it and re-run gpfm extract") from e
        if len(shapes[sid]) != 2 or shapes[sid][0] == 0:
            excluded.setdefault("no tiles", []).append(sid)
            continue
        files[sid] = f
    dims = {shapes[s][1] for s in files}
    if len(dims) > 1:
        a, b = sorted(dims)[:2]
        sa = next(s for s in files if shapes[s][1] == a)
        sb = next(s for s in files if shapes[s][1] == b)
        raise GpfmError(f"{features_dir}: features of different dims ({files[sa].name}: {a}, {files[sb].name}: "
                        f"{b}); one folder must hold one encoder's features")
    if not files:
        raise GpfmError(f"{features_dir}: none of the {len(set(slide_ids))} labelled slides has a features file "
                        "with tiles; run `gpfm extract` or fix --features")
    bags = Bags(dim=dims.pop(), files=files)
    if sum(shapes[s][0] * shapes[s][1] * 4 for s in files) <= cache_gb * 2 ** 30:
        bags.cache = {s: _read_bag(f, bags.dim) for s, f in files.items()}
    return bags, excluded


def image_features(features_dir: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """Every image of an image-set features folder: (features (M, D) float32, paths, split of each)."""
    files = sorted(Path(features_dir).glob("*.h5")) if Path(features_dir).is_dir() else []
    feats, paths, splits = [], [], []
    for f in files:
        data, _ = read_h5(f)
        if "paths" not in data or "features" not in data:
            continue
        x = np.asarray(data["features"], np.float32)
        if len(x) != len(data["paths"]):
            raise GpfmError(f"{f}: {len(x)} features but {len(data['paths'])} paths; re-run gpfm extract --images")
        if not np.isfinite(x).all():
            raise GpfmError(f"{f}: features contain NaN or inf; re-run gpfm extract --images")
        feats.append(x)
        paths += [str(p) for p in data["paths"]]
        splits += [f.stem] * len(x)
    if not feats:
        raise GpfmError(f"{features_dir}: no image-set features (<split>.h5 with 'features' and 'paths'); run "
                        "`gpfm extract --images` or fix the task's features path")
    dims = {x.shape[1] for x in feats}
    if len(dims) > 1:
        raise GpfmError(f"{features_dir}: image-set files have different feature dims {sorted(dims)}")
    return np.concatenate(feats), paths, splits


def _norm_path(p: str) -> str:
    p = posixpath.normpath(str(p).replace("\\", "/"))
    return p[2:] if p.startswith("./") else p


def _stem(p: str) -> str:
    name = posixpath.basename(_norm_path(p))
    return name.rsplit(".", 1)[0] if "." in name else name


def match_images(keys: Sequence[str], paths: Sequence[str]) -> dict[str, np.ndarray]:
    """Rows of `paths` for each key: same relative path, else same file stem, else stems ``{key}_*``."""
    by_path: dict[str, list[int]] = {}
    by_stem: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        by_path.setdefault(_norm_path(p), []).append(i)
        by_stem.setdefault(_stem(p), []).append(i)
    sorted_stems = sorted(by_stem)
    out: dict[str, np.ndarray] = {}
    for key in dict.fromkeys(keys):
        rows = by_path.get(_norm_path(key)) or by_stem.get(_stem(key))
        if not rows:  # PatchGastricADC22: patches are named {slide id}_{hash}.jpg
            prefix = _stem(key) + "_"
            lo = int(np.searchsorted(sorted_stems, prefix))
            rows = []
            while lo < len(sorted_stems) and sorted_stems[lo].startswith(prefix):
                rows += by_stem[sorted_stems[lo]]
                lo += 1
        if rows:
            out[key] = np.array(sorted(rows), dtype=np.int64)
    return out


def image_bags(features_dir: Path, keys: Sequence[str]) -> tuple[Bags, dict[str, str], dict[str, list[str]]]:
    """Bags for image keys, the official split of each matched key (from its features file), excluded keys."""
    x, paths, splits = image_features(features_dir)
    rows = match_images(keys, paths)
    missing = [k for k in dict.fromkeys(keys) if k not in rows]
    if not rows:
        raise GpfmError(f"{features_dir}: none of the {len(set(keys))} images of the label table is in the "
                        f"image features (e.g. {keys[0]!r}; features list e.g. {paths[0]!r}); paths must be "
                        "relative to the same folder as in the CSV given to `gpfm extract --images`")
    split_of = {}
    for k, r in rows.items():
        names = pd.Series([splits[i] for i in r]).value_counts()
        split_of[k] = str(names.index[0])
    return Bags(dim=x.shape[1], matrix=x, rows=rows), split_of, ({"no image features": missing} if missing else {})


def pad_bags(bags: Sequence[np.ndarray], max_tiles: int = 0, rng: np.random.Generator | None = None,
             device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, N_max, D) float tensor and key padding mask (True = padding; None when no bag is padded).

    With `max_tiles` > 0 and an `rng`, bags larger than max_tiles are randomly subsampled (training only).
    """
    if max_tiles > 0 and rng is not None:
        bags = [b[np.sort(rng.choice(len(b), max_tiles, replace=False))] if len(b) > max_tiles else b for b in bags]
    n = max(len(b) for b in bags)
    x = np.zeros((len(bags), n, bags[0].shape[1]), np.float32)
    mask = np.zeros((len(bags), n), bool)
    for i, b in enumerate(bags):
        x[i, :len(b)] = b
        mask[i, len(b):] = True
    return torch.from_numpy(x).to(device), (torch.from_numpy(mask).to(device) if mask.any() else None)


# ---------------------------------------------------------------------------------------------- splits
def make_text_folds(task, table: pd.DataFrame, seed: int) -> list:
    """The task's splits. The category default `official` needs a split column (from the table or the image
    files); without one it becomes a seeded 7:1:2 holdout by case (HistGen's TCGA-Report protocol)."""
    from gpfm.arena.splits import make_splits

    spec = dict(task.split)
    if spec.get("protocol") == "official" and "split" not in table.columns:
        log.info("%s: no split column: using a seeded 7:1:2 holdout split by case", task.name)
        spec = {"protocol": "holdout", "ratios": [0.7, 0.1, 0.2]}
    return make_splits(spec, table, seed, task.base_dir)


# -------------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """Optimisation of a generative head (`settings.train` in a task spec)."""

    epochs: int = 30
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    patience: int = 5  # epochs without a lower validation loss before stopping
    max_tiles: int = 4096  # training-time random subset of a bag's tiles (0 = all)


def batches(ids: Sequence[int], size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Index batches of `ids` (shuffled by `rng` when given)."""
    ids = np.asarray(ids)
    if rng is not None:
        ids = ids[rng.permutation(len(ids))]
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def fit(model: torch.nn.Module, loss_fn: Callable[[np.ndarray, np.random.Generator | None], torch.Tensor],
        n_train: int, n_val: int, cfg: TrainConfig, seed: int) -> dict:
    """AdamW training with early stopping on the mean validation loss; the best weights are loaded at the end.

    `loss_fn(batch_positions, rng)` returns the mean loss of a training (rng given) or validation (rng None)
    batch. Without a validation set the last epoch is kept. Returns info: epochs, best_epoch, losses, seconds.
    """
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    best, best_state, best_epoch, since = math.inf, None, -1, 0
    history = []
    t0 = time.perf_counter()
    epoch = 0
    for epoch in range(cfg.epochs):
        model.train()
        tr = []
        for b in batches(range(n_train), cfg.batch_size, rng):
            loss = loss_fn(b, rng)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            tr.append(float(loss.detach()))
        val = evaluate_loss(model, loss_fn, n_val, cfg.batch_size) if n_val else float(np.mean(tr))
        history.append({"epoch": epoch, "train_loss": float(np.mean(tr)), "val_loss": val})
        if val < best:
            best, best_epoch, since = val, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since += 1
            if since >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"epochs": epoch + 1, "best_epoch": best_epoch, "best_val_loss": best, "history": history,
            "train_seconds": round(time.perf_counter() - t0, 3)}


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, loss_fn: Callable, n: int, batch_size: int) -> float:
    """Sample-weighted mean loss over n validation positions (eval mode)."""
    model.eval()
    total = 0.0
    for b in batches(range(n), batch_size):
        total += float(loss_fn(b, None)) * len(b)
    return total / max(n, 1)


def fold_seed(seed: int, fold: int) -> int:
    """The RNG seed of one fold, derived from the run seed and the fold number."""
    return int(np.random.SeedSequence([int(seed), int(fold)]).generate_state(1)[0])
