"""Survival handler: planted risk gives C-index >= 0.7, shuffled ~0.5; losses; event convention; patients."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from gpfm.arena import survival as SV
from gpfm.arena.tasks import task_from_dict
from gpfm.io import GpfmError

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = {"hidden": 64, "attn_hidden": 32, "epochs": 10, "lr": 2e-3, "min_epochs": 6, "patience": 4, "n_boot": 200}


def _task(cohort, labels=None, split=None, **settings):
    return task_from_dict({"name": "surv", "category": "survival", "labels": str(labels or cohort["surv"]),
                           "split": split or {"protocol": "kfold", "k": 3, "val_fraction": 0.15},
                           "settings": {**FAST, **settings}}, cohort["root"])


def _mean_c_index(task, cohort, folds=2):
    data = SV.load(task, cohort["features"] / "enc_a")
    splits = SV.make_folds(task, data, 0)[:folds]
    return data, [SV.run_fold(task, data, s, 0, "cpu") for s in splits]


def test_planted_risk_is_learnt(slide_cohort):
    cohort = slide_cohort(n_cases=90)
    data, res = _mean_c_index(_task(cohort), cohort)
    assert np.mean([r.metrics["c_index"]["value"] for r in res]) >= 0.7
    p = res[0].predictions
    assert list(p.columns) == ["sample_id", "case_id", "time", "event", "risk"]
    # one sample per patient: patients with two slides pooled into one bag
    assert data.samples["sample_id"].is_unique and (data.samples["n_slides"] == 2).sum() > 0
    first = data.samples.loc[data.samples["n_slides"] == 2, "sample_id"].iloc[0]
    n_tiles = sum(len(SV.BagStore(cohort["features"] / "enc_a", [f"{first}-S{s}"])[f"{first}-S{s}"])
                  for s in (0, 1))
    assert len(data.features[first]) == n_tiles
    assert len(res[0].info["time_cuts"]) == 3  # 4 bins


def test_shuffled_times_give_chance(slide_cohort, tmp_path):
    cohort = slide_cohort(n_cases=90)
    df = pd.read_csv(cohort["surv"])
    per_case = df.groupby("case_id")[["time", "event"]].first()
    perm = np.random.default_rng(0).permutation(len(per_case))
    shuffled = per_case.iloc[perm].set_axis(per_case.index)
    df[["time", "event"]] = shuffled.loc[df["case_id"]].to_numpy()
    df.to_csv(tmp_path / "shuffled.csv", index=False)
    _, res = _mean_c_index(_task(cohort, tmp_path / "shuffled.csv", epochs=6), cohort, folds=3)
    assert 0.35 <= np.mean([r.metrics["c_index"]["value"] for r in res]) <= 0.65


def test_cox_option_runs(slide_cohort):
    cohort = slide_cohort(n_cases=45)
    task = _task(cohort, loss="cox", batch_size=8, epochs=4)
    data, (res,) = _mean_c_index(task, cohort, folds=1)
    assert np.isfinite(res.metrics["c_index"]["value"])
    with pytest.raises(GpfmError, match="batch_size >= 2"):
        SV.validate(_task(cohort, loss="cox"))


def test_nll_loss_matches_formula():
    logits = torch.tensor([[0.2, -1.0, 0.5, 0.0], [1.0, 0.3, -0.2, 0.1]])
    h = torch.sigmoid(logits)
    s = torch.cumprod(1 - h, 1)
    # patient 0: event in bin 2; patient 1: censored in bin 1
    ev = -(torch.log(s[0, 1]) + torch.log(h[0, 2]))
    ce = -torch.log(s[1, 1])
    for alpha in (0.0, 0.4):
        want = ((1 - alpha) * (ev + ce) + alpha * ev) / 2
        got = SV.nll_loss(logits, torch.tensor([2, 1]), torch.tensor([1, 0]), alpha)
        torch.testing.assert_close(got, want)
    risk = SV.risk_from_logits(logits)
    torch.testing.assert_close(risk, -s.sum(1))


def test_cox_loss_matches_formula():
    r = torch.tensor([0.5, -0.2, 1.0, 0.1])
    t = torch.tensor([5.0, 3.0, 3.0, 8.0])
    e = torch.tensor([1, 1, 0, 1])
    terms = []
    for i in range(4):
        if e[i]:
            terms.append(r[i] - torch.log(torch.exp(r[t >= t[i]]).sum()))
    torch.testing.assert_close(SV.cox_loss(r, t, e), -torch.stack(terms).mean())


def test_bins_use_observed_event_times():
    t = np.array([1, 2, 3, 4, 5, 6, 7, 8, 100, 200.0])
    e = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    cuts = SV.time_bins(t, e, 4)
    np.testing.assert_allclose(cuts, np.quantile(t[:8], [0.25, 0.5, 0.75]))
    assert SV.discretize(np.array([0.5, cuts[0], 7.9, 500]), cuts).tolist() == [0, 1, 3, 3]


def test_event_convention(slide_cohort, tmp_path, caplog):
    cohort = slide_cohort(n_cases=60)
    df = pd.read_csv(cohort["surv"])
    df.rename(columns={"event": "censorship"}).assign(censorship=1 - df["event"]).to_csv(
        tmp_path / "cens.csv", index=False)
    with pytest.raises(GpfmError, match="cens.csv: has 'censorship' but no 'event'"):
        SV.load(_task(cohort, tmp_path / "cens.csv"), cohort["features"] / "enc_a")
    # an inverted column: long follow-ups flagged as events -> warning; the correct one -> none
    inv = df.copy()
    inv["event"] = (inv["time"] > inv["time"].median()).astype(int)
    inv.to_csv(tmp_path / "inv.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="gpfm.arena"):
        SV.load(_task(cohort), cohort["features"] / "enc_a")
        assert "looks inverted" not in caplog.text
        SV.load(_task(cohort, tmp_path / "inv.csv"), cohort["features"] / "enc_a")
    assert "looks inverted" in caplog.text
    bad = df.copy()
    bad.loc[0, "event"] = 2
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(GpfmError, match="event must be 0 or 1"):
        SV.load(_task(cohort, tmp_path / "bad.csv"), cohort["features"] / "enc_a")
    conflict = df.copy()
    two = conflict["case_id"].value_counts().index[0]
    conflict.loc[conflict["case_id"] == two, "time"] = [1.0, 2.0]
    conflict.to_csv(tmp_path / "conflict.csv", index=False)
    with pytest.raises(GpfmError, match=f"case '{two}' has slides with different time/event"):
        SV.load(_task(cohort, tmp_path / "conflict.csv"), cohort["features"] / "enc_a")
