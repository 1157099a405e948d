"""ROI (patch-level) classification on frozen image features: linear probe, kNN and few-shot (GPFM-METHOD.md §5.2).

Data: the image set's features from `gpfm extract --images` (`<features_dir>/<split>.h5` with `features`,
`labels`, `paths`), joined on `path` with the spec's labels CSV (`path, label[, split][, case_id]`; another
label column via `settings.label_column`; no CSV: the labels stored by extract). sample_id = path. Labelled
images without features (undecodable, skipped by extract) are listed in TaskData.excluded and warned about.
Splits: the CSV's official train/val/test split (`split: {protocol: official}`, the default; no val: carved
from train, no test: val becomes test); without a split column a seeded stratified 7:1:2 holdout.

Probes (`settings.probe`, used by the `linear` protocol):
- `linear` (the paper's, default): Linear(d, C) initialised N(0, 0.01), cross-entropy, AdamW lr 5e-4, weight
  decay 1e-5, cosine decay to 1e-5 over all iterations, batch 256, at most 3,000 epochs; validation macro-AUC
  after every epoch, stop after 100 epochs without a strictly better one, test the best-validation weights.
  Gradients are computed in closed form on whole batches held in memory (no autograd, no DataLoader).
- `logreg`: scikit-learn L-BFGS multinomial logistic regression on standardised features, its inverse
  regularisation C chosen from `logreg_C` by validation macro-AUC (ties: lower validation cross-entropy).
  Much faster, no schedule to trust; the GPFM suites use `linear`, the demo's grade task `logreg`.
Protocols (`settings.protocols`, default all three):
- `linear`: the probe above. Columns `prob_<c>`, `pred`; metrics `balanced_accuracy`, `macro_f1`, `auc`.
- `knn`: DINOv2's weighted vote: L2-normalised features, cosine similarity, the k nearest training images vote
  with weights softmax(sim / 0.07), k in `knn_k` ([1, 20]). Columns `knn<k>_prob_<c>`, `knn<k>_pred`; metrics
  `knn<k>_balanced_accuracy`, `knn<k>_macro_f1`, `knn<k>_auc` (registered, so stats can resample them).
- `fewshot`: SimpleShot-style prototypes (`gpfm.arena.fewshot`, `fewshot_shots`, `fewshot_episodes`); metrics
  `fewshot<k>_<metric>` are the mean and 95 % CI over episodes (not per sample: never a primary metric).
Every per-sample metric carries a bootstrap mean, std and 95 % CI over `n_boot` test resamples.
"""

from __future__ import annotations

import contextlib
import logging
import math
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gpfm.arena import metrics as M
from gpfm.arena.fewshot import fewshot_eval
from gpfm.arena.retrieval import ImageSetSettings, knn_probs
from gpfm.arena.runner import FoldResult, TaskData
from gpfm.arena.splits import Split, make_splits
from gpfm.arena.tasks import TaskSpec
from gpfm.config import from_dict
from gpfm.io import GpfmError, read_h5

log = logging.getLogger("gpfm.arena")


# --------------------------------------------------------------------------------------------- linear probe
def val_score(y: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUC of probabilities (the early-stopping criterion); NaN when a class is missing."""
    df = pd.DataFrame(probs, columns=[f"prob_{c}" for c in range(probs.shape[1])])
    df["label"] = y
    return M.auc(df)


def cosine_lr(step: int, total: int, lr: float, min_lr: float) -> float:
    """Cosine decay from lr (step 0) to min_lr (step `total`), as torch's CosineAnnealingLR."""
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


@contextlib.contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """Run a loop of tiny CPU ops on one intra-op thread (restored after). Batches of 256 gain nothing from
    more threads, and on a busy machine every op otherwise waits for its sibling thread: 10-20x slower."""
    old = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train_linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                       n_classes: int, *, lr: float = 5e-4, weight_decay: float = 1e-5, min_lr: float = 1e-5,
                       batch_size: int = 256, max_epochs: int = 3000, patience: int = 100, seed: int = 0,
                       device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Train Linear(d, C) with the paper's recipe; return the best-validation (W (C, d), b (C,), info).

    info: best_epoch, epochs (run), best_val_auc. When validation AUC is undefined (a class missing from the
    validation split) the criterion falls back to minus the validation cross-entropy.
    """
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.as_tensor(np.asarray(x_train, np.float32), device=device)
    y = torch.as_tensor(np.asarray(y_train, np.int64), device=device)
    xv = torch.as_tensor(np.asarray(x_val, np.float32), device=device)
    yv_np = np.asarray(y_val, np.int64)
    yv = torch.as_tensor(yv_np, device=device)
    n, d = x.shape
    w = (torch.randn(n_classes, d, generator=gen) * 0.01).to(x.device)
    b = torch.zeros(n_classes, device=x.device)
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    fused = x.device.type in ("cuda", "cpu")
    opt = torch.optim.AdamW([w, b], lr=lr, weight_decay=weight_decay, fused=fused)
    total = max_epochs * max(1, math.ceil(n / batch_size))
    best = (-math.inf, 0, w.clone(), b.clone())
    since_best, epoch = 0, 0
    with one_thread(x.device):
        for epoch in range(max_epochs):
            perm = torch.randperm(n, generator=gen).to(x.device)
            for i, idx in enumerate(perm.split(batch_size)):
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(epoch * math.ceil(n / batch_size) + i, total, lr, min_lr)
                _closed_form_grad(w, b, x[idx], y[idx])
                opt.step()
            with torch.no_grad():
                logits = torch.addmm(b, xv, w.T)
                score = val_score(yv_np, torch.softmax(logits, 1).cpu().numpy())
                if not math.isfinite(score):
                    score = -float(torch.nn.functional.cross_entropy(logits, yv))
            if score > best[0]:
                best, since_best = (score, epoch, w.detach().clone(), b.detach().clone()), 0
            else:
                since_best += 1
                if since_best >= patience:
                    break
    info = {"best_epoch": best[1], "epochs": epoch + 1, "best_val_auc": best[0]}
    return best[2], best[3], info


def _closed_form_grad(w: torch.Tensor, b: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> None:
    """Write the mean cross-entropy gradient into w.grad, b.grad: d/dlogits = (softmax - onehot) / B."""
    g = torch.softmax(torch.addmm(b, xb, w.T), dim=1)
    g[torch.arange(len(yb), device=g.device), yb] -= 1.0
    g /= len(yb)
    torch.mm(g.T, xb, out=w.grad)
    torch.sum(g, 0, out=b.grad)


def predict_linear(w: torch.Tensor, b: torch.Tensor, x: np.ndarray) -> np.ndarray:
    """Softmax probabilities (n, C) of a linear probe."""
    with torch.no_grad():
        xt = torch.as_tensor(np.asarray(x, np.float32), device=w.device)
        return torch.softmax(torch.addmm(b, xt, w.T), 1).cpu().numpy()


def logreg_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                 x_test: np.ndarray, n_classes: int, cs: list[float] | tuple[float, ...] = (1e-4, 1e-3, 1e-2,
                 1e-1, 1.0, 10.0, 100.0), max_iter: int = 1000, seed: int = 0) -> tuple[np.ndarray, dict]:
    """L-BFGS logistic regression on train-standardised features, C picked by validation macro-AUC.

    Returns test probabilities (n_test, n_classes) and info {C, val_auc (per C)}.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    xt, xv, xs = (scaler.transform(a) for a in (x_train, x_val, x_test))
    yv = np.asarray(y_val, np.int64)
    best: tuple[tuple[float, float], float, object] = ((-math.inf, -math.inf), float("nan"), None)
    scores = {}
    for c in sorted(float(c) for c in cs):
        clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed, tol=1e-4).fit(xt, y_train)
        pv = _full_probs(clf, xv, n_classes)
        auc = val_score(yv, pv)
        scores[c] = auc
        # AUC saturates (often 1.0 for several C); the validation cross-entropy breaks the tie
        key = (auc if math.isfinite(auc) else -math.inf, float(np.log(np.maximum(pv[np.arange(len(yv)), yv], 1e-12)).mean()))
        if key > best[0]:
            best = (key, c, clf)
    return _full_probs(best[2], xs, n_classes), {"C": best[1], "val_auc": scores}


def _full_probs(clf, x: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba spread over all n_classes columns (a class absent from training gets probability 0)."""
    out = np.zeros((len(x), n_classes))
    out[:, clf.classes_.astype(int)] = clf.predict_proba(x)
    return out


# ------------------------------------------------------------------------------------- settings and metrics
@dataclass
class RoiSettings(ImageSetSettings):
    """`settings:` of a roi_classification task (see the module docstring)."""

    protocols: list[str] = field(default_factory=lambda: ["linear", "knn", "fewshot"])
    probe: str = "linear"  # linear (paper: AdamW + cosine + early stopping) | logreg (L-BFGS, C on validation)
    lr: float = 5e-4
    weight_decay: float = 1e-5
    min_lr: float = 1e-5
    batch_size: int = 256
    max_epochs: int = 3000
    patience: int = 100
    logreg_C: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])
    logreg_max_iter: int = 1000
    knn_k: list[int] = field(default_factory=lambda: [1, 20])
    temperature: float = 0.07
    fewshot_shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    fewshot_episodes: int = 100


PROTOCOLS = ("linear", "knn", "fewshot")
CLASSIFICATION_METRICS = ("balanced_accuracy", "macro_f1", "auc")
_VIEWS: dict[str, tuple] = {}


def _view(df: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """The standard label/pred/prob_<c> columns of a prefixed protocol (knn20_pred -> pred, ...)."""
    cols = {c: c[len(prefix):] for c in df.columns if c.startswith(prefix)}
    out = df[list(cols)].rename(columns=cols)
    out["label"] = df["label"].to_numpy()
    return out


def prefixed_metric(prefix: str, base: str) -> str:
    """Register `<prefix><base>` (e.g. knn20_auc): the base metric on the prefixed columns. Returns its name."""
    name = prefix + base
    if name not in _VIEWS:
        m = M.get_metric(base)

        def fn(df: pd.DataFrame, _m=m, _p=prefix) -> float:
            return _m.fn(_view(df, _p))

        def batch(df: pd.DataFrame, counts: np.ndarray, _m=m, _p=prefix) -> np.ndarray:
            return _m.batch_fn(_view(df, _p), counts)

        _VIEWS[name] = (fn, batch)
        M.register_metric(name, fn, m.higher_is_better, batch if m.batch_fn is not None else None)
    return name


def validate(task: TaskSpec) -> RoiSettings:
    """Check a roi_classification spec's settings (unknown keys, probe and protocol names) before any job runs."""
    s = from_dict(RoiSettings, task.settings, "settings")
    where = task.source or task.name
    if s.probe not in ("linear", "logreg"):
        raise GpfmError(f"{where}: settings.probe must be 'linear' or 'logreg' (got {s.probe!r})")
    bad = sorted(set(s.protocols) - set(PROTOCOLS))
    if bad or not s.protocols:
        raise GpfmError(f"{where}: settings.protocols must be a non-empty list of {', '.join(PROTOCOLS)} "
                        f"(got {s.protocols!r})")
    if min(s.knn_k, default=1) < 1 or min(s.fewshot_shots, default=1) < 1 or s.fewshot_episodes < 1 \
            or s.batch_size < 1 or s.max_epochs < 1 or s.patience < 1 or s.temperature <= 0:
        raise GpfmError(f"{where}: settings knn_k, fewshot_shots, fewshot_episodes, batch_size, max_epochs and "
                        "patience must be positive integers and temperature > 0")
    if "knn" in s.protocols:
        for k in s.knn_k:
            for base in CLASSIFICATION_METRICS:
                prefixed_metric(f"knn{int(k)}_", base)
    return s


# ------------------------------------------------------------------------------------------------ loading
def _norm(path: str) -> str:
    return posixpath.normpath(str(path).replace("\\", "/"))


def read_image_features(features_dir: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """Every `<split>.h5` of an image set (gpfm extract --images): features (N, D) and a table (path, label,
    file_split) in the same order. Counts that differ inside a file, or a path in two files, are errors."""
    features_dir = Path(features_dir)
    files = sorted(features_dir.glob("*.h5")) if features_dir.is_dir() else []
    if not files:
        raise GpfmError(f"{features_dir}: no image-set features (<split>.h5); run `gpfm extract --images "
                        "FOLDER_OR_CSV --out ROOT` for this encoder, or fix the task's features template")
    xs, tables = [], []
    for f in files:
        data, _ = read_h5(f, ["features", "labels", "paths"])
        x, labels, paths = data["features"], data["labels"], data["paths"]
        if x.ndim != 2 or not len(x) == len(labels) == len(paths):
            raise GpfmError(f"{f}: {len(x)} feature rows but {len(labels)} labels and {len(paths)} paths; the "
                            "file is inconsistent - delete it and re-run `gpfm extract --images`")
        xs.append(np.asarray(x, np.float32))
        tables.append(pd.DataFrame({"path": [_norm(p) for p in paths], "h5_label": labels.astype(str),
                                    "file_split": f.stem, "file": f.name}))
    if len({x.shape[1] for x in xs}) > 1:
        raise GpfmError(f"{features_dir}: files hold features of different sizes; re-extract them together")
    table = pd.concat(tables, ignore_index=True)
    dup = table["path"].duplicated(keep=False)
    if dup.any():
        d = table[dup].iloc[:2]
        raise GpfmError(f"{features_dir}: image {d['path'].iloc[0]!r} is in both {d['file'].iloc[0]} and "
                        f"{d['file'].iloc[1]}; remove the stale file and re-run `gpfm extract --images`")
    return np.concatenate(xs), table


def _labelled(table: pd.DataFrame, label_column: str, labels: Path | None) -> pd.DataFrame:
    """Labelled samples: from the labels CSV (path, label column[, split][, case_id]) or, without one, the
    labels and split files stored by extract."""
    if labels is None:
        df = table.rename(columns={"h5_label": "label"})[["path", "label", "file_split"]]
        df = df.rename(columns={"file_split": "split"})
        if set(df["split"]) <= {"all"}:
            df = df.drop(columns="split")
    else:
        df = pd.read_csv(labels, dtype=str, keep_default_na=False)
        missing = [c for c in ("path", label_column) if c not in df.columns]
        if missing:
            raise GpfmError(f"{labels}: needs columns path and {label_column} (missing {', '.join(missing)}; "
                            f"has {', '.join(df.columns)}); set settings.label_column for another label")
        if label_column != "label":
            df = df.drop(columns=["label"], errors="ignore").rename(columns={label_column: "label"})
        df["path"] = df["path"].map(_norm)
        df = df[df["label"].astype(str).str.len() > 0]
        if df["path"].duplicated().any():
            raise GpfmError(f"{labels}: image {df['path'][df['path'].duplicated()].iloc[0]!r} is listed twice")
    df = df.copy()
    df["sample_id"] = df["path"]
    df["case_id"] = df["case_id"].astype(str) if "case_id" in df.columns else df["sample_id"]
    df["label"] = df["label"].astype(str)
    return df


def load(task: TaskSpec, features_dir: Path, external_dir: Path | None = None) -> TaskData:
    """Labelled images joined with their features; images without features (e.g. undecodable, skipped by
    extract) are counted in `excluded` and warned about, never silently dropped."""
    s = from_dict(ImageSetSettings, {k: v for k, v in task.settings.items()
                                     if k in ("label_column", "n_boot", "chunk_elements")}, "settings")
    parts = [("internal", features_dir, task.labels)]
    if task.external is not None:
        parts.append(("external", external_dir, task.external.labels))
    xs, frames = [], []
    for cohort, fdir, labels in parts:
        x, table = read_image_features(Path(fdir))
        lab = _labelled(table, s.label_column, labels)
        lab["cohort"] = cohort
        if cohort == "external":
            for c in ("sample_id", "case_id"):
                lab[c] = "external:" + lab[c]
        row = pd.Index(table["path"]).get_indexer(lab["path"])  # -1: labelled but no features
        lab["row"] = np.where(row >= 0, row + sum(len(a) for a in xs), -1)
        xs.append(x)
        frames.append(lab)
    labelled = pd.concat(frames, ignore_index=True)
    classes = sorted(labelled["label"].unique())
    labelled["stratum"] = labelled["label"]
    have = labelled["row"] >= 0
    excluded = {}
    if not have.all():
        gone = labelled.loc[~have, "sample_id"].tolist()
        excluded["no features (not decodable or not extracted)"] = gone
        log.warning("%s: %d labelled image(s) have no features in %s (left out), e.g. %s", task.name, len(gone),
                    features_dir, ", ".join(gone[:3]))
    samples = labelled[have].reset_index(drop=True)
    samples["label_name"] = samples["label"]
    samples["label"] = samples["label"].map({c: i for i, c in enumerate(classes)}).astype(int)
    x = np.concatenate(xs)[samples["row"].to_numpy()]
    cols = ["sample_id", "case_id", "cohort", "stratum"] + (["split"] if "split" in labelled.columns else [])
    return TaskData(samples=samples.drop(columns=["row"]), features=x, dim=int(x.shape[1]),
                    labelled=labelled[cols].copy(), excluded=excluded,
                    info={"classes": classes, "n_excluded": int((~have).sum())})


def make_folds(task: TaskSpec, data: TaskData, seed: int) -> list[Split]:
    """Splits from the spec (default: the official split). An image set without a split column gets a seeded,
    stratified 7:1:2 holdout instead of the official split (one fold either way)."""
    spec = dict(task.split)
    if spec.get("protocol") == "official" and "split" not in data.split_table.columns:
        log.info("%s: the labels have no split column; using a seeded stratified 7:1:2 holdout", task.name)
        spec = {"protocol": "holdout"}
    return make_splits(spec, data.split_table, seed, task.base_dir)


def fold_seed(seed: int, fold: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(fold)]).generate_state(1)[0])


def fold_arrays(data: TaskData, split: Split) -> dict[str, tuple[np.ndarray, np.ndarray, pd.DataFrame]]:
    """{partition: (features, int labels, samples rows)} of a split."""
    index = pd.Index(data.samples["sample_id"].astype(str))
    out = {}
    for part, ids in split.partitions().items():
        rows = index.get_indexer(list(ids))
        out[part] = (data.features[rows], data.samples["label"].to_numpy()[rows], data.samples.iloc[rows])
    return out


# ------------------------------------------------------------------------------------------------ a fold
def run_fold(task: TaskSpec, data: TaskData, split: Split, seed: int, device: str) -> FoldResult:
    """Train the probe on train (select on val), kNN on train, few-shot from train; score on test."""
    s = validate(task)
    classes = data.info["classes"]
    n_cls = len(classes)
    fseed = fold_seed(seed, split.fold)
    arr = fold_arrays(data, split)
    (xtr, ytr, _), (xv, yv, _), (xte, yte, test) = arr["train"], arr["val"], arr["test"]
    present = np.bincount(ytr, minlength=n_cls)
    if (present == 0).any():
        raise GpfmError(f"task {task.name} fold {split.fold}: class '{classes[int(np.argmin(present))]}' has no "
                        "training images; check the labels or the split")
    pred = pd.DataFrame({"sample_id": test["sample_id"].to_numpy(), "case_id": test["case_id"].to_numpy(),
                         "label": yte})
    names, info = [], {"classes": classes}
    if "linear" in s.protocols:
        if len(yv) == 0:
            raise GpfmError(f"task {task.name}: the {s.probe} probe needs a validation split; give the split "
                            "protocol a val_fraction > 0")
        if s.probe == "linear":
            w, b, info["probe"] = train_linear_probe(
                xtr, ytr, xv, yv, n_cls, lr=s.lr, weight_decay=s.weight_decay, min_lr=s.min_lr,
                batch_size=s.batch_size, max_epochs=s.max_epochs, patience=s.patience, seed=fseed, device=device)
            probs = predict_linear(w, b, xte)
        else:
            probs, info["probe"] = logreg_probe(xtr, ytr, xv, yv, xte, n_cls, s.logreg_C, s.logreg_max_iter, fseed)
        _add_probs(pred, "", probs)
        names += list(CLASSIFICATION_METRICS)
    if "knn" in s.protocols:
        for k, probs in knn_probs(xtr, ytr, xte, n_cls, s.knn_k, s.temperature, s.chunk_elements, device).items():
            _add_probs(pred, f"knn{k}_", probs)
            names += [prefixed_metric(f"knn{k}_", m) for m in CLASSIFICATION_METRICS]
    metrics = M.bootstrap_all(names, pred, s.n_boot, fseed)
    if "fewshot" in s.protocols:
        metrics.update(fewshot_eval(xtr, ytr, xte, yte, n_cls, s.fewshot_shots, s.fewshot_episodes, fseed, classes))
    return FoldResult(pred, metrics, info)


def _add_probs(df: pd.DataFrame, prefix: str, probs: np.ndarray) -> None:
    for c in range(probs.shape[1]):
        df[f"{prefix}prob_{c}"] = probs[:, c]
    df[f"{prefix}pred"] = probs.argmax(1)


for _k in (1, 20):  # the default kNN metrics exist as soon as the module is imported (stats re-scores them)
    for _base in CLASSIFICATION_METRICS:
        prefixed_metric(f"knn{_k}_", _base)
