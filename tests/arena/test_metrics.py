"""Our metrics equal scikit-learn's and scikit-survival's; the vectorised bootstrap equals the plain loop."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
from sksurv.metrics import concordance_index_censored

from gpfm.arena import metrics as M
from gpfm.io import GpfmError


def _cls_df(rng, n=240, n_cls=3, rounding=2):
    y = rng.integers(0, n_cls, n)
    p = rng.dirichlet(np.ones(n_cls), n) + 0.6 * np.eye(n_cls)[y]
    p = np.round(p / p.sum(1, keepdims=True), rounding)  # rounding creates tied scores
    p[:, -1] = 1 - p[:, :-1].sum(1)
    pred = np.where(rng.random(n) < 0.3, rng.integers(0, n_cls, n), p.argmax(1))
    return pd.DataFrame({"label": y, "pred": pred, **{f"prob_{k}": p[:, k] for k in range(n_cls)}})


@pytest.mark.parametrize("n_cls", [2, 3, 5])
def test_classification_metrics_equal_sklearn(n_cls):
    df = _cls_df(np.random.default_rng(n_cls), n_cls=n_cls)
    y, p = df["label"].to_numpy(), df[M.prob_columns(df)].to_numpy()
    ref_auc = roc_auc_score(y, p[:, 1]) if n_cls == 2 else roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert M.auc(df) == pytest.approx(ref_auc, abs=1e-12)
    assert M.balanced_accuracy(df) == pytest.approx(balanced_accuracy_score(y, df["pred"]), abs=1e-12)
    assert M.macro_f1(df) == pytest.approx(f1_score(y, df["pred"], average="macro"), abs=1e-12)


def test_c_index_equals_sksurv_with_ties():
    rng = np.random.default_rng(0)
    n = 150
    time = np.round(rng.exponential(10, n))  # tied times
    event = rng.random(n) < 0.6
    risk = np.round(rng.normal(size=n), 1)  # tied risks
    df = pd.DataFrame({"time": time, "event": event.astype(int), "risk": risk})
    assert M.c_index(df) == pytest.approx(concordance_index_censored(event, time, risk)[0], abs=1e-12)


@pytest.mark.parametrize("name", ["auc", "balanced_accuracy", "macro_f1", "accuracy", "c_index"])
def test_vectorised_resamples_equal_the_loop(name):
    rng = np.random.default_rng(1)
    df = _cls_df(rng, n=120, n_cls=3)
    df["time"], df["event"], df["risk"] = np.round(rng.exponential(5, 120)), rng.integers(0, 2, 120), df["prob_1"]
    idx = M.bootstrap_indices(len(df), 40, seed=3)
    fast = M.metric_on_resamples(name, df, idx)
    m = M.get_metric(name)
    slow = np.array([m.fn(df.iloc[i].reset_index(drop=True)) for i in idx])
    np.testing.assert_allclose(fast, slow, atol=1e-12)
    np.testing.assert_allclose(m.batch_fn(df, M.resample_counts(idx, len(df))), slow, atol=1e-12)  # counts API


def test_bootstrap_summary_and_determinism():
    df = _cls_df(np.random.default_rng(2), n=300, n_cls=2)
    a = M.bootstrap("auc", df, n_boot=500, seed=7)
    b = M.bootstrap("auc", df, n_boot=500, seed=7)
    c = M.bootstrap("auc", df, n_boot=500, seed=8)
    assert a == b and a != c
    assert set(a) == {"value", "mean", "std", "ci_low", "ci_high"}
    assert a["ci_low"] < a["value"] < a["ci_high"] and 0 < a["std"] < 0.1
    assert abs(a["mean"] - a["value"]) < 0.01
    allm = M.bootstrap_all(["auc", "macro_f1"], df, 500, 7)
    assert allm["auc"] == a  # same resamples for every metric


def test_undefined_resamples_are_nan_and_left_out():
    df = pd.DataFrame({"label": [0, 0, 0, 1], "pred": [0, 0, 0, 1], "prob_0": [.9, .8, .7, .2],
                       "prob_1": [.1, .2, .3, .8]})
    idx = np.array([[0, 1, 2, 0], [0, 1, 2, 3]])
    v = M.metric_on_resamples("auc", df, idx)
    assert np.isnan(v[0]) and v[1] == 1.0
    assert M.summarize(v, 1.0)["mean"] == 1.0


def test_registry():
    with pytest.raises(GpfmError, match="unknown metric"):
        M.get_metric("nope")
    with pytest.raises(GpfmError, match="already registered"):
        M.register_metric("auc", lambda df: 0.0)
    m = M.register_metric("test_mean_risk", lambda df: float(df["risk"].mean()), higher_is_better=False)
    assert M.get_metric("test_mean_risk") is m and not m.higher_is_better
    df = pd.DataFrame({"risk": np.arange(10.0)})
    r = M.bootstrap("test_mean_risk", df, n_boot=200, seed=0)  # no batch_fn: the plain loop path
    assert r["value"] == 4.5 and 3 < r["mean"] < 6
