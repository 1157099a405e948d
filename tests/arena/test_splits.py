"""Splits: patient-level, stratified, seeded, no leakage; every protocol; saved and re-read identically."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gpfm.arena import splits as S
from gpfm.io import GpfmError


def _samples(n_cases=60, seed=0, classes=("a", "b", "c")):
    """Two to three slides per case for some cases; class per case."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_cases):
        k = classes[c % len(classes)]
        for s in range(1 + int(rng.integers(0, 3) == 0)):
            rows.append({"sample_id": f"c{c}_s{s}", "case_id": f"c{c}", "stratum": k})
    return pd.DataFrame(rows)


def _case_sets(split, samples):
    case = dict(zip(samples["sample_id"], samples["case_id"]))
    return {p: {case[i] for i in ids} for p, ids in split.partitions().items()}


def _assert_disjoint_and_complete(split, samples, complete=True):
    cs = _case_sets(split, samples)
    assert not (cs["train"] & cs["val"]) and not (cs["train"] & cs["test"]) and not (cs["val"] & cs["test"])
    if complete:
        assert sum(map(len, split.partitions().values())) == len(samples)


def test_monte_carlo_patient_level_stratified_seeded():
    sm = _samples()
    a = S.monte_carlo_splits(sm, k=10, ratios=(0.8, 0.1, 0.1), seed=0)
    assert len(a) == 10 and a == S.monte_carlo_splits(sm, k=10, ratios=(0.8, 0.1, 0.1), seed=0)
    assert a != S.monte_carlo_splits(sm, k=10, ratios=(0.8, 0.1, 0.1), seed=1)
    assert len({s.test for s in a}) == 10  # folds differ
    strat = dict(zip(sm["case_id"], sm["stratum"]))
    for s in a:
        _assert_disjoint_and_complete(s, sm)
        cs = _case_sets(s, sm)
        assert [len(cs[p]) for p in ("train", "val", "test")] == [48, 6, 6]
        for p in ("val", "test"):  # 20 cases per class -> 2 per class in val/test
            assert sorted(pd.Series([strat[c] for c in cs[p]]).value_counts()) == [2, 2, 2]


def test_holdout_712():
    sm = _samples(100, classes=("a", "b"))
    (s,) = S.holdout_split(sm, seed=3)
    cs = _case_sets(s, sm)
    assert [len(cs[p]) for p in ("train", "val", "test")] == [70, 10, 20]
    _assert_disjoint_and_complete(s, sm)


def test_kfold_val_from_training_part_never_test():
    sm = _samples(50, classes=("0", "1"))
    folds = S.kfold_splits(sm, k=5, val_fraction=0.1, seed=0)
    tests = [set(_case_sets(f, sm)["test"]) for f in folds]
    assert set().union(*tests) == set(sm["case_id"]) and sum(map(len, tests)) == 50  # each case tested once
    for f in folds:
        _assert_disjoint_and_complete(f, sm)
        assert f.val and not set(f.val) & set(f.test)


def test_class_too_small_error_names_counts():
    sm = _samples(30, classes=("a", "b"))
    sm = pd.concat([sm, pd.DataFrame([{"sample_id": "r1", "case_id": "r1", "stratum": "rare"},
                                      {"sample_id": "r2", "case_id": "r2", "stratum": "rare"}])])
    with pytest.raises(GpfmError, match=r"class 'rare' has 2 case\(s\) but 5-fold .* at least 5"):
        S.kfold_splits(sm, k=5)
    with pytest.raises(GpfmError, match=r"class 'rare' has 2 case\(s\) .* at least 3"):
        S.monte_carlo_splits(sm, k=2)


def test_csv_long_and_clam_formats(tmp_path):
    sm = _samples(30)
    cases = sorted(sm["case_id"].unique())
    long = pd.DataFrame({"case_id": cases, "split": ["train"] * 20 + ["val"] * 4 + ["test"] * 6})
    long.to_csv(tmp_path / "long.csv", index=False)
    (s,) = S.make_splits({"protocol": "csv", "path": "long.csv"}, sm, base_dir=tmp_path)
    assert _case_sets(s, sm)["test"] == set(cases[24:])
    # CLAM wide format, one file per fold (case ids here); val == test (the released splits82 defect) is refused
    for k in range(2):
        wide = pd.DataFrame({"train": pd.Series(cases[k * 5 + 10:]), "val": pd.Series(cases[k * 5:k * 5 + 10]),
                             "test": pd.Series(cases[k * 5:k * 5 + 10])})
        wide.to_csv(tmp_path / f"splits_{k}.csv", index=False)
    spec = {"protocol": "csv", "path": "splits_{fold}.csv"}
    assert S.n_folds(spec, tmp_path) == 2
    with pytest.raises(GpfmError, match="leakage"):
        S.make_splits(spec, sm, base_dir=tmp_path)
    # ... unless the validation set is carved from train instead
    folds = S.make_splits({**spec, "ignore_val": True}, sm, base_dir=tmp_path)
    assert len(folds) == 2 and all(f.val and not set(f.val) & set(f.test) for f in folds)


def test_official_and_external():
    sm = _samples(40)
    sm["split"] = np.where(np.arange(len(sm)) % 5 == 0, "val", "train")  # no test split
    sm["case_id"] = sm["sample_id"]  # image sets: one sample per case
    (s,) = S.official_split(sm, seed=0)
    assert set(s.test) == set(sm.loc[sm["split"] == "val", "sample_id"])  # official val became the test set
    assert s.val and not set(s.val) & set(s.test)
    ex = _samples(40)
    ex["cohort"] = np.where(ex["case_id"].str[1:].astype(int) >= 30, "external", "internal")
    folds = S.make_splits({"protocol": "external", "k": 2}, ex)
    assert len(folds) == 2
    for f in folds:
        assert set(f.test) == set(ex.loc[ex["cohort"] == "external", "sample_id"])
        _assert_disjoint_and_complete(f, ex)


def test_leakage_check_and_restrict():
    sm = _samples(12)
    (s,) = S.holdout_split(sm)
    bad = S.Split(0, s.train, s.val, s.test + (s.train[0],))
    with pytest.raises(GpfmError, match="in both train and test"):
        S.check_no_leakage(bad, sm)
    r = s.restrict(s.train[1:] + s.val + s.test)
    assert r.train == s.train[1:] and r.test == s.test


def test_save_load_round_trip(tmp_path):
    sm = _samples(30)
    folds = S.kfold_splits(sm, k=3)
    S.save_splits(folds, sm, tmp_path / "splits")
    assert S.load_splits(tmp_path / "splits") == folds
    df = pd.read_csv(tmp_path / "splits" / "fold_0.csv")
    assert list(df.columns) == ["sample_id", "case_id", "partition"]


def test_spec_validation():
    S.validate_split_spec({"protocol": "kfold", "k": 5})
    for bad, msg in [({"protocol": "nope"}, "protocol must be"), ({"protocol": "kfold", "kk": 1}, "unknown split"),
                     ({"protocol": "holdout", "ratios": [0.5, 0.5, 0.5]}, "ratios"),
                     ({"protocol": "csv"}, "needs 'path'")]:
        with pytest.raises(GpfmError, match=msg):
            S.validate_split_spec(bad)
