"""`gpfm arena report RUN_DIR`: turn an arena results folder into the leaderboard (GPFM-METHOD §5.3).

Reads `<task>/<encoder>/result.json` (primary metric, direction, CI) and, for paired P-values, the fold
predictions; writes under --out (default RUN_DIR):

    leaderboard.md / leaderboard.html   summary, statistics, one section per category (HTML: sortable tables and
                                        the figures embedded, no external resources)
    leaderboard.csv                     one row per encoder: average rank overall and per category, average
                                        metric with CI, tasks won, across-task P-value against the reference
    scores.csv                          one row per (task, encoder): primary metric, CI, rank
    pvalues.csv                         per task: paired-bootstrap one-sided Wilcoxon P of "encoder_a worse
                                        than encoder_b" (b = the reference, or every pair with --all-pairs)
    report.json                         the same statistics, machine-readable
    figures/{rank_heatmap,cd_diagram,average_metric,radar}.png

Ranks use only the tasks every encoder has; missing (task, encoder) cells are listed. With one encoder there is
a table but no ranks or tests, and the report says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gpfm.arena import figures, stats
from gpfm.arena.leaderboard_render import render_html, render_markdown
from gpfm.io import GpfmError, read_json, write_csv, write_json

log = logging.getLogger("gpfm.arena")
FIGURES = ("rank_heatmap", "cd_diagram", "average_metric", "radar")


@dataclass
class Results:
    """Every readable result.json of a run, one row per (task, encoder), in run order."""

    rows: pd.DataFrame
    tasks: list[str]
    encoders: list[str]
    suite: str = ""
    problems: list[str] = field(default_factory=list)


def collect(run_dir: str | Path) -> Results:
    """Read the results folder; unreadable or inconsistent result.json files are listed in `problems`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GpfmError(f"{run_dir}: results folder not found; pass the --out folder of `gpfm arena run`")
    run = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    problems, rows = [], []
    for f in sorted(run_dir.glob("*/*/result.json")):
        try:
            r = read_json(f)
            p = r["metrics"][r["primary_metric"]]
            rows.append({"task": str(r["task"]), "category": str(r["category"]), "encoder": str(r["encoder"]),
                         "primary_metric": str(r["primary_metric"]), "higher_is_better": bool(r["higher_is_better"]),
                         "value": float(p["value"]), "std": float(p.get("std", np.nan)),
                         "ci_low": float(p.get("ci_low", np.nan)), "ci_high": float(p.get("ci_high", np.nan)),
                         "n_folds": int(r.get("n_folds", 1)), "title": str((r.get("meta") or {}).get("title", ""))})
        except (ValueError, KeyError, TypeError) as e:
            problems.append(f"{f}: unreadable result ({type(e).__name__}: {e}); re-run `gpfm arena run`")
    if not rows:
        raise GpfmError(f"{run_dir}: no <task>/<encoder>/result.json found; run `gpfm arena run --out {run_dir}`")
    df = pd.DataFrame(rows)
    df = df[np.isfinite(df["value"])] if np.isfinite(df["value"]).any() else df
    first = df.groupby("task", sort=False)["primary_metric"].first()
    bad = df["primary_metric"] != df["task"].map(first)
    for _, r in df[bad].iterrows():
        problems.append(f"{r.task}/{r.encoder}: primary metric {r.primary_metric} differs from "
                        f"{first[r.task]} of the other encoders; left out (re-run with one spec)")
    df = df[~bad]
    order_t = [t for t in (run.get("tasks") or {}) if t in set(df["task"])]
    order_t += [t for t in dict.fromkeys(df["task"]) if t not in order_t]
    order_e = [e for e in (run.get("encoders") or []) if e in set(df["encoder"])]
    order_e += [e for e in dict.fromkeys(df["encoder"]) if e not in order_e]
    cat_rank = {c: i for i, c in enumerate(figures.CATEGORY_LABELS)}
    first_cat = df.groupby("task", sort=False)["category"].first()
    order_t = sorted(order_t, key=lambda t: (cat_rank.get(first_cat[t], 99), order_t.index(t)))
    return Results(df.reset_index(drop=True), order_t, order_e, str(run.get("suite", run_dir.name)), problems)


def load_predictions(run_dir: Path, task: str, encoder: str) -> pd.DataFrame | None:
    """All folds' predictions of one (task, encoder), with a `fold` column; None when there are none."""
    files = sorted((Path(run_dir) / task / encoder).glob("fold_*/predictions.csv"))
    frames = []
    for f in files:
        df = pd.read_csv(f)
        if "fold" not in df.columns:
            df["fold"] = int(f.parent.name.split("_")[-1])
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else None


def _metric_ready(name: str, category: str) -> None:
    """Make sure `name` is registered: category modules register their metrics when imported, or (retrieval's
    acc@k, the ROI kNN metrics) when `validate` sees a spec, so a default spec of the category is validated."""
    from gpfm.arena import metrics

    try:
        metrics.get_metric(name)
        return
    except GpfmError:
        pass
    from gpfm.arena.runner import get_handler
    from gpfm.arena.tasks import TaskSpec

    handler = get_handler(category)
    if hasattr(handler, "validate"):
        try:
            handler.validate(TaskSpec(name="report", category=category, labels=None, primary_metric=name))
        except GpfmError:
            pass
    metrics.get_metric(name)


@dataclass
class Analysis:
    """Everything the leaderboard shows (see `analyse`)."""

    results: Results
    scores: pd.DataFrame  # task x encoder primary metric (all tasks, NaN for gaps)
    higher: pd.Series
    categories: pd.Series
    gaps: list[tuple[str, str]]
    ranks: pd.DataFrame | None = None  # complete tasks only
    avg_ranks: pd.DataFrame | None = None  # rows: overall + categories
    won: pd.Series | None = None
    won_shared: pd.Series | None = None
    avg_metric: pd.DataFrame | None = None
    friedman: stats.Friedman | None = None
    cd: float | None = None
    groups: list[list[str]] = field(default_factory=list)
    reference: str | None = None
    pvalues: pd.DataFrame | None = None
    across: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    alpha: float = 0.05
    holm: bool = False


def analyse(results: Results, run_dir: str | Path | None = None, alpha: float = 0.05, n_boot: int = 1000,
            seed: int = 0, reference: str | None = None, holm: bool = False, all_pairs: bool = False) -> Analysis:
    """Ranks, average ranks, tasks won, average metric, Friedman + Nemenyi and paired P-values.

    P-values need `run_dir` (the predictions) and n_boot > 0; they test every encoder against the reference
    (best average rank unless given), or every ordered pair with `all_pairs`. Tie rule for "tasks won": every
    encoder tied for first gets the win (`won`); `won_shared` splits it.
    """
    r = results.rows
    scores = r.pivot(index="task", columns="encoder", values="value").reindex(index=results.tasks,
                                                                               columns=results.encoders)
    higher = r.groupby("task")["higher_is_better"].first().reindex(results.tasks)
    cats = r.groupby("task")["category"].first().reindex(results.tasks)
    complete, gaps = stats.complete_tasks(scores)
    a = Analysis(results, scores, higher, cats, gaps, alpha=alpha, holm=holm)
    k = scores.shape[1]
    if gaps:
        a.notes.append(f"{len(gaps)} (task, encoder) result(s) missing; ranks and tests use the "
                       f"{len(complete)} of {len(scores)} tasks that every encoder has.")
    if k < 2:
        a.notes.append(f"Only one encoder ({results.encoders[0]}): nothing to rank it against, so there are no "
                       "ranks, P-values or critical-difference diagram. Run more encoders on the suite.")
        return a
    if len(complete) == 0:
        a.notes.append("No task has results for every encoder, so nothing can be ranked.")
        return a
    a.ranks = stats.rank_table(complete, higher[complete.index])
    a.avg_ranks = stats.average_ranks(a.ranks, cats[complete.index])
    a.won = stats.tasks_won(a.ranks, "each")
    a.won_shared = stats.tasks_won(a.ranks, "share")
    a.avg_metric = stats.average_metric(complete, n_boot=1000, seed=seed)
    order = a.avg_ranks.loc["overall"].sort_values(kind="stable").index
    a.reference = reference or str(order[0])
    if a.reference not in scores.columns:
        raise GpfmError(f"--reference {a.reference}: not among the encoders ({', '.join(results.encoders)})")
    if len(complete) >= 2:
        a.friedman = stats.friedman(a.ranks)
        a.cd = stats.nemenyi_cd(k, len(complete), alpha)
        a.groups = stats.cliques(a.avg_ranks.loc["overall"], a.cd)
        others = [e for e in order if e != a.reference]
        p = [stats.across_tasks_pvalue(complete, higher[complete.index], e, a.reference) for e in others]
        a.across = pd.DataFrame({"encoder": others, "reference": a.reference, "p": p})
        if holm:
            a.across["p_holm"] = stats.holm(a.across["p"].to_numpy())
    else:
        a.notes.append("One complete task: ranks are shown, but the Friedman test and the critical difference "
                       "need at least two tasks.")
    if run_dir is not None and n_boot > 0:
        a.pvalues = _task_pvalues(a, Path(run_dir), complete.index, n_boot, seed, holm, all_pairs)
    return a


def _task_pvalues(a: Analysis, run_dir: Path, tasks: pd.Index, n_boot: int, seed: int, holm: bool,
                  all_pairs: bool = False) -> pd.DataFrame:
    """Per task: paired bootstrap of the primary metric, then P("encoder worse than the reference")."""
    out = []
    metric_of = a.results.rows.groupby("task")["primary_metric"].first()
    for task in tasks:
        preds = {e: load_predictions(run_dir, task, e) for e in a.scores.columns}
        missing = [e for e, p in preds.items() if p is None]
        if missing:
            a.notes.append(f"{task}: no predictions for {', '.join(missing)}; no paired P-values for this task.")
            continue
        try:
            _metric_ready(metric_of[task], a.categories[task])
            boot = stats.paired_bootstrap(preds, metric_of[task], n_boot=n_boot, seed=seed)
        except GpfmError as e:
            a.notes.append(f"{task}: no paired P-values ({e}).")
            continue
        pv = stats.pairwise_pvalues(boot, bool(a.higher[task]), reference=None if all_pairs else a.reference,
                                    adjust=holm)
        pv.insert(0, "task", task)
        out.append(pv)
    return pd.concat(out, ignore_index=True) if out else None


# ------------------------------------------------------------------------------------------------- writing
def summary_table(a: Analysis) -> pd.DataFrame:
    """One row per encoder (best average rank first): the leaderboard.csv table."""
    df = pd.DataFrame(index=pd.Index(a.results.encoders, name="encoder"))
    df["n_tasks"] = a.scores.notna().sum(axis=0)
    if a.avg_ranks is not None:
        for row in a.avg_ranks.index:
            df["avg_rank" if row == "overall" else f"avg_rank_{row}"] = a.avg_ranks.loc[row]
        df["tasks_won"] = a.won
        df["tasks_won_shared"] = a.won_shared
        df = df.join(a.avg_metric[["mean", "ci_low", "ci_high"]].add_prefix("avg_metric_"))
        df = df.rename(columns={"avg_metric_mean": "avg_metric"})
        if a.across is not None:
            col = "p_holm" if a.holm else "p"
            df["p_across_tasks"] = a.across.set_index("encoder")[col]
        df = df.sort_values("avg_rank", kind="stable")
    else:
        df["avg_metric"] = a.scores.mean(axis=0)
    return df.reset_index()


def scores_table(a: Analysis) -> pd.DataFrame:
    r = a.results.rows.copy()
    if a.ranks is not None:
        rk = a.ranks.stack().rename("rank").reset_index()
        r = r.merge(rk, on=["task", "encoder"], how="left")
    return r


def make_figures(a: Analysis) -> dict[str, bytes]:
    """The PNGs that the data support (none without ranks)."""
    if a.ranks is None:
        return {}
    titles = dict(zip(a.results.rows["task"], a.results.rows["title"].where(a.results.rows["title"] != "",
                                                                             a.results.rows["task"])))
    out = {"rank_heatmap": figures.rank_heatmap(a.ranks, a.categories.to_dict(), titles),
           "average_metric": figures.average_metric(a.avg_metric)}
    if a.cd is not None:
        out["cd_diagram"] = figures.cd_diagram(a.avg_ranks.loc["overall"], a.cd, a.groups, len(a.ranks), a.alpha)
    radar = figures.radar(a.avg_ranks.drop(index="overall"), a.ranks.shape[1])
    if radar is None:
        a.notes.append("Radar chart skipped: it needs at least three task categories.")
    else:
        out["radar"] = radar
    return out


def write_report(run_dir: str | Path, out: str | Path | None = None, **kwargs: Any) -> tuple[dict[str, Path], Analysis]:
    """Collect, analyse and write every report file; returns ({name: path}, analysis)."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir
    results = collect(run_dir)
    a = analyse(results, run_dir, **kwargs)
    figs = make_figures(a)
    paths: dict[str, Path] = {}
    for name, png in figs.items():
        p = out / "figures" / f"{name}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_bytes(png)
        tmp.replace(p)
        paths[name] = p
    summary = summary_table(a)
    _csv(out / "leaderboard.csv", summary)
    _csv(out / "scores.csv", scores_table(a))
    if a.pvalues is not None:
        _csv(out / "pvalues.csv", a.pvalues)
        paths["pvalues"] = out / "pvalues.csv"
    from gpfm.io import write_text

    write_text(out / "leaderboard.md", render_markdown(a, summary, {n: f"figures/{n}.png" for n in figs}))
    write_text(out / "leaderboard.html", render_html(a, summary, figs))
    write_json(out / "report.json", _report_json(a, summary))
    paths.update({"leaderboard.csv": out / "leaderboard.csv", "scores.csv": out / "scores.csv",
                  "leaderboard.md": out / "leaderboard.md", "leaderboard.html": out / "leaderboard.html",
                  "report.json": out / "report.json"})
    return paths, a


def _csv(path: Path, df: pd.DataFrame) -> None:
    write_csv(path, df.to_dict("records"), list(df.columns))


def _report_json(a: Analysis, summary: pd.DataFrame) -> dict[str, Any]:
    f = a.friedman
    return {"suite": a.results.suite, "tasks": a.results.tasks, "encoders": a.results.encoders,
            "n_complete_tasks": 0 if a.ranks is None else len(a.ranks),
            "gaps": [{"task": t, "encoder": e} for t, e in a.gaps], "problems": a.results.problems,
            "summary": summary.replace({np.nan: None}).to_dict("records"),
            "friedman": None if f is None else f.__dict__, "alpha": a.alpha, "nemenyi_cd": a.cd,
            "not_significantly_different": a.groups, "reference": a.reference,
            "tasks_won_rule": "ties for first: every tied encoder gets the win (tasks_won); tasks_won_shared "
                              "splits it equally", "notes": a.notes}


def report_command(args: Any) -> int:
    """`gpfm arena report`: write the leaderboard; exit 1 when results were missing or unreadable."""
    paths, a = write_report(args.run_dir, args.out, alpha=args.alpha, n_boot=args.n_boot, seed=args.seed,
                            reference=args.reference, holm=args.holm, all_pairs=args.all_pairs)
    for p in a.results.problems:
        print(f"gpfm arena report: skipped {p}")
    for t, e in a.gaps:
        print(f"gpfm arena report: missing result {t}/{e}")
    for n in a.notes:
        log.info(n)
    print(f"leaderboard: {paths['leaderboard.html']}")
    return 1 if (a.gaps or a.results.problems) else 0
