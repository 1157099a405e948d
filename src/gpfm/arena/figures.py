"""Leaderboard figures (matplotlib, Agg): rank heat map, critical-difference diagram, average metric, radar.

Each function draws from plain pandas inputs and returns PNG bytes, so the report can both save the file and embed
it in the HTML without reading it back.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

CATEGORY_LABELS = {"wsi_classification": "WSI classification", "survival": "Survival",
                   "roi_classification": "ROI classification", "retrieval": "Retrieval", "vqa": "VQA",
                   "report_generation": "Report generation"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight", facecolor="white")
    _plt().close(fig)
    return buf.getvalue()


def label(category: str) -> str:
    return CATEGORY_LABELS.get(category, category)


def rank_heatmap(ranks: pd.DataFrame, categories: Mapping[str, str], titles: Mapping[str, str] | None = None
                 ) -> bytes:
    """Tasks (rows, grouped by category) x encoders (columns, best average rank first), coloured by rank."""
    plt = _plt()
    from matplotlib.colors import ListedColormap

    cols = list(ranks.mean().sort_values(kind="stable").index)
    r = ranks[cols]
    k, n = r.shape[1], r.shape[0]
    fig, ax = plt.subplots(figsize=(3.6 + 0.75 * k, 2.4 + 0.24 * n))
    cmap = ListedColormap(plt.get_cmap("RdYlGn_r")(np.linspace(0.1, 0.9, 256)))
    im = ax.imshow(r.to_numpy(float), cmap=cmap, vmin=1, vmax=max(k, 2), aspect="auto")
    if k <= 30 and n <= 120:
        for i in range(n):
            for j in range(k):
                v = r.iat[i, j]
                ax.text(j, i, "" if np.isnan(v) else f"{v:g}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(k), cols, fontsize=8)
    ax.xaxis.tick_top()
    plt.setp(ax.get_xticklabels(), rotation=40, ha="left", rotation_mode="anchor")
    ax.set_yticks(range(n), [(titles or {}).get(t, t) for t in r.index], fontsize=7)
    cats = [categories.get(t, "") for t in r.index]
    start = 0
    for i in range(1, n + 1):
        if i == n or cats[i] != cats[start]:
            if i < n:
                ax.axhline(i - 0.5, color="black", lw=1.2)
            ax.text(k - 0.45, (start + i - 1) / 2, " " + label(cats[start]), va="center", ha="left", fontsize=8,
                    fontweight="bold")
            start = i
    cb = fig.colorbar(im, ax=ax, orientation="horizontal", fraction=0.04, pad=0.03, aspect=40,
                      ticks=range(1, max(k, 2) + 1))
    cb.set_label("rank (1 = best; ties share the average)", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    ax.set_title(f"Rank per task ({n} tasks, {k} encoders)", fontsize=10, pad=14 + 4 * max(map(len, cols)))
    return _png(fig)


def cd_diagram(avg_ranks: pd.Series, cd: float, groups: Sequence[Sequence[str]], n_tasks: int,
               alpha: float = 0.05) -> bytes:
    """Critical-difference diagram (Demšar 2006): average ranks on an axis, bars join non-different encoders."""
    plt = _plt()
    s = avg_ranks.sort_values(kind="stable")
    k = len(s)
    names, vals = list(s.index), s.to_numpy(float)
    half = (k + 1) // 2
    n_rows = max(half, k - half)
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.3 * n_rows + 0.15 * len(groups)))
    lo, hi = 1, max(k, 2)
    ax.set_xlim(lo - 0.6, hi + 0.6)
    top = 0.0
    ax.hlines(top, lo, hi, color="black", lw=1)
    for t in range(lo, hi + 1):
        ax.vlines(t, top, top + 0.12, color="black", lw=1)
        ax.text(t, top + 0.18, str(t), ha="center", va="bottom", fontsize=9)
    # CD bar above the axis, anchored at rank 1.
    ax.hlines(top + 0.65, lo, lo + cd, color="black", lw=2)
    ax.vlines([lo, lo + cd], top + 0.58, top + 0.72, color="black", lw=1)
    ax.text(lo + cd / 2, top + 0.78, f"CD = {cd:.2f} (Nemenyi, α = {alpha:g}, N = {n_tasks})", ha="center",
            va="bottom", fontsize=8)
    # Clique bars just below the axis.
    bar_y = [-(0.18 + 0.14 * g) for g in range(len(groups))]
    for y, grp in zip(bar_y, groups):
        xs = [float(s[g]) for g in grp]
        ax.hlines(y, min(xs) - 0.04, max(xs) + 0.04, color="black", lw=3.5)
    label_top = (min(bar_y) if bar_y else -0.1) - 0.25
    for i, (name, v) in enumerate(zip(names, vals)):
        left = i < half
        row = i if left else k - 1 - i
        y = label_top - 0.3 * row
        x_end = lo - 0.5 if left else hi + 0.5
        ax.plot([v, v, x_end], [top, y, y], color="0.25", lw=0.9)
        ax.text(x_end + (-0.05 if left else 0.05), y, f"{name} ({v:.2f})", ha="right" if left else "left",
                va="center", fontsize=9)
    ax.set_ylim(label_top - 0.3 * n_rows, top + 1.05)
    ax.axis("off")
    fig.subplots_adjust(left=0.22, right=0.78)
    return _png(fig)


def average_metric(avg: pd.DataFrame) -> bytes:
    """Mean primary metric over tasks per encoder with its bootstrap CI (columns mean, ci_low, ci_high)."""
    plt = _plt()
    a = avg.sort_values("mean", kind="stable")
    fig, ax = plt.subplots(figsize=(6.5, 1.0 + 0.4 * len(a)))
    y = np.arange(len(a))
    err = np.vstack([a["mean"] - a["ci_low"], a["ci_high"] - a["mean"]]).clip(min=0)
    ax.barh(y, a["mean"], color="#4C72B0", alpha=0.8, height=0.6)
    ax.errorbar(a["mean"], y, xerr=err, fmt="none", ecolor="black", capsize=3, lw=1)
    lo = float(np.nanmin(a["ci_low"].to_numpy(float)))
    hi = float(np.nanmax(a["ci_high"].to_numpy(float)))
    pad = max((hi - lo) * 0.3, 0.01)
    for yi, m, top in zip(y, a["mean"], a["ci_high"]):
        ax.text((top if np.isfinite(top) else m) + pad * 0.08, yi, f"{m:.3f}", ha="left", va="center", fontsize=8)
    ax.set_yticks(y, list(a.index), fontsize=9)
    ax.set_xlim(max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad)
    ax.set_xlabel("average primary metric over tasks (95% bootstrap CI over tasks)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Average metric ({int(a['n_tasks'].iloc[0])} tasks)", fontsize=10)
    return _png(fig)


def radar(avg_rank_by_category: pd.DataFrame, k: int) -> bytes | None:
    """Average rank per category (rows) for each encoder (columns); the outer ring is rank 1. Needs 3+ axes."""
    if len(avg_rank_by_category) < 3:
        return None
    plt = _plt()
    cats = list(avg_rank_by_category.index)
    angles = np.linspace(0, 2 * np.pi, len(cats), endpoint=False)
    fig, ax = plt.subplots(figsize=(6.5, 6.5), subplot_kw={"projection": "polar"})
    order = avg_rank_by_category.mean().sort_values(kind="stable").index
    colours = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")
    for i, enc in enumerate(order):
        r = (k + 1) - avg_rank_by_category[enc].to_numpy(float)
        ax.plot(np.r_[angles, angles[:1]], np.r_[r, r[:1]], lw=1.6, color=colours(i % colours.N), label=enc)
        ax.fill(np.r_[angles, angles[:1]], np.r_[r, r[:1]], alpha=0.06, color=colours(i % colours.N))
    ax.set_theta_offset(np.pi / 2)
    ax.set_theta_direction(-1)
    ax.set_xticks(angles, [label(c) for c in cats], fontsize=9)
    ax.tick_params(axis="x", pad=14)
    ticks = list(range(1, k + 1))
    ax.set_yticks([(k + 1) - t for t in ticks], [str(t) for t in ticks], fontsize=7, color="0.4")
    ax.set_ylim(0, k)
    ax.set_title("Average rank per task type (outer = better)", fontsize=10, pad=18)
    ax.legend(loc="upper right", bbox_to_anchor=(1.32, 1.1), fontsize=8)
    return _png(fig)
