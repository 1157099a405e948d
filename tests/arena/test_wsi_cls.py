"""WSI classification handler: planted signal is learnt (AUC >= 0.9), shuffled labels are not; bad input."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from gpfm.arena import wsi_cls
from gpfm.arena.tasks import task_from_dict
from gpfm.io import GpfmError

from .conftest import write_bag

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = {"hidden": 64, "attn_hidden": 32, "epochs": 12, "lr": 1e-3, "min_epochs": 4, "patience": 4, "n_boot": 200}


def _task(cohort, labels=None, split=None, **settings):
    return task_from_dict({"name": "cls", "category": "wsi_classification", "labels": str(labels or cohort["cls"]),
                           "split": split or {"protocol": "holdout", "ratios": [0.6, 0.1, 0.3]},
                           "settings": {**FAST, **settings}}, cohort["root"])


def _run(task, cohort, seed=0):
    data = wsi_cls.load(task, cohort["features"] / "enc_a")
    (split,) = wsi_cls.make_folds(task, data, seed)
    return data, split, wsi_cls.run_fold(task, data, split, seed, "cpu")


def test_planted_signal_is_learnt_and_deterministic(slide_cohort):
    cohort = slide_cohort(n_cases=90)
    task = _task(cohort)
    data, split, res = _run(task, cohort)
    assert res.metrics["auc"]["value"] >= 0.9
    for name in wsi_cls.METRICS:
        m = res.metrics[name]
        assert set(m) == {"value", "mean", "std", "ci_low", "ci_high"} and m["ci_low"] <= m["ci_high"]
    p = res.predictions
    assert list(p.columns[:5]) == ["sample_id", "case_id", "label", "pred", "prob_0"]
    assert set(p["sample_id"]) == set(split.test) and np.allclose(p[["prob_0", "prob_1"]].sum(1), 1, atol=1e-5)
    assert res.info["classes"] == ["class0", "class1"] and res.info["best_epoch"] >= 0
    _, _, again = _run(task, cohort)  # same seed -> identical predictions and metrics
    pd.testing.assert_frame_equal(again.predictions, p)
    assert again.metrics == res.metrics


def test_shuffled_labels_stay_near_chance(slide_cohort, tmp_path):
    cohort = slide_cohort(n_cases=90)
    df = pd.read_csv(cohort["cls"])
    case_label = df.groupby("case_id")["label"].first()
    shuffled = dict(zip(case_label.index, np.random.default_rng(0).permutation(case_label.to_numpy())))
    df["label"] = df["case_id"].map(shuffled)
    df.to_csv(tmp_path / "shuffled.csv", index=False)
    task = _task(cohort, tmp_path / "shuffled.csv", {"protocol": "monte_carlo", "k": 3, "ratios": [0.5, 0.1, 0.4]},
                 epochs=8, hidden=32)
    data = wsi_cls.load(task, cohort["features"] / "enc_a")
    aucs = [wsi_cls.run_fold(task, data, s, 0, "cpu").metrics["auc"]["value"] for s in wsi_cls.make_folds(task, data, 0)]
    assert 0.3 <= np.mean(aucs) <= 0.7 and max(aucs) < 0.8


def test_missing_features_are_excluded_counted_and_warned(slide_cohort, caplog):
    cohort = slide_cohort(n_cases=20)
    gone = ["P001-S0", "P002-S0"]
    for s in gone:
        (cohort["features"] / "enc_a" / f"{s}.h5").unlink()
    with caplog.at_level(logging.WARNING, logger="gpfm.arena"):
        data = wsi_cls.load(_task(cohort), cohort["features"] / "enc_a")
    assert data.excluded == {"no features file": gone}
    assert len(data.samples) == len(data.labelled) - 2 and not set(gone) & set(data.samples["sample_id"])
    assert "2 labelled slide(s) excluded" in caplog.text


def test_bad_inputs(slide_cohort, tmp_path):
    cohort = slide_cohort(n_cases=20)
    pd.read_csv(cohort["cls"]).drop(columns="case_id").to_csv(tmp_path / "nocase.csv", index=False)
    with pytest.raises(GpfmError, match="nocase.csv: missing column 'case_id'"):
        wsi_cls.load(_task(cohort, tmp_path / "nocase.csv"), cohort["features"] / "enc_a")
    enc = cohort["features"] / "enc_a"
    x = np.random.default_rng(0).normal(size=(10, cohort["dim"])).astype(np.float32)
    x[3, 2] = np.nan
    write_bag(enc / "P003-S0.h5", x)
    with pytest.raises(GpfmError, match="P003-S0.h5: features contain NaN"):
        wsi_cls.load(_task(cohort), enc)
    write_bag(enc / "P003-S0.h5", np.zeros((10, cohort["dim"] + 1), np.float32))
    with pytest.raises(GpfmError, match=r"P003-S0.h5: feature dim 17 differs from the 16"):
        wsi_cls.load(_task(cohort), enc)
    write_bag(enc / "P003-S0.h5", np.zeros((10, cohort["dim"]), np.float32))
    with pytest.raises(GpfmError, match="unknown config key 'cls.settings.epoch'"):
        wsi_cls.validate(_task(cohort, epoch=3))


def test_class_too_small_for_folds(slide_cohort, tmp_path):
    cohort = slide_cohort(n_cases=30)
    df = pd.read_csv(cohort["cls"])
    df.loc[df["case_id"].isin(["P000", "P002"]), "label"] = "rare"
    df.to_csv(tmp_path / "rare.csv", index=False)
    task = _task(cohort, tmp_path / "rare.csv", {"protocol": "monte_carlo", "k": 10})
    data = wsi_cls.load(task, cohort["features"] / "enc_a")
    with pytest.raises(GpfmError, match=r"class 'rare' has 2 case\(s\) but .* needs at least 3"):
        wsi_cls.make_folds(task, data, 0)


def test_external_cohort_three_classes(slide_cohort, tmp_path):
    """Train on the internal cohort, test on every slide of the external one (own label table and features)."""
    cohort = slide_cohort(n_cases=45, n_classes=3)
    df = pd.read_csv(cohort["cls"])
    ext = df["case_id"].str[1:].astype(int) >= 33
    df[~ext].to_csv(tmp_path / "internal.csv", index=False)
    df[ext].to_csv(tmp_path / "external.csv", index=False)
    ext_dir = tmp_path / "ext_features" / "enc_a"
    ext_dir.mkdir(parents=True)
    for sid in df.loc[ext, "slide_id"]:
        (cohort["features"] / "enc_a" / f"{sid}.h5").rename(ext_dir / f"{sid}.h5")
    task = task_from_dict({"name": "ext", "category": "wsi_classification", "labels": "internal.csv",
                           "external": {"labels": "external.csv", "features": str(tmp_path / "ext_features" /
                                                                                 "{encoder}")},
                           "settings": {**FAST, "epochs": 3}}, tmp_path)
    assert task.split["protocol"] == "external"
    data = wsi_cls.load(task, cohort["features"] / "enc_a", task.external_features_dir(cohort["features"], "enc_a"))
    assert not data.excluded and (data.samples["cohort"] == "external").sum() == ext.sum()
    (split,) = wsi_cls.make_folds(task, data, 0)
    assert set(split.test) == set(df.loc[ext, "slide_id"]) and split.val
    res = wsi_cls.run_fold(task, data, split, 0, "cpu")
    assert list(res.predictions.columns[-3:]) == ["prob_0", "prob_1", "prob_2"]
    assert res.info["classes"] == ["class0", "class1", "class2"] and np.isfinite(res.metrics["auc"]["value"])
