"""Statistics: ranks, Friedman/Nemenyi, paired bootstrap + Wilcoxon, Holm — against hand values and scipy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from gpfm.arena import stats
from gpfm.arena.metrics import bootstrap_indices
from gpfm.io import GpfmError


def _scores() -> pd.DataFrame:
    # t1: AUC (higher better) with a tie for first; t2: an error rate (lower better); t3: three-way tie.
    return pd.DataFrame({"A": [0.9, 0.10, 0.5], "B": [0.9, 0.30, 0.5], "C": [0.7, 0.20, 0.5], "D": [0.8, 0.40, 0.6]},
                        index=["t1", "t2", "t3"])


HIGHER = {"t1": True, "t2": False, "t3": True}


def test_ranks_with_ties_by_hand():
    r = stats.rank_table(_scores(), HIGHER)
    expected = pd.DataFrame({"A": [1.5, 1.0, 3.0], "B": [1.5, 3.0, 3.0], "C": [4.0, 2.0, 3.0],
                             "D": [3.0, 4.0, 1.0]}, index=["t1", "t2", "t3"])
    pd.testing.assert_frame_equal(r, expected)
    assert np.allclose(r.sum(axis=1), 4 * 5 / 2)  # ranks sum to k(k+1)/2
    avg = stats.average_ranks(r, {"t1": "x", "t2": "x", "t3": "y"})
    assert list(avg.index) == ["overall", "x", "y"]
    assert avg.loc["overall", "A"] == pytest.approx((1.5 + 1 + 3) / 3)
    assert avg.loc["x", "B"] == pytest.approx(2.25) and avg.loc["y", "D"] == 1.0


def test_tasks_won_tie_rules():
    r = stats.rank_table(_scores(), HIGHER)
    each = stats.tasks_won(r, ties="each")
    share = stats.tasks_won(r, ties="share")
    assert each.to_dict() == {"A": 2.0, "B": 1.0, "C": 0.0, "D": 1.0}
    assert share.to_dict() == {"A": 1.5, "B": 0.5, "C": 0.0, "D": 1.0}
    assert share.sum() == pytest.approx(3)
    with pytest.raises(GpfmError):
        stats.tasks_won(r, ties="first")


def test_complete_tasks_lists_gaps():
    s = _scores()
    s.loc["t2", "C"] = np.nan
    s.loc["t3", "A"] = np.nan
    kept, gaps = stats.complete_tasks(s)
    assert list(kept.index) == ["t1"] and gaps == [("t2", "C"), ("t3", "A")]
    with pytest.raises(GpfmError, match="complete"):
        stats.friedman(stats.rank_table(s, HIGHER))


def test_friedman_equals_scipy_with_and_without_ties():
    rng = np.random.default_rng(0)
    x = pd.DataFrame(rng.normal(size=(30, 5)) + np.arange(5) * 0.3, columns=list("abcde"))
    x.iloc[:6, 1] = x.iloc[:6, 0]  # ties
    x = x.round(1)
    for data in (x, x.round(0)):
        ours = stats.friedman(stats.rank_table(data, True))
        ref = sps.friedmanchisquare(*[data[c] for c in data.columns])
        assert ours.statistic == pytest.approx(ref.statistic, rel=1e-12)
        assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)
        # Iman-Davenport F from its formula.
        n, k = data.shape
        assert ours.iman_davenport_f == pytest.approx((n - 1) * ref.statistic / (n * (k - 1) - ref.statistic))


def test_nemenyi_q_table_and_cd_by_hand():
    # Demšar (2006) table 5, two-tailed Nemenyi (printed to 3 decimals, some truncated).
    q05 = {2: 1.960, 3: 2.343, 4: 2.569, 5: 2.728, 6: 2.850, 7: 2.949, 8: 3.031, 9: 3.102, 10: 3.164}
    q10 = {2: 1.645, 3: 2.052, 4: 2.291, 5: 2.459, 6: 2.589, 7: 2.693, 8: 2.780, 9: 2.855, 10: 2.920}
    for k, q in q05.items():
        assert stats.q_alpha(k, 0.05) == pytest.approx(q, abs=1e-3)
    for k, q in q10.items():
        assert stats.q_alpha(k, 0.10) == pytest.approx(q, abs=1e-3)
    # GPFM-METHOD §5.3: k=9, N=72: 3.102 * sqrt(90 / 432) = 1.4158.
    assert stats.nemenyi_cd(9, 72) == pytest.approx(3.102 * np.sqrt(9 * 10 / (6 * 72)), abs=1e-3)
    assert round(stats.nemenyi_cd(9, 72), 3) == 1.416
    assert stats.q_alpha(20, 0.05) > stats.q_alpha(19, 0.05)


def test_cliques_are_maximal_groups_within_cd():
    avg = {"a": 1.0, "b": 1.5, "c": 2.2, "d": 3.5, "e": 3.6, "f": 6.0}
    assert stats.cliques(avg, cd=1.45) == [["a", "b", "c"], ["c", "d", "e"]]
    assert stats.cliques(avg, cd=1.35) == [["a", "b", "c"], ["c", "d"], ["d", "e"]]
    assert stats.cliques(avg, cd=0.05) == []
    assert stats.cliques(avg, cd=10) == [["a", "b", "c", "d", "e", "f"]]


def test_wilcoxon_direction_and_scipy():
    rng = np.random.default_rng(1)
    b = rng.normal(0.8, 0.02, 200)
    a = b - np.abs(rng.normal(0.01, 0.01, 200))  # A systematically worse (higher is better)
    p = stats.wilcoxon_worse(a, b)
    assert p == pytest.approx(sps.wilcoxon(a, b, alternative="less", correction=False).pvalue)
    assert p < 1e-10
    assert stats.wilcoxon_worse(b, a) > 0.99
    # Lower-is-better metric: A's larger values are worse.
    assert stats.wilcoxon_worse(b, a, higher_is_better=False) < 1e-10
    assert stats.wilcoxon_worse(a, a.copy()) == 1.0


def test_holm_by_hand():
    p = [0.01, 0.04, 0.03, np.nan, 0.005]
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    out = stats.holm(p)
    assert np.allclose(out[[0, 1, 2, 4]], [0.03, 0.06, 0.06, 0.02]) and np.isnan(out[3])
    assert stats.holm([0.9, 0.8]).max() == 1.0


def test_paired_bootstrap_uses_the_same_resamples_and_detects_the_better_encoder():
    rng = np.random.default_rng(2)
    n = 120
    y = rng.integers(0, 2, n)
    def probs(noise: float) -> dict:
        p1 = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, noise, n))))
        return {"prob_0": 1 - p1, "prob_1": p1}

    good = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "label": y, **probs(0.6)})
    bad = good.assign(**probs(1.5)).sample(frac=1, random_state=0)  # worse, and in another row order
    extra = pd.DataFrame({"sample_id": ["only_here"], "label": [1], "prob_0": [0.5], "prob_1": [0.5]})
    bad = pd.concat([bad, extra], ignore_index=True)
    boot = stats.paired_bootstrap({"good": good, "bad": bad}, "auc", n_boot=200, seed=0)
    assert boot.shape == (200, 2)
    # Resample 0 by hand: the aligned (sorted by sample_id) rows drawn by metrics.bootstrap_indices.
    idx0 = bootstrap_indices(n, 200, 0)[0]
    ordered = good.assign(key=good["sample_id"]).sort_values("key").reset_index(drop=True)
    assert boot["good"].iloc[0] == pytest.approx(roc_auc_score(ordered["label"][idx0], ordered["prob_1"][idx0]))
    # The same resample on identical predictions gives identical values: alignment and indices are shared.
    same = stats.paired_bootstrap({"x": good, "y": good.sample(frac=1, random_state=1)}, "auc", n_boot=50)
    assert np.array_equal(same["x"], same["y"])
    pv = stats.pairwise_pvalues(boot, reference="good", adjust=True)
    assert list(pv["encoder_a"]) == ["bad"] and pv["p"].iloc[0] < 1e-6 and "p_holm" in pv
    pv_all = stats.pairwise_pvalues(boot)
    assert pv_all.set_index(["encoder_a", "encoder_b"]).loc[("good", "bad"), "p"] > 0.99
    with pytest.raises(GpfmError, match="sample_id"):
        stats.paired_bootstrap({"a": good.drop(columns="sample_id"), "b": good}, "auc")


def test_folds_keep_repeated_sample_ids_apart():
    df = pd.DataFrame({"sample_id": ["s1", "s2", "s1", "s2"], "fold": [0, 0, 1, 1], "v": [1, 2, 3, 4]})
    out = stats.align_predictions({"a": df, "b": df.iloc[::-1]})
    assert list(out["a"]["v"]) == list(out["b"]["v"]) == [1, 2, 3, 4]


def test_across_tasks_and_average_metric():
    rng = np.random.default_rng(3)
    base = rng.uniform(0.6, 0.9, 25)
    s = pd.DataFrame({"A": base + 0.02, "B": base}, index=[f"t{i}" for i in range(25)])
    higher = pd.Series(True, index=s.index)
    higher.iloc[:5] = False  # five error-rate tasks: there A's larger value is worse
    s.iloc[:5, 0] = base[:5] - 0.02
    assert stats.across_tasks_pvalue(s, higher, "B", "A") < 1e-4
    assert stats.across_tasks_pvalue(s, higher, "A", "B") > 0.99
    o = stats.oriented(s, higher)
    assert stats.across_tasks_pvalue(s, higher, "B", "A") == pytest.approx(
        sps.wilcoxon(o["B"], o["A"], alternative="less", correction=False).pvalue)
    am = stats.average_metric(s, n_boot=500, seed=0)
    assert am.loc["B", "mean"] == pytest.approx(base.mean())
    assert am.loc["B", "ci_low"] < base.mean() < am.loc["B", "ci_high"]
