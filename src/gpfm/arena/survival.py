"""Survival prediction: a MIL head with a discrete-time hazard (or Cox) output per patient (GPFM protocol, §5.2).

Labels: CSV `slide_id, case_id, time, event` with **event = 1 when the event (death, progression) was observed
and 0 when the patient was censored** (GPFM-METHOD R4). A table with a `censorship`/`censored` column instead of
`event` is rejected (convert it: event = 1 - censorship); an event column that looks inverted (patients with
event = 1 followed up longer than censored ones, and the longest follow-ups nearly all "events") gets a warning.

Several slides of one patient: the patient is one sample whose bag pools the tiles of all its slides that have
features (slides in slide_id order); the patient is excluded only when none has features. Its time and event must
agree across its slides.

Model: ABMIL (settings.model) with `n_bins` (4) outputs; the bins are cut at quantiles of the event times of the
fold's *training* patients with an observed event (no test information). Loss: the discrete-time negative
log-likelihood with `alpha` (0 in the paper) weighting the uncensored term; `loss: cox` uses the Cox partial
likelihood on mini-batches (batch_size >= 2). Risk = -sum of the survival curve (NLL) or the linear predictor
(Cox). Early stopping on validation C-index (paper) or loss; the validation set comes from the training part.
Metric: Harrell's C-index (`c_index`, = sksurv's concordance_index_censored) with bootstrap CI; predictions.csv
has per-patient `risk`.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger("gpfm.arena")
COLUMNS = ("slide_id", "case_id", "time", "event")


@dataclass
class SurvivalSettings(MILSettings):
    balanced_sampling: bool = False
    loss: str = "nll"  # nll (discrete-time, paper) | cox
    n_bins: int = 4
    alpha: float = 0.0
    early_stop_on: str = "c_index"  # c_index (paper) | loss


def settings(task: TaskSpec) -> SurvivalSettings:
    s = from_dict(SurvivalSettings, task.settings, f"{task.name}.settings")
    if s.loss not in ("nll", "cox"):
        raise GpfmError(f"task {task.name}: settings.loss must be nll or cox (got {s.loss!r})")
    if s.early_stop_on not in ("c_index", "loss"):
        raise GpfmError(f"task {task.name}: settings.early_stop_on must be c_index or loss")
    if s.loss == "cox" and s.batch_size < 2:
        raise GpfmError(f"task {task.name}: the Cox loss needs settings.batch_size >= 2 (patients per step)")
    if s.n_bins < 2 or not 0 <= s.alpha <= 1:
        raise GpfmError(f"task {task.name}: settings.n_bins must be >= 2 and settings.alpha in [0, 1]")
    build_mil(s.model, 1, 2)
    return s


def validate(task: TaskSpec) -> None:
    if task.labels is None:
        raise GpfmError(f"{task.source}: a survival task needs 'labels' (slide_id, case_id, time, event)")
    settings(task)


# ------------------------------------------------------------------------------------------------- losses
def nll_loss(logits: torch.Tensor, bins: torch.Tensor, event: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """Discrete-time survival NLL (hazard h = sigmoid(logit), S = cumprod(1 - h)), mean over patients.

    Observed event in bin y: -log S(y-1) - log h(y); censored in bin y: -log S(y); loss = (1 - alpha) * that +
    alpha * (uncensored part). Computed in log space for stability.
    """
    y = bins.long()[:, None]
    log_h = F.logsigmoid(logits)
    log_s = torch.cumsum(F.logsigmoid(-logits), dim=1)
    log_s_pad = torch.cat([torch.zeros_like(log_s[:, :1]), log_s], dim=1)
    e = event.float()[:, None]
    uncensored = -e * (log_s_pad.gather(1, y) + log_h.gather(1, y))
    censored = -(1 - e) * log_s_pad.gather(1, y + 1)
    return ((1 - alpha) * (censored + uncensored) + alpha * uncensored).mean()


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties), mean over the batch's events (0 when none)."""
    risk = risk.reshape(-1)
    at_risk = time[None, :] >= time[:, None]  # row i: patients still at risk at t_i
    log_den = torch.logsumexp(risk[None, :].masked_fill(~at_risk, float("-inf")), dim=1)
    e = event.float()
    return -((risk - log_den) * e).sum() / e.sum().clamp(min=1)


def risk_from_logits(logits: torch.Tensor, loss: str = "nll") -> torch.Tensor:
    """Higher = worse prognosis: -sum_k S_k for hazard logits, the linear predictor for Cox."""
    if loss == "cox":
        return logits[:, 0]
    return -torch.cumprod(1 - torch.sigmoid(logits), dim=1).sum(dim=1)


def time_bins(train_times: np.ndarray, train_events: np.ndarray, n_bins: int = 4) -> np.ndarray:
    """Cut points (n_bins - 1) at quantiles of the observed event times; bin = number of cuts <= time."""
    t = train_times[train_events.astype(bool)]
    if len(t) == 0:
        raise GpfmError("survival: no observed event among the training patients; cannot place time bins")
    return np.quantile(t, np.linspace(0, 1, n_bins + 1)[1:-1])


def discretize(times: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    return np.searchsorted(cuts, times, side="right")


# --------------------------------------------------------------------------------------------------- data
def check_event_column(df: pd.DataFrame, path: Path) -> None:
    """Reject censorship-style columns; warn when `event` looks inverted (R4)."""
    cens = [c for c in ("censorship", "censored", "censor") if c in df.columns]
    if cens:
        a = pd.to_numeric(df["event"], errors="coerce")
        b = pd.to_numeric(df[cens[0]], errors="coerce")
        if (a == b).all():
            raise GpfmError(f"{path}: 'event' equals '{cens[0]}' on every row; event must be 1 = observed, "
                            f"0 = censored - fix the table (event = 1 - {cens[0]})")
    t, e = df["time"].to_numpy(float), df["event"].to_numpy(int)
    if e.min() == e.max() or len(df) < 10:
        return
    longest = e[t >= np.quantile(t, 0.9)]
    if np.median(t[e == 1]) > np.median(t[e == 0]) and longest.mean() >= 0.9:
        log.warning("%s: the event column looks inverted: patients with event=1 have longer follow-up than "
                    "censored ones and %.0f%% of the longest follow-ups are events. gpfm reads event=1 as "
                    "observed, 0 as censored; if this is a censorship column, use event = 1 - censorship",
                    path, 100 * longest.mean())


def _table(path: Path, cohort: str) -> pd.DataFrame:
    try:
        df = read_label_table(path, COLUMNS, "survival")
    except GpfmError as e:
        raw = pd.read_csv(path, nrows=0).columns
        cens = [c for c in ("censorship", "censored", "censor") if c in raw]
        if "event" not in raw and cens:
            raise GpfmError(f"{path}: has '{cens[0]}' but no 'event' column; gpfm needs event = 1 observed, "
                            f"0 censored (add event = 1 - {cens[0]})") from None
        raise e
    n0 = len(df)
    df["time"] = pd.to_numeric(df["time"], errors="coerce")
    df["event"] = pd.to_numeric(df["event"].replace({"True": 1, "False": 0, "true": 1, "false": 0}),
                                errors="coerce")
    df = df.dropna(subset=["time", "event"]).copy()
    if len(df) < n0:
        log.warning("%s: %d row(s) without a numeric time or event left out", path, n0 - len(df))
    bad = df[~df["event"].isin([0, 1]) | (df["time"] < 0)]
    if len(bad):
        r = bad.iloc[0]
        raise GpfmError(f"{path}: slide {r['slide_id']}: event must be 0 or 1 (1 = observed, 0 = censored) and "
                        f"time >= 0 (got event={r['event']}, time={r['time']})")
    df["event"] = df["event"].astype(int)
    check_event_column(df, path)
    per_case = df.groupby("case_id")[["time", "event"]].nunique()
    conflict = per_case[(per_case > 1).any(axis=1)]
    if len(conflict):
        raise GpfmError(f"{path}: case {conflict.index[0]!r} has slides with different time/event; one patient "
                        "needs one follow-up")
    df["cohort"] = cohort
    return df.sort_values(["case_id", "slide_id"])


def load(task: TaskSpec, features_dir: Path, external_dir: Path | None = None) -> TaskData:
    """One sample per patient (tiles of all its slides pooled); patients without any features excluded."""
    validate(task)
    tables = [_table(task.labels, "internal")]
    if task.external is not None:
        tables.append(_table(task.external.labels, "external"))
    df = pd.concat(tables, ignore_index=True)
    if df.groupby("case_id")["cohort"].nunique().max() > 1:
        raise GpfmError(f"task {task.name}: a case_id is in both the internal and the external label table")
    cases = df.groupby("case_id", sort=True).agg(time=("time", "first"), event=("event", "first"),
                                                 cohort=("cohort", "first"), n_slides=("slide_id", "size"))
    cases = cases.reset_index()
    cases.insert(0, "sample_id", cases["case_id"])
    cases["stratum"] = cases["event"].astype(str)
    labelled = cases[["sample_id", "case_id", "cohort", "stratum"]].copy()
    bags: dict[str, np.ndarray] = {}
    dim, excluded = None, {}
    for cohort, fdir in (("internal", features_dir), ("external", external_dir)):
        sub = df[df["cohort"] == cohort]
        if sub.empty:
            continue
        require_dir(fdir, task.name)
        store = BagStore(fdir, sub["slide_id"].tolist())
        if dim is not None and store.dim is not None and store.dim != dim:
            raise GpfmError(f"{fdir}: feature dim {store.dim} differs from the internal cohort's {dim}")
        dim = dim or store.dim
        warn_excluded(store.excluded(), task.name, fdir)
        for case, grp in sub.groupby("case_id", sort=True):
            parts = [store[s] for s in grp["slide_id"] if s in store]
            if parts:
                bags[case] = parts[0] if len(parts) == 1 else np.concatenate(parts)
            else:
                excluded.setdefault("no slide with features", []).append(case)
    if dim is None:
        raise GpfmError(f"task {task.name}: no labelled slide has features in {features_dir}; check --features")
    if excluded:
        warn_excluded(excluded, task.name, features_dir, unit="patient")
    samples = cases[cases["sample_id"].isin(bags.keys())].reset_index(drop=True)
    return TaskData(samples=samples, features=bags, dim=dim, labelled=labelled, excluded=excluded,
                    info={"unit": "patient"})


def make_folds(task: TaskSpec, data: TaskData, seed: int) -> list[Split]:
    return make_splits(task.split, data.split_table, seed, task.base_dir)


def run_fold(task: TaskSpec, data: TaskData, split: Split, seed: int, device: str) -> FoldResult:
    """Train on split.train, early-stop on split.val, predict per-patient risk on split.test."""
    s = settings(task)
    table = data.samples.set_index("sample_id")
    tr = table.loc[list(split.train)]
    cuts = time_bins(tr["time"].to_numpy(float), tr["event"].to_numpy(int), s.n_bins)

    def part(ids: tuple[str, ...]) -> tuple[list[np.ndarray], torch.Tensor]:
        t = table.loc[list(ids)]
        y = np.stack([discretize(t["time"].to_numpy(float), cuts), t["event"], t["time"]], 1)
        return [data.features[i] for i in ids], torch.as_tensor(y, dtype=torch.float32)

    if s.loss == "cox":
        def loss_fn(lo: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return cox_loss(lo[:, 0], y[:, 2], y[:, 1])
    else:
        def loss_fn(lo: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return nll_loss(lo, y[:, 0], y[:, 1], s.alpha)

    def c_index_score(lo: torch.Tensor, y: torch.Tensor) -> float:
        df = pd.DataFrame({"time": y[:, 2].numpy(), "event": y[:, 1].numpy(),
                           "risk": risk_from_logits(lo, s.loss).numpy()})
        return metrics.c_index(df)

    fold_seed = seed * 1000 + split.fold
    torch.manual_seed(fold_seed)
    model = build_mil(s.model, data.dim, 1 if s.loss == "cox" else s.n_bins, s.hidden, s.attn_hidden, s.dropout)
    (tr_x, tr_y), (va_x, va_y), (te_x, _) = part(split.train), part(split.val), part(split.test)
    by_c = s.early_stop_on == "c_index"
    info = train_mil(model, tr_x, tr_y, loss_fn, s, fold_seed, device, va_x, va_y if split.val else None,
                     c_index_score if by_c else None, higher_is_better=by_c, strata=tr_y[:, 1].numpy())
    risk = risk_from_logits(predict(model, te_x, device), s.loss).numpy()
    te = table.loc[list(split.test)]
    pred = pd.DataFrame({"sample_id": list(split.test), "case_id": te["case_id"].values,
                         "time": te["time"].values, "event": te["event"].values, "risk": risk})
    res = metrics.bootstrap_all(["c_index"], pred, s.n_boot, fold_seed)
    return FoldResult(pred, res, {**info, "time_cuts": cuts.tolist(), "model": s.model, "loss": s.loss})
