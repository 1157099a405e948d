"""The runner end to end through `gpfm arena run`: layout, resume, determinism, sharding, skipped tasks."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from gpfm.arena import runner, survival, wsi_cls
from gpfm.arena.metrics import get_metric
from gpfm.cli import main

from .conftest import write_bag

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"hidden": 16, "attn_hidden": 8, "epochs": 2, "min_epochs": 0, "n_boot": 50}


def _suite(cohort, tmp_path):
    spec = {"name": "unit", "tasks": [
        {"name": "cls", "category": "wsi_classification", "labels": str(cohort["cls"]),
         "split": {"protocol": "monte_carlo", "k": 2}, "settings": TINY},
        {"name": "surv", "category": "survival", "labels": str(cohort["surv"]),
         "split": {"protocol": "kfold", "k": 2}, "settings": TINY}]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _args(suite, cohort, out, *extra):
    return ["arena", "run", str(suite), "--features", str(cohort["features"]), "--encoders", "enc_a,enc_b",
            "--out", str(out), "--quiet", *extra]


@pytest.fixture
def counted(monkeypatch):
    """Count run_fold calls per (task, fold)."""
    calls = []
    for mod in (wsi_cls, survival):
        orig = mod.run_fold

        def wrapped(task, data, split, seed, device, _orig=orig):
            calls.append((task.name, split.fold))
            return _orig(task, data, split, seed, device)

        monkeypatch.setattr(mod, "run_fold", wrapped)
    return calls


def _metrics(out, task, enc, fold):
    m = json.loads((out / task / enc / f"fold_{fold}" / "metrics.json").read_text())
    m.pop("seconds")
    return m


def test_run_layout_resume_and_determinism(slide_cohort, tmp_path, counted):
    cohort = slide_cohort(n_cases=30, encoders=("enc_a", "enc_b"))
    suite, out = _suite(cohort, tmp_path), tmp_path / "out"
    assert main(_args(suite, cohort, out)) == 0
    assert len(counted) == 8  # 2 tasks x 2 encoders x 2 folds
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["encoders"] == ["enc_a", "enc_b"] and set(run["tasks"]) == {"cls", "surv"}
    m = _metrics(out, "cls", "enc_a", 1)
    assert {"task", "category", "encoder", "fold", "primary_metric", "higher_is_better", "metrics", "n_train",
            "n_val", "n_test"} <= set(m) and m["primary_metric"] == "auc" and m["higher_is_better"]
    assert set(m["metrics"]["auc"]) == {"value", "mean", "std", "ci_low", "ci_high"}
    res = json.loads((out / "surv" / "enc_b" / "result.json").read_text())
    folds = [_metrics(out, "surv", "enc_b", k)["metrics"]["c_index"]["value"] for k in (0, 1)]
    assert res["n_folds"] == 2 and res["metrics"]["c_index"]["value"] == pytest.approx(np.mean(folds))
    summary = pd.read_csv(out / "cls" / "summary.csv")
    assert summary["encoder"].tolist() == ["enc_a", "enc_b"] and (summary["primary_metric"] == "auc").all()
    splits = pd.read_csv(out / "cls" / "splits" / "fold_0.csv")
    assert set(splits["partition"]) == {"train", "val", "test"}
    pa = pd.read_csv(out / "cls" / "enc_a" / "fold_0" / "predictions.csv")
    pb = pd.read_csv(out / "cls" / "enc_b" / "fold_0" / "predictions.csv")
    assert pa["sample_id"].tolist() == pb["sample_id"].tolist()  # same split for every encoder: pairs up
    assert set(pa["sample_id"]) == set(splits.loc[splits["partition"] == "test", "sample_id"])
    saved = _metrics(out, "cls", "enc_a", 0)["metrics"]
    for name in ("auc", "balanced_accuracy", "macro_f1"):  # predictions.csv reproduces the stored metrics
        assert get_metric(name).fn(pa) == pytest.approx(saved[name]["value"], abs=1e-12)
    # kill simulation: one fold lost its metrics (died mid-write, a .tmp left behind); re-run redoes only it
    before = _metrics(out, "cls", "enc_b", 1)
    (out / "cls" / "enc_b" / "fold_1" / "metrics.json").unlink()
    (out / "cls" / "enc_b" / "fold_1" / "metrics.json.tmp").write_text("{half")
    (out / "cls" / "enc_b" / "result.json").unlink()
    counted.clear()
    assert main(_args(suite, cohort, out)) == 0
    assert counted == [("cls", 1)]
    assert _metrics(out, "cls", "enc_b", 1) == before  # same seed -> identical metrics
    assert (out / "cls" / "enc_b" / "result.json").is_file()
    # a finished run with another seed refuses to mix results
    assert main(_args(suite, cohort, out, "--seed", "1")) == 2
    # a fresh run with the same seed gives identical splits and metrics
    counted.clear()
    assert main(_args(suite, cohort, tmp_path / "again", "--tasks", "cls")) == 0
    for k in (0, 1):
        assert _metrics(tmp_path / "again", "cls", "enc_a", k) == _metrics(out, "cls", "enc_a", k)
        assert (tmp_path / "again" / "cls" / "splits" / f"fold_{k}.csv").read_text() == \
            (out / "cls" / "splits" / f"fold_{k}.csv").read_text()


def test_shards_cover_every_job_once(slide_cohort, tmp_path, counted, monkeypatch):
    cohort = slide_cohort(n_cases=24, encoders=("enc_a", "enc_b"))
    suite, out = _suite(cohort, tmp_path), tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        assert main(_args(suite, cohort, out, "--tasks", "cls")) == 0
    assert sorted(counted) == sorted([("cls", 0), ("cls", 1)] * 2) and len(counted) == 4
    assert json.loads((out / "run.json").read_text())["status"] == "complete"  # the last rank saw all folds
    assert {p.name for p in out.glob("jobs*.csv")} == {"jobs_rank0.csv", "jobs_rank1.csv"}


def test_slurm_array_sharding(monkeypatch):
    jobs = list(range(10))
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert runner.shard_jobs(jobs) == [2, 5, 8]


def test_bad_task_skipped_others_run(slide_cohort, tmp_path, capsys):
    cohort = slide_cohort(n_cases=24, encoders=("enc_a", "enc_b"))
    x = np.ones((8, cohort["dim"]), np.float32)
    x[0, 0] = np.inf
    write_bag(cohort["features"] / "enc_b" / "P005-S0.h5", x)
    (cohort["features"] / "enc_a" / "P006-S0.h5").unlink()  # excluded for enc_a only
    suite, out = _suite(cohort, tmp_path), tmp_path / "out"
    assert main(_args(suite, cohort, out)) == 1
    err = capsys.readouterr().err
    assert "task cls: 1 labelled slide(s) excluded (no features file" in err
    assert "task surv: 1 labelled patient(s) excluded (no slide with features" in err
    split = pd.read_csv(out / "cls" / "splits" / "fold_0.csv")  # splits come from the labels: P006-S0 is in
    m = _metrics(out, "cls", "enc_a", 0)
    assert "P006-S0" in set(split["sample_id"]) and m["n_train"] + m["n_val"] + m["n_test"] == len(split) - 1
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "incomplete"
    assert run["jobs"]["cls/enc_a"] == "complete" and run["jobs"]["cls/enc_b"] == "incomplete"
    assert all("P005-S0.h5: features contain NaN or inf" in s for s in run["skipped"]) and len(run["skipped"]) == 4
    assert pd.read_csv(out / "cls" / "summary.csv")["encoder"].tolist() == ["enc_a"]


def test_fold_interval_stays_inside_the_metric_range(tmp_path):
    """A t-interval over a few noisy folds is clipped to [0, 1] (CIDEr is unbounded above)."""
    from gpfm.arena.runner import aggregate, fold_dir
    from gpfm.arena.tasks import TaskSpec
    from gpfm.io import write_json

    task = TaskSpec(name="t", category="wsi_classification", labels=None, primary_metric="auc")
    for i, v in enumerate([0.98, 1.0, 0.3]):
        write_json(fold_dir(tmp_path, "t", "enc", i) / "metrics.json",
                   {"higher_is_better": True, "seconds": 1.0,
                    "metrics": {"auc": {"value": v}, "cider": {"value": v * 3}}})
    m = aggregate(tmp_path, task, "enc", 3)["metrics"]
    assert m["auc"]["ci_low"] == 0.0 and m["auc"]["ci_high"] == 1.0
    assert m["cider"]["ci_high"] > 3.0 and m["cider"]["ci_low"] == 0.0
