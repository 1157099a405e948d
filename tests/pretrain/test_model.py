"""Heads, masked backbone, presets and AdamW parameter groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpfm.io import GpfmError
from gpfm.pretrain.heads import DINOHead, ExpertProjector, HeadsConfig
from gpfm.pretrain.model import (
    Backbone,
    ModelConfig,
    build_student,
    layer_id,
    load_init,
    param_groups,
    timm_spec,
)


def _tiny_backbone(size: int = 64) -> Backbone:
    arch, args = timm_spec(ModelConfig(preset="tiny"), size)
    return Backbone(arch, args)


def test_dino_head_is_mlp_bottleneck_l2_weightnormed_prototypes():
    torch.manual_seed(0)
    head = DINOHead(16, 10, hidden_dim=32, bottleneck_dim=8, nlayers=3)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 8)]
    x = torch.randn(5, 16)
    w = F.normalize(head.last_layer.weight, dim=1)
    assert torch.allclose(head(x), F.normalize(head.mlp(x), dim=-1) @ w.t(), atol=1e-6)
    assert not any("norm_scale" in n for n, _ in head.named_parameters())  # prototype norm fixed at 1
    proj = ExpertProjector(16, 12, bottleneck_dim=8)
    assert torch.equal(proj.last_layer.norm_scale, torch.ones(12)) and proj.last_layer.norm_scale.requires_grad
    y = proj(x)
    assert y.shape == (5, 12) and torch.allclose(y.norm(dim=-1) <= 12 ** 0.5 + 1e-5, torch.ones(5, dtype=bool))


def test_backbone_shapes_and_mask_token():
    torch.manual_seed(0)
    bb = _tiny_backbone(64).eval()
    cls, patch, grid = bb(torch.randn(2, 3, 64, 64))
    assert cls.shape == (2, 96) and patch.shape == (2, 16, 96) and grid == (4, 4)
    cls_l, patch_l, grid_l = bb(torch.randn(2, 3, 32, 32))  # local crops: interpolated position embeddings
    assert patch_l.shape == (2, 4, 96) and grid_l == (2, 2)
    with torch.no_grad():
        bb.mask_token.normal_()
    full = torch.ones(2, 16, dtype=torch.bool)
    a = bb(torch.randn(2, 3, 64, 64), full)
    b = bb(torch.randn(2, 3, 64, 64), full)
    assert torch.allclose(a[0], b[0], atol=1e-5)  # every patch replaced: the content is gone
    none = torch.zeros(2, 16, dtype=torch.bool)
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(bb(x, none)[1], bb(x)[1])


def test_gpfm_student_preset_is_dinov2_vit_large_with_mlp_ffn():
    arch, args = timm_spec(ModelConfig(preset="vitl14"), 224)
    with torch.device("meta"):
        bb = Backbone(arch, args, drop_path_rate=0.4)
    vit = bb.vit
    assert (bb.embed_dim, bb.n_blocks, bb.patch_size, vit.blocks[0].attn.num_heads) == (1024, 24, 14, 16)
    assert vit.patch_embed.grid_size == (16, 16) and vit.num_prefix_tokens == 1
    assert type(vit.blocks[0].mlp).__name__ == "Mlp"  # plain GELU MLP, not SwiGLU
    assert hasattr(vit.blocks[0].ls1, "gamma")  # LayerScale
    assert {round(b.drop_path1.drop_prob, 6) for b in vit.blocks} == {0.4}  # uniform drop-path
    n = sum(p.numel() for n, p in vit.named_parameters())
    assert 300e6 < n < 306e6
    with pytest.raises(GpfmError):
        ModelConfig(preset="vit_huge")


def test_param_groups_layer_decay_patch_embed_and_no_weight_decay():
    torch.manual_seed(0)
    s = build_student(ModelConfig(preset="tiny", model_args={"depth": 3}), HeadsConfig(prototypes=16, hidden_dim=16,
                      bottleneck_dim=8, projector_bottleneck=8), 64, True, True, {"uni": (10, 10)})
    decay, n = 0.9, 3
    groups = param_groups(s, n, decay, 0.2)
    by_name = {name: g for g in groups for name in g["names"]}
    assert by_name["backbone.vit.blocks.0.attn.qkv.weight"]["lr_mult"] == pytest.approx(decay ** 3)
    assert by_name["backbone.vit.blocks.2.mlp.fc1.weight"]["lr_mult"] == pytest.approx(decay ** 1)
    assert by_name["backbone.vit.cls_token"]["lr_mult"] == pytest.approx(decay ** 4)
    assert by_name["backbone.mask_token"]["lr_mult"] == pytest.approx(decay ** 4)
    assert by_name["backbone.vit.patch_embed.proj.weight"]["lr_mult"] == pytest.approx(decay ** 4 * 0.2)
    assert by_name["backbone.vit.norm.weight"]["lr_mult"] == 1.0
    assert by_name["dino_head.mlp.0.weight"]["lr_mult"] == 1.0
    assert by_name["projectors.uni.proj.weight"]["lr_mult"] == 1.0  # no layer decay on projectors
    for name, g in by_name.items():
        no_wd = name.endswith(".bias") or "norm" in name or ".gamma" in name
        assert g["wd_mult"] == (0.0 if no_wd else 1.0), name
        assert g["last_layer"] == ("last_layer" in name)
    assert by_name["backbone.vit.blocks.1.ls1.gamma"]["wd_mult"] == 0.0
    assert by_name["projectors.uni.last_layer.weight"]["last_layer"]
    assert layer_id("dino_head.mlp.0.weight", 3) == 4
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in s.parameters() if p.requires_grad)


def test_load_init_strict_and_reported(tmp_path):
    from safetensors.torch import save_file

    src = _tiny_backbone(64)
    save_file({k: v.contiguous() for k, v in src.vit.state_dict().items()}, str(tmp_path / "model.safetensors"))
    dst = _tiny_backbone(64)
    rep = load_init(dst, tmp_path)
    assert rep["missing"] == [] and rep["unexpected"] == []
    assert torch.equal(dst.vit.pos_embed, src.vit.pos_embed)
    other = Backbone(*timm_spec(ModelConfig(preset="tiny", model_args={"depth": 3}), 64))
    with pytest.raises(GpfmError, match="missing"):
        load_init(other, tmp_path)
    rep = load_init(other, tmp_path, strict=False)  # R8: everything that did not load is listed
    assert any(k.startswith("blocks.2.") for k in rep["missing"]) and rep["loaded"] > 0
    with pytest.raises(GpfmError, match="not found"):
        load_init(dst, tmp_path / "nope")
