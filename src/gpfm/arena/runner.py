"""The arena runner: every (task, encoder, fold) job of a suite, resumable, shardable, with results on disk.

Handler interface
-----------------
Each task category has one handler module, found through `HANDLERS` ({category: module path}). It provides

    load(task: TaskSpec, features_dir: Path, external_dir: Path | None = None) -> TaskData
        Read labels + features for one encoder, validated: bad input raises GpfmError naming the file and the
        fix; labelled samples without features are dropped, counted in TaskData.excluded and warned about.
        `external_dir` is the features folder of task.external (None when the task has none).
    make_folds(task: TaskSpec, data: TaskData, seed: int) -> list[Split]
        Normally `gpfm.arena.splits.make_splits(task.split, data.split_table, seed, task.base_dir)`. Splits
        must not depend on the encoder (they are built from `data.labelled`, saved once per task, and shared by
        all encoders so predictions pair up for statistics).
    run_fold(task: TaskSpec, data: TaskData, split: Split, seed: int, device: str) -> FoldResult
        Train on split.train, select on split.val, predict split.test. The runner has already restricted the
        split to data.samples. Derive the fold's RNG seed from (seed, split.fold). FoldResult.metrics holds
        {metric: {"value","mean","std","ci_low","ci_high"}} (use gpfm.arena.metrics.bootstrap_all) and must
        include task.primary_metric; FoldResult.predictions has one row per test sample with `sample_id`.
    validate(task: TaskSpec) -> None                              (optional)
        Check task.settings before any job runs (use gpfm.config.from_dict on a settings dataclass).

Result layout (under --out)
---------------------------
    run.json                                  suite, encoders, tasks, seed, status ("complete" / "incomplete")
    <task>/splits/fold_<k>.csv                sample_id, case_id, partition (train / val / test)
    <task>/<encoder>/fold_<k>/predictions.csv sample_id, fold, + category columns (classification: case_id,
                                              label, pred, prob_<c>; survival: case_id, time, event, risk)
    <task>/<encoder>/fold_<k>/metrics.json    task, category, encoder, fold, primary_metric, higher_is_better,
                                              metrics {name: {value, mean, std, ci_low, ci_high}}, n_train,
                                              n_val, n_test, seconds, seed, spec_fingerprint, info {...}
    <task>/<encoder>/result.json              aggregate over folds: metrics {name: {value (mean of fold values),
                                              std (across folds; bootstrap std when one fold), ci_low, ci_high,
                                              folds [per-fold values]}}, n_folds, ...
    <task>/summary.csv                        one row per encoder: primary metric value/std/CI + every metric

A fold is finished when its metrics.json exists (written last, atomically), so a killed run re-run with the same
arguments redoes only the unfinished folds. Jobs are sharded over torchrun/SLURM ranks (gpfm.dist.shard) and
SLURM array tasks (SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT); any process that sees a (task, encoder) complete
writes its result.json and summary.csv.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from gpfm import __version__
from gpfm.arena.metrics import get_metric
from gpfm.arena.splits import Split, check_no_leakage, load_splits, n_folds, save_splits
from gpfm.arena.tasks import Suite, TaskSpec, load_suite
from gpfm.io import BatchReport, GpfmError, ensure_writable_dir, progress, read_json, write_json, write_text

log = logging.getLogger("gpfm.arena")

HANDLERS: dict[str, str] = {
    "wsi_classification": "gpfm.arena.wsi_cls",
    "survival": "gpfm.arena.survival",
    "roi_classification": "gpfm.arena.roi",
    "retrieval": "gpfm.arena.retrieval",
    "vqa": "gpfm.arena.vqa",
    "report_generation": "gpfm.arena.report_gen",
}


@dataclass
class TaskData:
    """One task's validated data for one encoder.

    samples: one row per usable sample (features present): `sample_id` (unique), `case_id`, `cohort`
        ("internal"/"external"), `stratum` (what splits stratify on), plus category columns (label, time, ...).
    features: handler-specific (e.g. {sample_id: (N, D) array} or a lazy bag store).
    dim: feature dimension of this encoder.
    labelled: every labelled sample before feature exclusion (sample_id, case_id, cohort, stratum[, split]);
        splits are made from it so they are the same for every encoder. None -> `samples` is used.
    excluded: {reason: [sample ids]} of labelled samples left out (already warned about).
    """

    samples: pd.DataFrame
    features: Any
    dim: int
    labelled: pd.DataFrame | None = None
    excluded: dict[str, list[str]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def split_table(self) -> pd.DataFrame:
        return self.labelled if self.labelled is not None else self.samples


@dataclass
class FoldResult:
    """What a handler returns for one fold: test predictions, bootstrapped metrics and free-form info."""

    predictions: pd.DataFrame
    metrics: dict[str, dict[str, float]]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    task: TaskSpec
    encoder: str
    fold: int

    @property
    def name(self) -> str:
        return f"{self.task.name}/{self.encoder}/fold_{self.fold}"


def get_handler(category: str) -> ModuleType:
    """Import the handler module of a category (clear error when it is not available)."""
    if category not in HANDLERS:
        raise GpfmError(f"no arena handler for category '{category}' (have: {', '.join(HANDLERS)})")
    try:
        return importlib.import_module(HANDLERS[category])
    except ModuleNotFoundError as e:
        if e.name == HANDLERS[category]:
            raise GpfmError(f"category '{category}' is not available in this install ({HANDLERS[category]} "
                            "missing)") from e
        raise


def fold_dir(out: Path, task: str, encoder: str, fold: int) -> Path:
    return Path(out) / task / encoder / f"fold_{fold}"


# ----------------------------------------------------------------------------------------------- sharding
def shard_jobs(jobs: Sequence[Job]) -> list[Job]:
    """This process's jobs: split over a SLURM array first, then over torchrun/SLURM ranks."""
    from gpfm.dist import shard

    e = os.environ
    if "SLURM_ARRAY_TASK_ID" in e and "SLURM_ARRAY_TASK_COUNT" in e:
        idx = int(e["SLURM_ARRAY_TASK_ID"]) - int(e.get("SLURM_ARRAY_TASK_MIN", 0))
        jobs = shard(jobs, idx, int(e["SLURM_ARRAY_TASK_COUNT"]))
    return shard(jobs)


# ---------------------------------------------------------------------------------------------- the run
def _job_status(job: Job, out: Path, seed: int, overwrite: bool) -> str:
    """'done' (skip), 'todo'; error when an old result was made with another spec or seed."""
    m = fold_dir(out, job.task.name, job.encoder, job.fold) / "metrics.json"
    if overwrite or not m.is_file():
        return "todo"
    old = read_json(m)
    if old.get("spec_fingerprint") != job.task.fingerprint() or old.get("seed") != seed:
        raise GpfmError(f"{m}: made with a different task spec or seed; pass --overwrite to redo it "
                        "or choose a new --out")
    return "done"


def _task_splits(task: TaskSpec, handler: ModuleType, data: TaskData, seed: int, out: Path,
                 overwrite: bool = False) -> list[Split]:
    """Make the task's splits, check them against the saved ones (resume), save them when new."""
    splits = handler.make_folds(task, data, seed)
    for s in splits:
        check_no_leakage(s, data.split_table, f"task {task.name}")
    folder = out / task.name / "splits"
    saved = load_splits(folder)
    if saved and saved != splits and not overwrite:
        raise GpfmError(f"{folder}: saved splits differ from the ones the labels give now (labels changed?); "
                        "use a new --out or --overwrite")
    if saved != splits:
        save_splits(splits, data.split_table, folder, write_text=write_shared)
    return splits


def run_job(job: Job, handler: ModuleType, data: TaskData, split: Split, out: Path, seed: int,
            device: str) -> dict[str, Any]:
    """Run one fold and write its predictions.csv then metrics.json (the 'finished' marker)."""
    task = job.task
    used = split.restrict(data.samples["sample_id"].astype(str))
    dropped = sum(map(len, split.partitions().values())) - sum(map(len, used.partitions().values()))
    if dropped:
        log.warning("%s: %d split sample(s) have no features for %s (left out)", job.name, dropped, job.encoder)
    if not used.train or not used.test:
        raise GpfmError(f"{job.name}: no training or test samples with features; check --features")
    t0 = time.perf_counter()
    res: FoldResult = handler.run_fold(task, data, used, seed, device)
    seconds = time.perf_counter() - t0
    pred = res.predictions.copy()
    if "sample_id" not in pred.columns or pred["sample_id"].duplicated().any():
        raise GpfmError(f"{job.name}: handler predictions need a unique sample_id column")
    if "fold" not in pred.columns:
        pred.insert(1, "fold", job.fold)
    if task.primary_metric not in res.metrics:
        raise GpfmError(f"task {task.name}: primary_metric '{task.primary_metric}' is not among its metrics "
                        f"({', '.join(res.metrics)}); fix primary_metric in {task.source}")
    d = fold_dir(out, task.name, job.encoder, job.fold)
    write_text(d / "predictions.csv", pred.to_csv(index=False, float_format="%.9g"))  # float32 round-trips
    record = {"task": task.name, "category": task.category, "encoder": job.encoder, "fold": job.fold,
              "primary_metric": task.primary_metric,
              "higher_is_better": get_metric(task.primary_metric).higher_is_better,
              "metrics": res.metrics, **used.sizes, "seconds": round(seconds, 3), "seed": seed,
              "spec_fingerprint": task.fingerprint(), "info": res.info}
    write_json(d / "metrics.json", record)
    return record


def aggregate(out: Path, task: TaskSpec, encoder: str, k: int) -> dict[str, Any] | None:
    """result.json from the k fold metrics (None while any fold is missing)."""
    files = [fold_dir(out, task.name, encoder, i) / "metrics.json" for i in range(k)]
    if not all(f.is_file() for f in files):
        return None
    folds = [read_json(f) for f in files]
    metrics = {}
    for name in folds[0]["metrics"]:
        vals = np.array([f["metrics"][name]["value"] for f in folds], float)
        if k == 1:
            one = folds[0]["metrics"][name]
            metrics[name] = {"value": one["value"], "std": one["std"], "ci_low": one["ci_low"],
                             "ci_high": one["ci_high"], "folds": vals.tolist()}
            continue
        ok = vals[np.isfinite(vals)]
        mean = float(ok.mean()) if len(ok) else math.nan
        std = float(ok.std(ddof=1)) if len(ok) > 1 else math.nan
        half = _t975(len(ok) - 1) * std / math.sqrt(len(ok)) if len(ok) > 1 else math.nan
        lo, hi = _metric_range(name, ok)
        metrics[name] = {"value": mean, "std": std, "ci_low": max(mean - half, lo), "ci_high": min(mean + half, hi),
                         "folds": vals.tolist()}
    result = {"task": task.name, "category": task.category, "encoder": encoder,
              "primary_metric": task.primary_metric, "higher_is_better": folds[0]["higher_is_better"],
              "n_folds": k, "metrics": metrics, "ci": "bootstrap 95% (one fold)" if k == 1 else
              "t 95% of the mean over folds, clipped to the metric's range", "seconds": round(sum(f["seconds"] for f in folds), 3),
              "meta": task.meta}
    write_shared(out / task.name / encoder / "result.json", _json(result))
    return result


def _metric_range(name: str, vals: np.ndarray) -> tuple[float, float]:
    """Where a metric can lie: all of ours are >= 0, and all but CIDEr <= 1 (a t-interval over few noisy folds
    can otherwise reach past the bounds)."""
    lo = 0.0 if len(vals) and vals.min() >= 0 else -math.inf
    hi = 1.0 if len(vals) and vals.max() <= 1 and name != "cider" else math.inf
    return lo, hi


def _t975(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def write_shared(path: str | Path, text: str) -> None:
    """Atomic write under a per-process temp name: several ranks may write the same shared file at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n"


def write_summary(out: Path, task: TaskSpec, encoders: Sequence[str]) -> None:
    """OUT/<task>/summary.csv: one row per encoder with a finished result.json."""
    rows = []
    for enc in encoders:
        f = out / task.name / enc / "result.json"
        if not f.is_file():
            continue
        r = read_json(f)
        p = r["metrics"][r["primary_metric"]]
        row = {"encoder": enc, "primary_metric": r["primary_metric"], "value": p["value"], "std": p["std"],
               "ci_low": p["ci_low"], "ci_high": p["ci_high"], "n_folds": r["n_folds"]}
        row.update({name: m["value"] for name, m in r["metrics"].items()})
        rows.append(row)
    if rows:
        write_shared(out / task.name / "summary.csv", pd.DataFrame(rows).to_csv(index=False, float_format="%.6g"))


def run_suite(suite: str | Path | Suite, features_root: str | Path, encoders: Sequence[str], out: str | Path,
              tasks: Sequence[str] | None = None, device: str = "cpu", seed: int = 0,
              variables: dict[str, str] | None = None, overrides: list[str] | None = None,
              overwrite: bool = False, quiet: bool = False) -> BatchReport:
    """Run (or resume) every job of this process's shard; returns the batch report (exit_code 1 on skips)."""
    suite = suite if isinstance(suite, Suite) else load_suite(suite, variables, overrides)
    selected = suite.select(list(tasks) if tasks else None)
    encoders = [e for e in dict.fromkeys(encoders) if e]
    if not encoders:
        raise GpfmError("--encoders: give at least one encoder name (comma-separated)")
    out = ensure_writable_dir(out)
    features_root = Path(features_root).resolve()
    device = _device(device)
    handlers = {}
    for t in selected:
        handlers[t.name] = get_handler(t.category)
        if hasattr(handlers[t.name], "validate"):
            handlers[t.name].validate(t)
        get_metric(t.primary_metric)
    report = BatchReport("arena")
    all_jobs = [Job(t, e, k) for t in selected for e in encoders for k in range(n_folds(t.split, t.base_dir))]
    todo = []
    for j in shard_jobs(all_jobs):
        if _job_status(j, out, seed, overwrite) == "todo":
            todo.append(j)
        else:
            report.add(j.name, "done")
    cache: dict[tuple[str, str], tuple[TaskData, list[Split]] | GpfmError] = {}
    bar = progress(total=len(todo), desc="arena", quiet=quiet, unit="fold")
    for job in todo:
        key = (job.task.name, job.encoder)
        try:
            if key not in cache:
                cache.clear()  # keep one encoder's features in memory at a time
                try:
                    h = handlers[job.task.name]
                    data = h.load(job.task, job.task.features_dir(features_root, job.encoder),
                                  job.task.external_features_dir(features_root, job.encoder))
                    cache[key] = (data, _task_splits(job.task, h, data, seed, out, overwrite))
                except GpfmError as e:
                    cache[key] = e
            if isinstance(cache[key], GpfmError):
                raise cache[key]
            data, splits = cache[key]
            rec = run_job(job, handlers[job.task.name], data, splits[job.fold], out, seed, device)
            p = rec["metrics"][job.task.primary_metric]
            report.add(job.name, "ok", metric=job.task.primary_metric, value=p["value"], seconds=rec["seconds"])
        except GpfmError as e:
            report.add(job.name, "skipped", error=str(e))
        bar.update(1)
    bar.close()
    _finish(out, suite, selected, encoders, seed, device, report)
    return report


def _finish(out: Path, suite: Suite, selected: list[TaskSpec], encoders: list[str], seed: int, device: str,
            report: BatchReport) -> None:
    status = {}
    for t in selected:
        k = n_folds(t.split, t.base_dir)
        for e in encoders:
            status[f"{t.name}/{e}"] = "complete" if aggregate(out, t, e, k) is not None else "incomplete"
        write_summary(out, t, encoders)
    write_shared(out / "run.json", _json({
        "suite": suite.name, "suite_path": str(suite.path) if suite.path else None, "encoders": encoders,
        "tasks": {t.name: {"category": t.category, "primary_metric": t.primary_metric, "split": t.split,
                           "source": t.source} for t in selected},
        "seed": seed, "device": device, "gpfm_version": __version__,
        "status": "complete" if all(v == "complete" for v in status.values()) else "incomplete",
        "jobs": status, "skipped": [r["item"] + ": " + r.get("error", "") for r in report.problems]}))


def _device(device: str) -> str:
    if device in ("auto", ""):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def run_command(args: Any) -> int:
    """`gpfm arena run`: parse the CLI namespace, run, print the summary line; exit code 0 / 1."""
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    variables = {}
    for item in args.var or []:
        if "=" not in item:
            raise GpfmError(f"--var '{item}' must look like name=VALUE")
        k, v = item.split("=", 1)
        variables[k.strip()] = str(Path(v).resolve()) if ("/" in v or v.startswith(".")) else v
    tasks = [t for t in (args.tasks or "").split(",") if t] or None
    report = run_suite(args.suite, args.features, args.encoders.split(","), args.out, tasks=tasks,
                       device=args.device, seed=args.seed, variables=variables, overrides=args.set,
                       overwrite=args.overwrite, quiet=args.quiet)
    report.write(Path(args.out) / f"jobs{_rank_suffix()}.csv")
    log.info(report.summary_line())
    for r in report.problems:
        print(f"gpfm arena: skipped {r['item']}: {r.get('error', '')}")
    return report.exit_code


def _rank_suffix() -> str:
    from gpfm.dist import env

    e = env()
    arr = os.environ.get("SLURM_ARRAY_TASK_ID")
    parts = ([f"array{arr}"] if arr is not None else []) + ([f"rank{e.rank}"] if e.is_distributed else [])
    return ("_" + "_".join(parts)) if parts else ""
