"""One metric registry for every arena task, with a bootstrap (mean, std, 95 % CI) that has vectorised fast paths.

A metric is a pure function of a predictions DataFrame (the columns of predictions.csv, see runner.py) returning
a float. Register it once with `register_metric(name, fn, higher_is_better, batch_fn=None, index_fn=None)`;
`batch_fn(df, counts)` may compute the metric on many resamples at once, where `counts` is an (n_boot, n) matrix
of how often each row is drawn; `index_fn(df, indices)` is the same from the (n_boot, n) drawn row positions
(used first when given: AUC is fastest that way). The statistics module re-scores any
task's primary metric on resampled predictions through `get_metric(name)` / `metric_on_resamples`, with the same
`bootstrap_indices` everywhere.

Built in (standard columns): classification `auc` (binary AUC of `prob_1`; macro one-vs-rest AUC for more
classes, as sklearn's roc_auc_score(multi_class="ovr")), `balanced_accuracy`, `macro_f1`, `accuracy` (from `label`,
`pred`, `prob_<c>`), survival `c_index` (Harrell's, equal to sksurv's concordance_index_censored, tied_tol 1e-8, from
`time`, `event`, `risk`). A resample where a metric is undefined (one class only) gives NaN and is left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gpfm.io import GpfmError

MetricFn = Callable[[pd.DataFrame], float]
BatchFn = Callable[[pd.DataFrame, np.ndarray], np.ndarray]  # (df, counts or indices (n_boot, n)) -> (n_boot,)


@dataclass(frozen=True)
class Metric:
    name: str
    fn: MetricFn
    higher_is_better: bool = True
    batch_fn: BatchFn | None = None  # (df, counts)
    index_fn: BatchFn | None = None  # (df, indices)


_REGISTRY: dict[str, Metric] = {}


def register_metric(name: str, fn: MetricFn, higher_is_better: bool = True, batch_fn: BatchFn | None = None,
                    overwrite: bool = False, index_fn: BatchFn | None = None) -> Metric:
    """Add a metric to the registry (re-registering the same function is a no-op; a different one is an error)."""
    old = _REGISTRY.get(name)
    if old is not None and not overwrite and old.fn is not fn:
        raise GpfmError(f"metric '{name}' is already registered (pass overwrite=True to replace it)")
    m = Metric(name, fn, bool(higher_is_better), batch_fn, index_fn)
    _REGISTRY[name] = m
    return m


def get_metric(name: str) -> Metric:
    if name not in _REGISTRY:
        raise GpfmError(f"unknown metric '{name}' (registered: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def list_metrics() -> list[str]:
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------------------------- bootstrap
def bootstrap_indices(n: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot, n) row positions drawn with replacement; the same (n, n_boot, seed) always gives the same draw."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def resample_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """(n_boot, n) matrix: how many times each row appears in each resample."""
    b = len(indices)
    flat = (indices + (np.arange(b) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def metric_on_resamples(name: str, df: pd.DataFrame, indices: np.ndarray) -> np.ndarray:
    """The metric on each resample of `df`'s rows (`indices` from bootstrap_indices); NaN where undefined."""
    m = get_metric(name)
    df = df.reset_index(drop=True)
    indices = np.asarray(indices)
    if len(indices) and (m.index_fn or m.batch_fn):  # in chunks of about 2M drawn rows to bound memory
        step = max(1, 2_000_000 // max(1, indices.shape[1]))
        chunks = (indices[i:i + step] for i in range(0, len(indices), step))
        if m.index_fn is not None:
            return np.concatenate([np.asarray(m.index_fn(df, c), dtype=float) for c in chunks])
        return np.concatenate([np.asarray(m.batch_fn(df, resample_counts(c, len(df))), dtype=float) for c in chunks])
    return np.array([_safe(m.fn, df.iloc[idx]) for idx in indices], dtype=float)


def _safe(fn: MetricFn, df: pd.DataFrame) -> float:
    try:
        return float(fn(df))
    except (ValueError, ZeroDivisionError):
        return float("nan")


def summarize(values: np.ndarray, value: float, alpha: float = 0.05) -> dict[str, float]:
    """{value, mean, std, ci_low, ci_high} of bootstrap values (percentile CI, NaN resamples left out)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        nan = float("nan")
        return {"value": float(value), "mean": nan, "std": nan, "ci_low": nan, "ci_high": nan}
    return {"value": float(value), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "ci_low": float(np.quantile(v, alpha / 2)), "ci_high": float(np.quantile(v, 1 - alpha / 2))}


def bootstrap(name: str, df: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """The metric on `df` ("value") and its bootstrap mean, std and 95 % percentile CI over n_boot resamples."""
    value = _safe(get_metric(name).fn, df)
    if n_boot <= 0:
        return summarize(np.array([value]), value)
    return summarize(metric_on_resamples(name, df, bootstrap_indices(len(df), n_boot, seed)), value)


def bootstrap_all(names: Sequence[str], df: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """`bootstrap` for several metrics on the same resamples (what every handler's FoldResult.metrics holds)."""
    idx = bootstrap_indices(len(df), n_boot, seed) if n_boot > 0 else None
    out = {}
    for name in names:
        value = _safe(get_metric(name).fn, df)
        vals = np.array([value]) if idx is None else metric_on_resamples(name, df, idx)
        out[name] = summarize(vals, value)
    return out


# ----------------------------------------------------------------------------------------- classification
def prob_columns(df: pd.DataFrame) -> list[str]:
    """`prob_0, prob_1, ...` in class order (error when absent)."""
    cols = sorted((c for c in df.columns if c.startswith("prob_") and c[5:].isdigit()), key=lambda c: int(c[5:]))
    if not cols:
        raise GpfmError("predictions have no prob_<class> columns")
    return cols


def _auc_resampled(score: np.ndarray, positive: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Binary ROC AUC (ties count 1/2) of each resample (row of `indices`), from one sort: O(n_boot * n).

    Rows are binned by tied-score group; per resample, the AUC is sum over groups of
    positives * (negatives strictly below + half the negatives tied), over n_pos * n_neg.
    """
    uniq, group = np.unique(score, return_inverse=True)
    n_groups, b = len(uniq), len(indices)
    code = positive.astype(np.int64) * n_groups + group  # (class, score group) of each row
    key = code[indices]
    key += (np.arange(b, dtype=np.int64) * (2 * n_groups))[:, None]
    cnt = np.bincount(key.ravel(), minlength=b * 2 * n_groups).reshape(b, 2, n_groups)
    wn, wp = cnt[:, 0], cnt[:, 1]
    num2 = (wp * (2 * np.cumsum(wn, axis=1) - wn)).sum(axis=1)  # 2 x (negatives below + half the tied)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    num = num2 / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _auc_weighted(score: np.ndarray, positive: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The same AUC from (n_boot, n) draw counts: rows summed per tied-score group."""
    order = np.argsort(score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    w = counts[:, order]
    pos = positive[order].astype(float)
    wp = np.add.reduceat(w * pos, starts, axis=1)
    wn = np.add.reduceat(w * (1.0 - pos), starts, axis=1)
    num = (wp * (np.cumsum(wn, axis=1) - 0.5 * wn)).sum(axis=1)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _auc_generic(df: pd.DataFrame, draws: np.ndarray, binary_auc) -> np.ndarray:
    y = df["label"].to_numpy(int)
    cols = prob_columns(df)
    if len(cols) == 2:
        return binary_auc(df[cols[1]].to_numpy(float), y == 1, draws)
    per_class = [binary_auc(df[c].to_numpy(float), y == k, draws) for k, c in enumerate(cols)]
    with np.errstate(invalid="ignore"):
        return np.mean(per_class, axis=0)  # NaN when a resample lacks a class, as sklearn would raise


def _auc_index(df: pd.DataFrame, indices: np.ndarray) -> np.ndarray:
    return _auc_generic(df, indices, _auc_resampled)


def _auc_batch(df: pd.DataFrame, counts: np.ndarray) -> np.ndarray:
    return _auc_generic(df, counts, _auc_weighted)


def auc(df: pd.DataFrame) -> float:
    """Binary ROC AUC of prob_1, or macro one-vs-rest AUC over prob_<c> (sklearn's definition)."""
    return float(_auc_index(df, np.arange(len(df))[None, :])[0])


def _confusion(df: pd.DataFrame, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-resample, per-class TP, FP, FN: each (n_boot, C), with C covering every label and prediction."""
    y, p = df["label"].to_numpy(int), df["pred"].to_numpy(int)
    n_cls = max(int(y.max(initial=0)), int(p.max(initial=0))) + 1
    hit = y == p
    onehot_y = np.eye(n_cls)[y]
    onehot_p = np.eye(n_cls)[p]
    tp = counts @ (onehot_y * hit[:, None])
    return tp, counts @ onehot_p - tp, counts @ onehot_y - tp


def _balanced_accuracy_batch(df: pd.DataFrame, counts: np.ndarray) -> np.ndarray:
    tp, _, fn = _confusion(df, counts)
    support = tp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / np.where(support > 0, support, 1), np.nan)
        return np.nanmean(recall, axis=1)


def _macro_f1_batch(df: pd.DataFrame, counts: np.ndarray) -> np.ndarray:
    tp, fp, fn = _confusion(df, counts)
    den = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), np.nan)  # classes absent from both: skipped
        return np.nanmean(f1, axis=1)


def _accuracy_batch(df: pd.DataFrame, counts: np.ndarray) -> np.ndarray:
    hit = (df["label"].to_numpy(int) == df["pred"].to_numpy(int)).astype(float)
    return counts @ hit / counts.sum(axis=1)


def _single(batch: BatchFn) -> MetricFn:
    def fn(df: pd.DataFrame) -> float:
        return float(batch(df, np.ones((1, len(df))))[0])

    fn.__doc__ = batch.__doc__
    return fn


balanced_accuracy = _single(_balanced_accuracy_batch)
macro_f1 = _single(_macro_f1_batch)
accuracy = _single(_accuracy_batch)


# ---------------------------------------------------------------------------------------------- survival
def _pair_scores(time: np.ndarray, event: np.ndarray, risk: np.ndarray, tied_tol: float = 1e-8
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Harrell's pairs as sksurv counts them: i (event) vs j with t_j > t_i, or t_j == t_i and j censored.

    Returns (comparable, score) n x n matrices; score is 1 concordant (risk_i > risk_j), 0.5 tied risk, else 0.
    """
    ev = event.astype(bool)
    later = time[None, :] > time[:, None]
    same_cens = (time[None, :] == time[:, None]) & ~ev[None, :]
    comp = ev[:, None] & (later | same_cens)
    diff = risk[:, None] - risk[None, :]
    tied = np.abs(diff) <= tied_tol
    score = np.where(tied, 0.5, (diff > 0).astype(float)) * comp
    return comp.astype(float), score


def _c_index_batch(df: pd.DataFrame, counts: np.ndarray) -> np.ndarray:
    time, event, risk = (df[c].to_numpy(float) for c in ("time", "event", "risk"))
    if len(df) > 3000:  # n x n pair matrices get large: one resample at a time
        return np.array([_c_index_loop(time, event, risk, w) for w in counts])
    comp, score = _pair_scores(time, event, risk)
    num = ((counts @ score) * counts).sum(axis=1)
    den = ((counts @ comp) * counts).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _c_index_loop(time: np.ndarray, event: np.ndarray, risk: np.ndarray, w: np.ndarray) -> float:
    num = den = 0.0
    for i in np.flatnonzero((event > 0) & (w > 0)):
        comp = (time > time[i]) | ((time == time[i]) & (event == 0))
        d = risk[i] - risk[comp]
        wj = w[comp]
        num += w[i] * (wj * np.where(np.abs(d) <= 1e-8, 0.5, (d > 0).astype(float))).sum()
        den += w[i] * wj.sum()
    return num / den if den > 0 else float("nan")


def c_index(df: pd.DataFrame) -> float:
    """Harrell's concordance index of `risk` against (`time`, `event`); higher risk should mean earlier event."""
    return float(_c_index_batch(df, np.ones((1, len(df))))[0])


register_metric("auc", auc, True, _auc_batch, index_fn=_auc_index)
register_metric("balanced_accuracy", balanced_accuracy, True, _balanced_accuracy_batch)
register_metric("macro_f1", macro_f1, True, _macro_f1_batch)
register_metric("accuracy", accuracy, True, _accuracy_batch)
register_metric("c_index", c_index, True, _c_index_batch)
