"""Ranks and significance tests for a benchmark: tasks x encoders tables of primary metrics (GPFM-METHOD §5.3).

All functions are pure. A *scores* table is a DataFrame with one row per task and one column per encoder
holding the task's primary metric; `higher` says per task whether a larger metric is better. Tests are oriented
so that "A worse than B" is the alternative hypothesis whatever the metric's direction.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

from gpfm.io import GpfmError

Direction = bool | Mapping[str, bool] | pd.Series


# ------------------------------------------------------------------------------------------------ helpers
def _directions(scores: pd.DataFrame, higher: Direction) -> pd.Series:
    """Per-task `higher_is_better` as a boolean Series aligned to the rows of `scores`."""
    if isinstance(higher, bool | np.bool_):
        return pd.Series(bool(higher), index=scores.index)
    s = pd.Series(higher) if not isinstance(higher, pd.Series) else higher
    missing = [t for t in scores.index if t not in s.index]
    if missing:
        raise GpfmError(f"no metric direction (higher_is_better) for task(s) {', '.join(map(str, missing))}")
    return s.reindex(scores.index).astype(bool)


def oriented(scores: pd.DataFrame, higher: Direction) -> pd.DataFrame:
    """Scores flipped in sign where lower is better, so that larger always means better."""
    sign = np.where(_directions(scores, higher).to_numpy(), 1.0, -1.0)
    return scores.astype(float).mul(sign, axis=0)


def _require_complete(scores: pd.DataFrame, what: str) -> None:
    if scores.isna().to_numpy().any():
        raise GpfmError(f"{what} needs a complete tasks x encoders table; drop the gaps first (complete_tasks)")


def complete_tasks(scores: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Keep the tasks every encoder has a score for; also return the (task, encoder) gaps, in table order."""
    mask = scores.isna()
    gaps = [(str(t), str(e)) for t in scores.index for e in scores.columns if mask.at[t, e]]
    return scores.loc[~mask.any(axis=1)], gaps


# -------------------------------------------------------------------------------------------------- ranks
def rank_table(scores: pd.DataFrame, higher: Direction) -> pd.DataFrame:
    """Rank encoders 1..k within each task (1 = best); ties share the average of the ranks they span.

    Missing cells stay missing and are not ranked (the row is ranked among the encoders present).
    """
    return oriented(scores, higher).rank(axis=1, method="average", ascending=False)


def average_ranks(ranks: pd.DataFrame, categories: Mapping[str, str] | pd.Series | None = None) -> pd.DataFrame:
    """Mean rank per encoder: one row "overall", then one row per category (in first-seen order)."""
    rows = {"overall": ranks.mean(axis=0)}
    if categories is not None:
        cat = pd.Series(categories).reindex(ranks.index)
        for c in dict.fromkeys(cat.dropna()):
            rows[str(c)] = ranks.loc[cat == c].mean(axis=0)
    return pd.DataFrame(rows).T


def tasks_won(ranks: pd.DataFrame, ties: str = "each") -> pd.Series:
    """Number of tasks on which each encoder is best.

    Ties for first place: ties="each" gives every tied encoder a full win (the counts may then sum to more than
    the number of tasks); ties="share" splits the win equally (the counts sum to the number of tasks).
    """
    if ties not in ("each", "share"):
        raise GpfmError(f"tasks_won: ties must be 'each' or 'share', got {ties!r}")
    best = ranks.eq(ranks.min(axis=1), axis=0) & ranks.notna()
    if ties == "share":
        return best.div(best.sum(axis=1).replace(0, 1), axis=0).sum(axis=0)
    return best.sum(axis=0).astype(float)


def average_metric(scores: pd.DataFrame, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """Mean primary metric over tasks per encoder, with a percentile bootstrap CI over tasks.

    The same task resamples are used for every encoder. The CI reflects between-task spread (which tasks were
    chosen), not the within-task test-set noise that the per-task CIs show. Metrics of mixed kinds are averaged
    as they are, as in the paper.
    """
    _require_complete(scores, "average_metric")
    x = scores.to_numpy(float)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    boot = x[idx].mean(axis=1)  # (n_boot, k)
    return pd.DataFrame({"mean": x.mean(axis=0), "ci_low": np.quantile(boot, alpha / 2, axis=0),
                         "ci_high": np.quantile(boot, 1 - alpha / 2, axis=0), "n_tasks": len(x)},
                        index=scores.columns)


# ------------------------------------------------------------------------------------- Friedman / Nemenyi
@dataclass(frozen=True)
class Friedman:
    """Friedman test over N tasks and k encoders, with the Iman-Davenport F form (less conservative)."""

    statistic: float
    p_value: float
    iman_davenport_f: float
    iman_davenport_p: float
    k: int
    n: int


def friedman(ranks: pd.DataFrame) -> Friedman:
    """Friedman chi-square from within-task ranks, corrected for ties (equals scipy.stats.friedmanchisquare)."""
    _require_complete(ranks, "the Friedman test")
    r = ranks.to_numpy(float)
    n, k = r.shape
    if k < 2 or n < 2:
        raise GpfmError(f"the Friedman test needs at least 2 encoders and 2 tasks (have {k} and {n})")
    chi2 = 12.0 * n / (k * (k + 1)) * (np.square(r.mean(axis=0)).sum() - k * (k + 1) ** 2 / 4.0)
    ties = sum(float(np.sum(c**3 - c)) for c in (np.unique(row, return_counts=True)[1] for row in r))
    correction = 1.0 - ties / (n * k * (k * k - 1))
    chi2 = chi2 / correction if correction > 0 else 0.0
    p = float(sps.chi2.sf(chi2, k - 1))
    denom = n * (k - 1) - chi2
    f = (n - 1) * chi2 / denom if denom > 0 else math.inf
    pf = float(sps.f.sf(f, k - 1, (k - 1) * (n - 1))) if math.isfinite(f) else 0.0
    return Friedman(float(chi2), p, float(f), pf, k, n)


@functools.cache
def q_alpha(k: int, alpha: float = 0.05) -> float:
    """Nemenyi critical value: the studentized range quantile for k groups and infinite df, over sqrt(2).

    Reproduces Demšar (2006), table 5: k=9 gives 3.102 at alpha 0.05 and 2.855 at alpha 0.10.
    """
    if k < 2:
        raise GpfmError(f"Nemenyi needs at least 2 encoders (have {k})")
    if not 0 < alpha < 1:
        raise GpfmError(f"alpha must lie in (0, 1), got {alpha}")
    return float(sps.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2))


def nemenyi_cd(k: int, n: int, alpha: float = 0.05) -> float:
    """Critical difference of average ranks: CD = q_alpha * sqrt(k (k + 1) / (6 N)); k=9, N=72 gives 1.416."""
    if n < 1:
        raise GpfmError("Nemenyi needs at least one task")
    return q_alpha(k, alpha) * math.sqrt(k * (k + 1) / (6.0 * n))


def cliques(avg_ranks: Mapping[str, float] | pd.Series, cd: float) -> list[list[str]]:
    """Maximal groups of encoders whose average ranks all lie within less than `cd` of each other.

    These are the bars of a critical-difference diagram: encoders joined by a bar are not significantly
    different. Encoders are sorted best first; single encoders are not listed.
    """
    s = pd.Series(avg_ranks, dtype=float).sort_values(kind="stable")
    names, vals = list(s.index), s.to_numpy()
    groups: list[list[str]] = []
    last_end = -1
    for i in range(len(vals)):
        j = i
        while j + 1 < len(vals) and vals[j + 1] - vals[i] < cd:
            j += 1
        if j > i and j > last_end:
            groups.append([str(x) for x in names[i:j + 1]])
            last_end = j
    return groups


# ----------------------------------------------------------------------------------------- paired tests
def wilcoxon_worse(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                   higher_is_better: bool = True) -> float:
    """One-sided Wilcoxon signed-rank P-value for "A is worse than B" on paired values (as in the paper).

    With a higher-is-better metric this is scipy's wilcoxon(a, b, alternative="less", correction=False): small P
    means A's values are systematically below B's. For a lower-is-better metric the alternative is "greater".
    All differences zero (identical predictions) gives P = 1.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1:
        raise GpfmError(f"wilcoxon: paired values must be two 1-d arrays of one length ({a.shape} vs {b.shape})")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) == 0 or np.all(a == b):
        return 1.0
    alt = "less" if higher_is_better else "greater"
    return float(sps.wilcoxon(a, b, alternative=alt, correction=False).pvalue)


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted P-values (family-wise error control); NaN entries stay NaN and are not counted."""
    p = np.asarray(p_values, float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if len(ok) == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adj, 1.0)
    return out


def align_predictions(frames: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Restrict each encoder's predictions to the samples all of them have, in one shared order.

    Predictions are keyed by `sample_id` and, when present, `fold` (pooled out-of-fold or Monte-Carlo folds).
    """
    if not frames:
        return {}
    keys = {}
    for enc, df in frames.items():
        if "sample_id" not in df.columns:
            raise GpfmError(f"predictions of encoder '{enc}' have no sample_id column; re-run the arena")
        key = df["sample_id"].astype(str)
        if "fold" in df.columns:
            key = df["fold"].astype(str) + ":" + key
        if key.duplicated().any():
            raise GpfmError(f"predictions of encoder '{enc}' repeat sample_id {key[key.duplicated()].iloc[0]!r}")
        keys[enc] = pd.Index(key)
    common = functools.reduce(lambda x, y: x.intersection(y), keys.values()).sort_values()
    if len(common) == 0:
        raise GpfmError(f"predictions of {', '.join(frames)} share no sample_id; were they run on one split?")
    return {enc: df.set_axis(keys[enc]).loc[common].reset_index(drop=True) for enc, df in frames.items()}


def paired_bootstrap(frames: Mapping[str, pd.DataFrame], metric: str, n_boot: int = 1000,
                     seed: int = 0) -> pd.DataFrame:
    """Per-resample `metric` (a gpfm.arena.metrics name) for every encoder of one task, on shared resamples.

    The predictions are aligned on their common samples first, so resample b draws the same samples for every
    encoder (metrics.bootstrap_indices). Returns a (n_boot, encoders) DataFrame; NaN where the metric is
    undefined on a resample. Pairs of its columns feed `wilcoxon_worse`.
    """
    from gpfm.arena import metrics

    aligned = align_predictions(frames)
    n = len(next(iter(aligned.values())))
    idx = metrics.bootstrap_indices(n, n_boot, seed)
    return pd.DataFrame({enc: metrics.metric_on_resamples(metric, df, idx) for enc, df in aligned.items()})


def pairwise_pvalues(boot: pd.DataFrame, higher_is_better: bool = True,
                     reference: str | None = None, adjust: bool = False) -> pd.DataFrame:
    """P-values of "A worse than B" from paired bootstrap values (columns = encoders).

    With `reference`, A ranges over the other encoders and B is the reference (did the reference beat each?);
    otherwise all ordered pairs. `adjust` applies Holm over the comparisons of this call.
    """
    encs = list(boot.columns)
    if reference is not None and reference not in encs:
        raise GpfmError(f"reference encoder '{reference}' not among {', '.join(encs)}")
    pairs = [(a, reference) for a in encs if a != reference] if reference else \
        [(a, b) for a in encs for b in encs if a != b]
    rows = [{"encoder_a": a, "encoder_b": b, "mean_a": float(np.nanmean(boot[a])),
             "mean_b": float(np.nanmean(boot[b])), "p": wilcoxon_worse(boot[a], boot[b], higher_is_better)}
            for a, b in pairs]
    out = pd.DataFrame(rows, columns=["encoder_a", "encoder_b", "mean_a", "mean_b", "p"])
    if adjust:
        out["p_holm"] = holm(out["p"].to_numpy())
    return out


def across_tasks_pvalue(scores: pd.DataFrame, higher: Direction, a: str, b: str) -> float:
    """P-value of "A worse than B" by a one-sided Wilcoxon signed-rank test over task-level primary metrics.

    Metrics are oriented first (lower-is-better tasks flipped) so every task contributes in one direction.
    """
    for e in (a, b):
        if e not in scores.columns:
            raise GpfmError(f"encoder '{e}' not in the results (have {', '.join(map(str, scores.columns))})")
    o = oriented(scores[[a, b]].dropna(), higher)
    return wilcoxon_worse(o[a].to_numpy(), o[b].to_numpy(), higher_is_better=True)
