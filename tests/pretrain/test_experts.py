"""Frozen experts: checked before the first step (R2, weights), own transforms (R1), standardisation."""

from __future__ import annotations

import pytest
import torch

from gpfm.config import from_dict
from gpfm.io import GpfmError
from gpfm.pretrain.experts import DistillConfig, RunningStandardizer, build_experts


def _cfg(*experts: dict, **kw) -> DistillConfig:
    return from_dict(DistillConfig, {"experts": list(experts), **kw})


def test_patch_term_only_for_experts_with_tokens(h):
    ok = build_experts(_cfg({"name": "colour", "patch_weight": 0.25}, {"name": "colour-notokens"}), "cpu",
                       h.expert_factory)
    assert ok[0].has_patch_term and ok[0].grid == (4, 4) and ok[0].token_dim == 32
    assert not ok[1].has_patch_term and ok[1].token_dim is None
    with pytest.raises(GpfmError, match="no spatial tokens"):  # R2: a weight for a missing term
        build_experts(_cfg({"name": "colour-notokens", "patch_weight": 0.1}), "cpu", h.expert_factory)


def test_missing_wrong_or_random_weights_fail_before_training(h, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(GpfmError, match=r"experts\[0\] 'test-vit'.*not found"):
        build_experts(_cfg({"name": "test-vit", "weights": str(tmp_path / "nope.safetensors")}), "cpu",
                      h.expert_factory)
    save_file({"pos_embed": torch.zeros(1, 5, 7)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(GpfmError, match="do not load"):
        build_experts(_cfg({"name": "test-vit", "weights": str(tmp_path / "other.safetensors")}), "cpu",
                      h.expert_factory)
    with pytest.raises(GpfmError, match="no trained weights"):
        build_experts(_cfg({"name": "test-vit"}), "cpu", h.expert_factory)
    good = h.ViTExpert()
    save_file({k: v.contiguous() for k, v in good.model.state_dict().items()}, str(tmp_path / "good.safetensors"))
    (e,) = build_experts(_cfg({"name": "test-vit", "weights": str(tmp_path / "good.safetensors")}), "cpu",
                         h.expert_factory)
    assert e.cls_dim == 48
    with pytest.raises(GpfmError, match="two experts"):
        _cfg({"name": "colour"}, {"name": "colour"})
    with pytest.raises(GpfmError, match="unknown config key"):
        _cfg({"name": "colour", "patch_wieght": 1.0})


def test_experts_use_their_own_size_and_normalisation(h):
    (e,) = build_experts(_cfg({"name": "test-vit", "allow_random": True, "patch_weight": 0.1}), "cpu",
                         h.expert_factory)
    x = torch.rand(2, 3, 64, 64)
    t = e.encoder.transform
    assert torch.allclose(e.prepare(x), t.normalize(x))  # a view rendered at its size: normalised only
    big = torch.rand(2, 3, 96, 96)
    assert e.prepare(big).shape == (2, 3, 64, 64)  # any other size: the expert's own resize
    cls, tok = e.targets(x)
    ref_cls, ref_tok = e.encoder.forward_cls_and_tokens(t.normalize(x))
    assert torch.allclose(cls, ref_cls) and torch.allclose(tok, ref_tok) and tok.shape == (2, 16, 48)


def test_running_standardizer_tracks_the_target_statistics():
    torch.manual_seed(0)
    s = RunningStandardizer(3, momentum=0.9)
    mean, std = torch.tensor([5.0, -2.0, 0.0]), torch.tensor([2.0, 0.5, 1.0])
    for _ in range(60):
        s.update(torch.randn(256, 3) * std + mean)
    assert torch.allclose(s.mean, mean, atol=0.1) and torch.allclose(s.var.sqrt(), std, atol=0.1)
    z = s(torch.randn(4096, 3) * std + mean)
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=0.1) and torch.allclose(z.std(0), torch.ones(3), atol=0.1)


def test_zoo_tiny_vit_through_the_encoder_contract():
    pytest.importorskip("gpfm.encoders")
    try:
        (e,) = build_experts(_cfg({"name": "tiny-vit", "allow_random": True, "patch_weight": 0.25}), "cpu")
    except GpfmError as err:
        pytest.skip(f"zoo tiny-vit not available yet: {err}")
    assert e.has_patch_term and e.grid == (14, 14)
    cls, tok = e.targets(torch.rand(2, 3, *e.input_hw))
    assert cls.shape[0] == 2 and tok.shape[:2] == (2, 196)
