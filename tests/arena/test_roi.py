"""ROI classification: probes learn planted signal and stay at chance on noise, kNN equals brute force and
scikit-learn, metrics equal scikit-learn's, few-shot CIs narrow, and the handler runs end to end."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

from gpfm.arena import fewshot as F
from gpfm.arena import metrics as M
from gpfm.arena import retrieval as R
from gpfm.arena import roi
from gpfm.arena.runner import run_suite
from gpfm.arena.tasks import task_from_dict
from gpfm.io import GpfmError, write_h5


def clusters(n: int, n_classes: int = 4, dim: int = 32, sep: float = 3.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim)) * sep
    y = np.arange(n) % n_classes
    return (centers[y] + rng.normal(size=(n, dim))).astype(np.float32), y


def bacc(y, probs):
    return balanced_accuracy_score(y, probs.argmax(1))


@pytest.fixture(scope="module")
def planted():
    x, y = clusters(900)
    return x[:500], y[:500], x[500:600], y[500:600], x[600:], y[600:]


@pytest.fixture(scope="module")
def noise():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1400, 32)).astype(np.float32)
    y = rng.integers(0, 4, 1400)
    return x[:800], y[:800], x[800:1000], y[800:1000], x[1000:], y[1000:]


# ------------------------------------------------------------------------------------------------ probes
def test_linear_probe_learns_planted_clusters_and_keeps_best_weights(planted):
    xtr, ytr, xv, yv, xte, yte = planted
    threads = torch.get_num_threads()
    w, b, info = roi.train_linear_probe(xtr, ytr, xv, yv, 4, patience=30, seed=1)
    assert torch.get_num_threads() == threads  # the one-thread training loop restores the setting
    assert bacc(yte, roi.predict_linear(w, b, xte)) >= 0.95
    assert info["epochs"] == info["best_epoch"] + 31  # stopped by patience, not by the epoch cap
    assert roi.val_score(yv, roi.predict_linear(w, b, xv)) == pytest.approx(info["best_val_auc"])


def test_logreg_probe_learns_planted_clusters(planted):
    xtr, ytr, xv, yv, xte, yte = planted
    probs, info = roi.logreg_probe(xtr, ytr, xv, yv, xte, 4)
    assert bacc(yte, probs) >= 0.95 and info["C"] in info["val_auc"]


def test_knn_learns_planted_clusters(planted):
    xtr, ytr, _, _, xte, yte = planted
    for k, probs in R.knn_probs(xtr, ytr, xte, 4, (1, 20)).items():
        assert bacc(yte, probs) >= 0.95, k


def test_random_labels_stay_near_chance(noise):
    xtr, ytr, xv, yv, xte, yte = noise
    w, b, _ = roi.train_linear_probe(xtr, ytr, xv, yv, 4, max_epochs=100, patience=10)
    scores = {"linear": bacc(yte, roi.predict_linear(w, b, xte)),
              "logreg": bacc(yte, roi.logreg_probe(xtr, ytr, xv, yv, xte, 4, cs=(0.01, 1.0))[0])}
    scores.update({f"knn{k}": bacc(yte, p) for k, p in R.knn_probs(xtr, ytr, xte, 4).items()})
    for name, s in scores.items():
        assert abs(s - 0.25) < 0.1, (name, s)


def test_cosine_schedule_matches_torch():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 50, eta_min=1e-5)
    for step in range(50):
        assert roi.cosine_lr(step, 50, 5e-4, 1e-5) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sched.step()


def test_knn_equals_brute_force_and_sklearn():
    rng = np.random.default_rng(2)
    xtr, ytr = rng.normal(size=(300, 16)), rng.integers(0, 3, 300)
    xq = rng.normal(size=(80, 16))
    a = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    bn = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    sim = a @ bn.T  # float64 reference: full similarity matrix, full sort
    order = np.argsort(-sim, axis=1, kind="stable")
    got = R.knn_probs(xtr, ytr, xq, 3, (1, 20), chunk_elements=1000)
    for k in (1, 20):
        s = np.take_along_axis(sim, order[:, :k], 1) / 0.07
        w = np.exp(s - s.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        want = np.zeros((80, 3))
        for i in range(80):
            np.add.at(want[i], ytr[order[i, :k]], w[i])
        np.testing.assert_allclose(got[k], want, atol=1e-5)
    sk = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute").fit(xtr, ytr)
    np.testing.assert_array_equal(got[1].argmax(1), sk.predict(xq))


# ----------------------------------------------------------------------------------------------- metrics
def test_prefixed_metrics_equal_sklearn_and_batch_path():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 200)
    probs = rng.dirichlet(np.ones(3), 200)
    df = pd.DataFrame({"sample_id": [f"s{i}" for i in range(200)], "label": y})
    for c in range(3):
        df[f"knn20_prob_{c}"] = probs[:, c]
    df["knn20_pred"] = probs.argmax(1)
    get = {m: M.get_metric(roi.prefixed_metric("knn20_", m)).fn(df) for m in roi.CLASSIFICATION_METRICS}
    assert get["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, probs.argmax(1)))
    assert get["macro_f1"] == pytest.approx(f1_score(y, probs.argmax(1), average="macro"))
    assert get["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    idx = M.bootstrap_indices(200, 20, seed=0)
    fast = M.metric_on_resamples("knn20_auc", df, idx)
    slow = [roc_auc_score(y[i], probs[i], multi_class="ovr") for i in idx]
    np.testing.assert_allclose(fast, slow)


# ---------------------------------------------------------------------------------------------- few-shot
def test_fewshot_prototypes_equal_naive_episodes(planted):
    xtr, ytr, _, _, xte, _ = planted
    eps = F.sample_episodes(ytr, 4, 3, 5, seed=0)
    got = F.prototype_scores(xtr, xte, eps, block=2)
    for e in range(5):
        sup = xtr[eps[e]].astype(np.float64)  # (C, shot, d)
        mu = sup.reshape(-1, sup.shape[-1]).mean(0)
        cen = sup - mu
        proto = (cen / np.linalg.norm(cen, axis=-1, keepdims=True)).mean(1)
        q = xte - mu
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        want = -((q[:, None, :] - proto[None]) ** 2).sum(-1)
        np.testing.assert_allclose(got[e], want, atol=1e-3)


def test_fewshot_learns_and_cis_shrink_with_more_episodes():
    x, y = clusters(600, sep=0.6, seed=4)  # overlapping classes: episodes really differ
    few = F.fewshot_eval(x[:400], y[:400], x[400:], y[400:], 4, shots=(1, 8), n_episodes=10, seed=0)
    many = F.fewshot_eval(x[:400], y[:400], x[400:], y[400:], 4, shots=(1, 8), n_episodes=200, seed=0)
    for shot in (1, 8):
        m_few, m_many = few[f"fewshot{shot}_balanced_accuracy"], many[f"fewshot{shot}_balanced_accuracy"]
        assert m_many["ci_high"] - m_many["ci_low"] < 0.5 * (m_few["ci_high"] - m_few["ci_low"])
        assert m_many["ci_low"] <= m_many["mean"] <= m_many["ci_high"]
    assert many["fewshot8_balanced_accuracy"]["mean"] > many["fewshot1_balanced_accuracy"]["mean"] > 0.3
    again = F.fewshot_eval(x[:400], y[:400], x[400:], y[400:], 4, shots=(1, 8), n_episodes=10, seed=0)
    assert again == few  # seeded


def test_fewshot_class_smaller_than_shot_is_named():
    y = np.array([0] * 10 + [1] * 3)
    with pytest.raises(GpfmError, match="class 'mucosa' has only 3"):
        F.sample_episodes(y, 2, 4, 5, class_names=["tumour", "mucosa"])


def test_mean_ci_is_a_t_interval():
    v = np.array([0.5, 0.6, 0.7, 0.8])
    ci = F.mean_ci(v)
    from scipy import stats

    lo, hi = stats.t.interval(0.95, 3, loc=v.mean(), scale=stats.sem(v))
    assert (ci["ci_low"], ci["ci_high"]) == pytest.approx((lo, hi))


# ------------------------------------------------------------------------------------ handler, end to end
def image_set(root, n=240, n_classes=3, dim=24, missing=2, seed=0):
    """A labelled image set as `gpfm extract --images roi.csv` leaves it: roi.csv + features/<split>.h5.

    The last `missing` images of the CSV have no features (extract skipped them as undecodable)."""
    x, y = clusters(n, n_classes, dim, sep=3.0, seed=seed)
    names = ["adipose", "stroma", "tumour"][:n_classes]
    split = np.array(["train"] * n, dtype=object)
    split[n // 2: n // 2 + n // 6] = "val"
    split[n // 2 + n // 6:] = "test"
    paths = [f"images/{names[c]}/{i}.png" for i, c in enumerate(y)]
    pd.DataFrame({"path": paths, "label": [names[c] for c in y], "split": split}).to_csv(root / "roi.csv",
                                                                                         index=False)
    keep = np.ones(n, bool)
    keep[n - missing:] = False
    for part in ("train", "val", "test"):
        sel = (split == part) & keep
        write_h5(root / "features" / "enc" / f"{part}.h5",
                 {"features": x[sel], "labels": np.array([names[c] for c in y[sel]], dtype=object),
                  "paths": np.array(paths, dtype=object)[sel]})
    return [p for p, k in zip(paths, keep) if not k]


def spec(tmp_path, **kw):
    base = {"name": "roi-demo", "category": "roi_classification", "labels": "roi.csv",
            "split": {"protocol": "official"}, "features": "{features}/{encoder}",
            "settings": {"max_epochs": 200, "patience": 20, "n_boot": 50, "fewshot_shots": [1, 4],
                         "fewshot_episodes": 20}}
    base.update(kw)
    return task_from_dict(base, tmp_path, "roi.yaml")


def test_handler_loads_lists_missing_images_and_runs_all_protocols(tmp_path, caplog):
    missing = image_set(tmp_path)
    task = spec(tmp_path)
    roi.validate(task)
    with caplog.at_level(logging.WARNING, logger="gpfm.arena"):
        data = roi.load(task, tmp_path / "features" / "enc")
    assert data.excluded == {"no features (not decodable or not extracted)": missing}
    assert "2 labelled image(s) have no features" in caplog.text
    assert len(data.samples) == 238 and data.dim == 24 and data.info["classes"] == ["adipose", "stroma", "tumour"]
    (split,) = roi.make_folds(task, data, seed=0)
    assert len(split.val) == 40 and not set(split.test) & set(split.train)
    res = roi.run_fold(task, data, split.restrict(data.samples["sample_id"]), 0, "cpu")
    pred = res.predictions
    assert len(pred) == len(split.test) - 2 and pred["sample_id"].is_unique
    assert {"label", "pred", "prob_2", "knn1_pred", "knn20_prob_0"} <= set(pred.columns)
    for name in ("balanced_accuracy", "macro_f1", "auc", "knn1_balanced_accuracy", "knn20_auc",
                 "fewshot4_balanced_accuracy"):
        assert res.metrics[name]["value"] >= 0.95, name
    assert res.metrics["balanced_accuracy"]["value"] == pytest.approx(
        balanced_accuracy_score(pred["label"], pred["pred"]))


def test_runner_writes_roi_and_retrieval_results(tmp_path):
    image_set(tmp_path)
    suite = {"name": "s", "tasks": [
        {"name": "roi", "category": "roi_classification", "labels": "roi.csv", "split": {"protocol": "official"},
         "settings": {"probe": "logreg", "protocols": ["linear", "knn"], "n_boot": 20}},
        {"name": "ret", "category": "retrieval", "labels": "roi.csv", "split": {"protocol": "official"},
         "settings": {"n_boot": 20}}]}
    (tmp_path / "suite.yaml").write_text(json.dumps(suite))
    report = run_suite(tmp_path / "suite.yaml", tmp_path / "features", ["enc"], tmp_path / "out", quiet=True)
    assert report.exit_code == 0, report.problems
    m = json.loads((tmp_path / "out/roi/enc/fold_0/metrics.json").read_text())
    assert m["primary_metric"] == "balanced_accuracy" and m["metrics"]["balanced_accuracy"]["value"] >= 0.95
    r = json.loads((tmp_path / "out/ret/enc/result.json").read_text())
    assert r["primary_metric"] == "acc@1" and r["metrics"]["acc@1"]["value"] == 1.0
    assert {"acc@3", "acc@5", "mmv@5", "map@r"} <= set(r["metrics"])
    pred = pd.read_csv(tmp_path / "out/ret/enc/fold_0/predictions.csv")
    assert {"sample_id", "hit@1", "ap@R", "nearest"} <= set(pred.columns)
    assert pred["nearest"].str.startswith("images/").all()


def test_external_cohort_is_the_test_set(tmp_path):
    (tmp_path / "ext").mkdir()
    image_set(tmp_path, missing=0)
    image_set(tmp_path / "ext", n=90, missing=3)  # external images without features are left out too
    task = spec(tmp_path, split={"protocol": "external"}, external={"labels": "ext/roi.csv"},
                settings={"protocols": ["knn"], "n_boot": 10})
    data = roi.load(task, tmp_path / "features" / "enc", tmp_path / "ext" / "features" / "enc")
    (split,) = roi.make_folds(task, data, 0)
    assert len(data.excluded["no features (not decodable or not extracted)"]) == 3
    assert len(split.test) == 90 and all(s.startswith("external:") for s in split.test)
    assert len(split.train) + len(split.val) == 240
    res = roi.run_fold(task, data, split.restrict(data.samples["sample_id"]), 0, "cpu")
    assert len(res.predictions) == 87 and res.metrics["knn20_balanced_accuracy"]["value"] >= 0.95


# ------------------------------------------------------------------------------------------------ bad input
def test_feature_and_label_counts_that_differ_name_the_file(tmp_path):
    image_set(tmp_path)
    bad = tmp_path / "features" / "enc" / "val.h5"
    write_h5(bad, {"features": np.zeros((5, 24), np.float32), "labels": np.array(["a"] * 4, dtype=object),
                   "paths": np.array([f"p{i}" for i in range(4)], dtype=object)})
    with pytest.raises(GpfmError, match=r"val\.h5: 5 feature rows but 4 labels"):
        roi.load(spec(tmp_path), tmp_path / "features" / "enc")


def test_missing_features_folder_is_an_error_and_no_split_column_gets_a_stratified_holdout(tmp_path):
    image_set(tmp_path)
    with pytest.raises(GpfmError, match="run `gpfm extract --images"):
        roi.load(spec(tmp_path), tmp_path / "features" / "other")
    pd.read_csv(tmp_path / "roi.csv").drop(columns="split").to_csv(tmp_path / "roi.csv", index=False)
    task = spec(tmp_path, split={})
    data = roi.load(task, tmp_path / "features" / "enc")
    (split,) = roi.make_folds(task, data, seed=0)
    assert (len(split.train), len(split.val), len(split.test)) == (168, 24, 48)  # 7:1:2 of 240 labelled
    test_labels = pd.Series([p.split("/")[1] for p in split.test]).value_counts()
    assert (test_labels == 16).all()  # stratified
    assert roi.make_folds(task, data, seed=0) == [split] and roi.make_folds(task, data, seed=1) != [split]


def test_bad_settings_and_too_few_shots(tmp_path):
    image_set(tmp_path, n=60)
    with pytest.raises(GpfmError, match="settings.probe"):
        roi.validate(spec(tmp_path, settings={"probe": "svm"}))
    with pytest.raises(GpfmError, match="unknown config key 'settings.epochs'"):
        roi.validate(spec(tmp_path, settings={"epochs": 3}))
    task = spec(tmp_path, settings={"protocols": ["fewshot"], "fewshot_shots": [16]})
    data = roi.load(task, tmp_path / "features" / "enc")
    (split,) = roi.make_folds(task, data, 0)
    with pytest.raises(GpfmError, match=r"16-shot: class '\w+' has only \d+ training images"):
        roi.run_fold(task, data, split.restrict(data.samples["sample_id"]), 0, "cpu")
