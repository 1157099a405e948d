"""Retrieval protocol and the chunked nearest-neighbour search: planted clusters, references, R10, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from sklearn.metrics import top_k_accuracy_score

from gpfm.arena import retrieval as R
from gpfm.io import GpfmError


def clusters(n: int, n_classes: int = 4, dim: int = 16, sep: float = 6.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim)) * sep
    y = np.arange(n) % n_classes
    return (centers[y] + rng.normal(size=(n, dim))).astype(np.float32), y


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_topk_equals_brute_force_and_chunking_changes_nothing(metric):
    rng = np.random.default_rng(1)
    db, q = rng.normal(size=(300, 24)), rng.normal(size=(57, 24))
    d = cdist(q, db, metric)  # float64 reference: full matrix, full sort
    ref = np.argsort(d, axis=1, kind="stable")[:, :7]
    for chunk in (R.DEFAULT_CHUNK, 700, 1):  # 700 elements: two queries per block; 1: one query per block
        scores, idx = R.topk(q, db, 7, metric, chunk_elements=chunk)
        np.testing.assert_array_equal(idx, ref)
        want = np.take_along_axis(d, ref, 1)
        np.testing.assert_allclose(scores, want if metric == "euclidean" else 1 - want, atol=1e-4)


def test_zscore_uses_reference_statistics():
    rng = np.random.default_rng(0)
    a, b = rng.normal(3, 2, size=(500, 5)), rng.normal(0, 1, size=(50, 5))
    za, zb = R.zscore(a, b)
    np.testing.assert_allclose(za.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(za.std(0), 1, atol=1e-4)
    np.testing.assert_allclose(zb, (b - a.mean(0)) / a.std(0), rtol=1e-4, atol=1e-4)


def test_planted_clusters_retrieve_perfectly():
    x, y = clusters(400)
    df = R.retrieve(x[:300], y[:300], x[300:], y[300:], 4, chunk_elements=5000)
    assert R.macro_mean(df, "hit@1") == 1.0
    assert R.macro_mean(df, "mv@5") == 1.0
    assert df["ap@R"].mean() == pytest.approx(1.0)
    assert (y[:300][df["nearest_index"]] == y[300:]).all()


def test_random_labels_retrieve_at_chance():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1200, 16)).astype(np.float32)
    y = rng.integers(0, 4, 1200)
    df = R.retrieve(x[:900], y[:900], x[900:], y[900:], 4)
    assert abs(R.macro_mean(df, "hit@1") - 0.25) < 0.08
    assert abs(R.macro_mean(df, "hit@3") - 0.75) < 0.08
    assert abs(df["ap@R"].mean() - 0.25**2) < 0.02  # chance AP@R is about p^2 (precision p on a fraction p)


def test_topk_hits_macro_equals_sklearn_top_k_accuracy():
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(6), size=400)  # continuous: no ties
    y = rng.integers(0, 6, 400)
    w = 1.0 / np.bincount(y)[y]  # class-balanced weights = macro average over classes
    hits = R.topk_hits(probs, y, (1, 3, 5))
    for j, k in enumerate((1, 3, 5)):
        want = top_k_accuracy_score(y, probs, k=k, sample_weight=w, labels=np.arange(6))
        assert np.average(hits[:, j], weights=w) == pytest.approx(want)


def test_ties_are_broken_at_random_in_expectation():
    probs = np.array([[0.4, 0.4, 0.2], [0.5, 0.25, 0.25], [0.2, 0.2, 0.2]])
    hits = R.topk_hits(probs, np.array([0, 2, 1]), (1, 2, 3))
    np.testing.assert_allclose(hits, [[0.5, 1, 1], [0, 0.5, 1], [1 / 3, 2 / 3, 1]])


def test_vote_weights_never_negative_r10():
    w = R.vote_weights(15)
    assert (w >= 0).all() and w[0] == 1.0 and w[1] == pytest.approx(0.9) and w[10:].sum() == 0
    # 15 classes: neighbours 12-15 belong to class 0 and must not push its score below class 1's
    nl = np.array([[1] + list(range(2, 12)) + [0, 0, 0, 0]])
    p = R.vote_probs(nl, 15)
    assert p[0, 0] == pytest.approx(p[0, 14])  # far neighbours add nothing, they never subtract
    assert p[0, 1] > p[0, 2] > p[0, 0]
    np.testing.assert_allclose(p.sum(1), 1.0)


def test_vote_probs_match_upstream_for_few_classes():
    nl = np.array([[2, 0, 2, 1]])
    scores = np.array([0.9, 0.7, 1.0 + 0.8])
    want = np.exp(scores) / np.exp(scores).sum()
    np.testing.assert_allclose(R.vote_probs(nl, 3)[0], want)


def test_majority_vote_ties_go_to_the_nearer_class():
    nl = np.array([[1, 0, 0, 1, 2], [2, 2, 1, 1, 1], [0, 1, 2, 3, 4]])
    hits = R.majority_hits(nl, np.array([1, 1, 0]), 5, k=5)
    np.testing.assert_array_equal(hits, [True, True, True])


def test_average_precision_at_r_by_hand_and_brute_force():
    ap = R.average_precision_at_r(np.array([[1, 0, 1, 1, 0]]), np.array([1]), np.array([3]))
    assert ap[0] == pytest.approx((1 + 2 / 3) / 3)
    rng = np.random.default_rng(5)
    nl, y = rng.integers(0, 3, size=(30, 12)), rng.integers(0, 3, 30)
    r = rng.integers(1, 12, 30)
    for i in range(30):
        rel = nl[i, : r[i]] == y[i]
        want = sum(rel[: j + 1].mean() for j in range(r[i]) if rel[j]) / r[i]
        assert R.average_precision_at_r(nl[i:i + 1], y[i:i + 1], r[i:i + 1])[0] == pytest.approx(want)


def test_retrieve_needs_database_and_queries():
    with pytest.raises(GpfmError, match="database and queries"):
        R.retrieve(np.zeros((0, 4)), np.zeros(0), np.zeros((3, 4)), np.zeros(3), 2)
