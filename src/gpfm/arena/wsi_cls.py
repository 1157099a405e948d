"""WSI classification: a MIL head (ABMIL by default) per fold on frozen slide features (GPFM protocol, §5.2).

Labels: CSV `slide_id, case_id, label` (string or integer classes). Class order: `settings.classes` if given,
else the sorted labels. One sample per slide; splits group slides by case_id. Training: cross-entropy, Adam 2e-4 /
1e-4, one slide per step, class-balanced sampling, <= 100 epochs, early stopping on validation loss (patience 20,
not before epoch 50), best-validation weights tested. Test metrics: macro OvR AUC (`auc`), `balanced_accuracy`,
`macro_f1`, each with bootstrap mean/std/95 % CI; predictions.csv has per-slide `prob_<c>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from gpfm.arena import metrics
from gpfm.arena.bags import BagStore, read_label_table, require_dir, warn_excluded
from gpfm.arena.mil import build_mil
from gpfm.arena.runner import FoldResult, TaskData
from gpfm.arena.splits import Split, make_splits
from gpfm.arena.tasks import TaskSpec
from gpfm.arena.train import MILSettings, predict, train_mil
from gpfm.config import from_dict
from gpfm.io import GpfmError

METRICS = ("auc", "balanced_accuracy", "macro_f1")
COLUMNS = ("slide_id", "case_id", "label")


@dataclass
class WsiSettings(MILSettings):
    classes: list[str] | None = None  # class order (prob_0 = classes[0]); default: sorted labels
    early_stop_on: str = "loss"  # validation criterion: loss (paper) or auc


def settings(task: TaskSpec) -> WsiSettings:
    s = from_dict(WsiSettings, task.settings, f"{task.name}.settings")
    if s.early_stop_on not in ("loss", "auc"):
        raise GpfmError(f"task {task.name}: settings.early_stop_on must be loss or auc (got {s.early_stop_on!r})")
    if s.batch_size < 1 or s.epochs < 1:
        raise GpfmError(f"task {task.name}: settings.batch_size and settings.epochs must be >= 1")
    build_mil(s.model, 1, 2)  # unknown model names fail here, before any job
    return s


def validate(task: TaskSpec) -> None:
    if task.labels is None:
        raise GpfmError(f"{task.source}: a wsi_classification task needs 'labels' (slide_id, case_id, label)")
    settings(task)


def _table(path: Path, cohort: str) -> pd.DataFrame:
    df = read_label_table(path, COLUMNS, "classification")
    df = df.dropna(subset=["label"]).copy()
    df["label_name"] = df["label"].astype(str).str.strip()
    df["cohort"] = cohort
    return df


def load(task: TaskSpec, features_dir: Path, external_dir: Path | None = None) -> TaskData:
    """Labels + feature bags of one encoder; slides without features excluded (counted, warned)."""
    validate(task)
    s = settings(task)
    tables = [_table(task.labels, "internal")]
    if task.external is not None:
        tables.append(_table(task.external.labels, "external"))
    df = pd.concat(tables, ignore_index=True)
    if df["slide_id"].duplicated().any():
        raise GpfmError(f"task {task.name}: slide_id {df.loc[df['slide_id'].duplicated(), 'slide_id'].iloc[0]!r} "
                        "is in both the internal and the external label table")
    classes = [str(c) for c in s.classes] if s.classes else sorted(tables[0]["label_name"].unique())
    unknown = sorted(set(df["label_name"]) - set(classes))
    if unknown:
        raise GpfmError(f"task {task.name}: label {unknown[0]!r} is not among the classes {classes}; "
                        "fix the label table or settings.classes")
    if len(classes) < 2:
        raise GpfmError(f"{task.labels}: only one class ({classes[0]!r}); classification needs at least two")
    df["label"] = df["label_name"].map({c: i for i, c in enumerate(classes)}).astype(int)
    df["stratum"] = df["label_name"]
    df = df.rename(columns={"slide_id": "sample_id"})
    labelled = df[["sample_id", "case_id", "cohort", "stratum"]].reset_index(drop=True)
    bags, excluded, dim = {}, {}, None
    for cohort, fdir in (("internal", features_dir), ("external", external_dir)):
        ids = df.loc[df["cohort"] == cohort, "sample_id"].tolist()
        if not ids:
            continue
        require_dir(fdir, task.name)
        store = BagStore(fdir, ids)
        if dim is not None and store.dim is not None and store.dim != dim:
            raise GpfmError(f"{fdir}: feature dim {store.dim} differs from the internal cohort's {dim}")
        dim = dim or store.dim
        bags.update(store.bags)
        for reason, sids in store.excluded().items():
            excluded.setdefault(reason, []).extend(sids)
        warn_excluded(store.excluded(), task.name, fdir)
    if dim is None:
        raise GpfmError(f"task {task.name}: no labelled slide has features in {features_dir}; check --features")
    samples = df[df["sample_id"].isin(bags.keys())].reset_index(drop=True)
    return TaskData(samples=samples, features=bags, dim=dim, labelled=labelled, excluded=excluded,
                    info={"classes": classes})


def make_folds(task: TaskSpec, data: TaskData, seed: int) -> list[Split]:
    return make_splits(task.split, data.split_table, seed, task.base_dir)


def _auc_score(logits: torch.Tensor, y: torch.Tensor) -> float:
    p = torch.softmax(logits, 1).numpy()
    df = pd.DataFrame({"label": y.numpy(), **{f"prob_{k}": p[:, k] for k in range(p.shape[1])}})
    return metrics.auc(df)


def run_fold(task: TaskSpec, data: TaskData, split: Split, seed: int, device: str) -> FoldResult:
    """Train on split.train, early-stop on split.val, predict and score split.test."""
    s = settings(task)
    n_cls = len(data.info["classes"])
    table = data.samples.set_index("sample_id")

    def part(ids: tuple[str, ...]) -> tuple[list[np.ndarray], torch.Tensor]:
        return [data.features[i] for i in ids], torch.tensor(table.loc[list(ids), "label"].to_numpy(np.int64))

    fold_seed = seed * 1000 + split.fold
    torch.manual_seed(fold_seed)
    model = build_mil(s.model, data.dim, n_cls, s.hidden, s.attn_hidden, s.dropout)
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = part(split.train), part(split.val), part(split.test)
    info = train_mil(model, tr_x, tr_y, F.cross_entropy, s, fold_seed, device, va_x, va_y if split.val else None,
                     _auc_score if s.early_stop_on == "auc" else None, higher_is_better=s.early_stop_on == "auc",
                     strata=tr_y.numpy())
    prob = torch.softmax(predict(model, te_x, device), 1).numpy()
    pred = pd.DataFrame({"sample_id": list(split.test), "case_id": table.loc[list(split.test), "case_id"].values,
                         "label": te_y.numpy(), "pred": prob.argmax(1),
                         **{f"prob_{k}": prob[:, k] for k in range(n_cls)}})
    res = metrics.bootstrap_all(METRICS, pred, s.n_boot, fold_seed)
    return FoldResult(pred, res, {**info, "classes": data.info["classes"], "model": s.model})
