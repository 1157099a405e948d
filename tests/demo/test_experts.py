"""Demo experts: each tiny-vit specialist learns its own hidden variable and loads back by path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpfm.demo.experts import ExpertParams, load_roi, make_experts, read_images, train_expert
from gpfm.encoders import create_encoder
from gpfm.io import GpfmError

# Short runs that still specialise on the 18-patient test cohort (checked on several cohort seeds): the grade
# cue is local and learned after a plateau, so its expert takes more, smaller crops.
FAST = {"label": ExpertParams(steps=70, lr=2e-3, warmup=3, crop=112),
        "grade": ExpertParams(steps=150, lr=2e-3, warmup=3, crop=64)}


@pytest.fixture(scope="module")
def experts(demo_cohort, tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a busy 2-core machine: one thread is fastest
    try:
        out = tmp_path_factory.mktemp("experts")
        yield {t: train_expert(demo_cohort, t, out / f"expert-{t}", FAST[t], quiet=True) for t in FAST}
    finally:
        torch.set_num_threads(n)


def _features(enc, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([enc(enc.transform.normalize(x[i:i + 32].float() / 255)) for i in range(0, len(x), 32)]
                         ).numpy()


def _fisher(f: np.ndarray, y: np.ndarray) -> float:
    """Between-class over within-class scatter (trace ratio) of standardised features: class separation."""
    f = (f - f.mean(0)) / (f.std(0) + 1e-6)
    mu = np.stack([f[y == c].mean(0) for c in np.unique(y)])
    within = np.mean([((f[y == c] - m) ** 2).sum(1).mean() for c, m in zip(np.unique(y), mu)])
    return float(((mu - f.mean(0)) ** 2).sum(1).mean() / within)


def test_experts_separate_their_own_target(demo_cohort, experts):
    paths, _, _ = load_roi(demo_cohort, "label", ("train", "val", "test"))
    x = read_images(demo_cohort, paths, 224)
    targets = {t: load_roi(demo_cohort, t, ("train", "val", "test"))[1] for t in ("label", "grade")}
    random = _features(create_encoder("tiny-vit", weights="random", seed=0), x)
    feats = {t: _features(create_encoder("tiny-vit", weights=experts[t]), x) for t in experts}
    for t in ("label", "grade"):
        other = "grade" if t == "label" else "label"
        own = _fisher(feats[t], targets[t])
        # training on a target separates it better than the untrained start and than the other specialist
        assert own > 1.3 * _fisher(random, targets[t]), t
        assert own > _fisher(feats[other], targets[t]), t


def test_expert_export_loads_by_path(experts):
    cfg = json.loads((experts["label"] / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["num_features"] == 96
    assert cfg["pretrained_cfg"]["input_size"] == [3, 224, 224]
    assert cfg["gpfm"]["train"]["target"] == "label" and cfg["gpfm"]["classes"] == ["ductal", "lobular", "normal"]
    x = torch.rand(2, 3, 224, 224)
    a = create_encoder("tiny-vit", weights=experts["label"])
    b = create_encoder("timm-export", weights=experts["label"])
    r = create_encoder("tiny-vit", weights="random", seed=0)
    with torch.inference_mode():
        fa, fb, fr = (e(e.transform.prepare(x)) for e in (a, b, r))
    assert torch.allclose(fa, fb) and not torch.allclose(fa, fr)
    assert a.weights_sha256 != "random"


def test_expert_is_reused_and_bad_target(demo_cohort, experts, tmp_path):
    before = (experts["grade"] / "model.safetensors").stat().st_mtime_ns
    assert train_expert(demo_cohort, "grade", experts["grade"], FAST["grade"], quiet=True) == experts["grade"]
    assert (experts["grade"] / "model.safetensors").stat().st_mtime_ns == before  # same settings: reused
    with pytest.raises(GpfmError, match="target"):
        make_experts(demo_cohort, tmp_path, FAST["grade"], targets=("label", "stage"))
    with pytest.raises(GpfmError, match="target"):
        load_roi(demo_cohort, "stage", ("train",))
    with pytest.raises(GpfmError, match="generate the cohort"):
        load_roi(tmp_path, "label", ("train",))
