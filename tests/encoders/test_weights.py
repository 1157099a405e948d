"""Weights: a random state dict in each official key layout (reduced widths) loads and reproduces its reference.

References are the official module where a library provides it (transformers ViT / Dinov2 / CLIP), otherwise
the module the checkpoint was exported from, or the published formula computed from the raw tensors.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gpfm.encoders import create_encoder
from gpfm.encoders.weights import file_digest, reachable, read_state_dict
from gpfm.io import GpfmError

SMALL = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def _save(sd: dict, path) -> None:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


@pytest.fixture(scope="module")
def x224():
    return torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


# ------------------------------------------------------------------------------ official HF layouts
def test_phikon_hf_vit_layout_matches_transformers(hf, tmp_path, x224):
    cfg = hf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                       image_size=224, patch_size=16)
    ref = hf.ViTModel(cfg).eval()
    ref.save_pretrained(tmp_path)  # the hub layout (encoder.layer.N.attention.attention.query ...)
    enc = create_encoder("phikon", weights=tmp_path, overrides=SMALL)
    with torch.no_grad():
        want = ref(pixel_values=x224).last_hidden_state
    assert torch.allclose(enc(x224), want[:, 0], atol=1e-5)
    assert torch.allclose(enc.forward_tokens(x224), want[:, 1:], atol=1e-5)
    assert enc.weights_sha256 == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()


def test_phikon_v2_hf_dinov2_layout_matches_transformers(hf, tmp_path, x224):
    cfg = hf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4,
                          image_size=224, patch_size=16, layerscale_value=0.5)
    ref = hf.Dinov2Model(cfg).eval()
    ref.save_pretrained(tmp_path)
    enc = create_encoder("phikon-v2", weights=tmp_path / "model.safetensors", overrides=SMALL)
    with torch.no_grad():
        want = ref(pixel_values=x224).last_hidden_state[:, 0]
    assert torch.allclose(enc(x224), want, atol=1e-5)


def test_plip_hf_clip_layout_matches_transformers(hf, tmp_path, x224):
    cfg = hf.CLIPConfig(
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "intermediate_size": 128, "image_size": 224, "patch_size": 32},
        text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                     "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1}, projection_dim=16)
    ref = hf.CLIPModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    enc = create_encoder("plip", weights=tmp_path, overrides={**SMALL, "proj_dim": 16})
    with torch.no_grad():
        want = ref.get_image_features(pixel_values=x224)
    want = want if isinstance(want, torch.Tensor) else want.pooler_output
    assert torch.allclose(enc(x224), want, atol=1e-5)
    assert torch.allclose(enc.forward_cls_and_tokens(x224)[0], F.normalize(want, dim=-1), atol=1e-5)


# ------------------------------------------------------------------------ layouts from the export side
@pytest.mark.parametrize("name,overrides", [
    ("uni", SMALL),
    ("uni2-h", {"embed_dim": 48, "depth": 2, "num_heads": 2}),
    ("virchow2", {"embed_dim": 48, "depth": 1, "num_heads": 2}),
    ("h-optimus-0", {"embed_dim": 48, "depth": 1, "num_heads": 2}),
    ("prov-gigapath", {"embed_dim": 48, "depth": 1, "num_heads": 2}),
])
def test_timm_native_layouts_round_trip(name, overrides, tmp_path, x224):
    ref = create_encoder(name, weights="random", overrides=overrides, seed=3)
    path = tmp_path / "pytorch_model.bin"
    torch.save(ref.model.state_dict(), path)
    enc = create_encoder(name, weights=tmp_path, overrides=overrides)  # a folder holding the expected file
    assert torch.equal(enc(x224), ref(x224))
    assert not torch.equal(create_encoder(name, weights="random", overrides=overrides)(x224), ref(x224))


def test_gpfm_teacher_checkpoint_with_block_chunks(tmp_path, x224):
    """GPFM.pth: {'teacher': {'backbone.blocks.<chunk>.<i>.*', 'backbone.mask_token', 'dino_head.*', ...}}."""
    ref = create_encoder("gpfm", weights="random", overrides=SMALL, seed=5)
    teacher = {}
    for k, v in ref.model.state_dict().items():
        k = re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m[1]) // 1}.{m[1]}.", k)  # chunk = block index
        teacher["backbone." + k] = v
    teacher["backbone.mask_token"] = torch.zeros(1, 32)
    teacher["dino_head.mlp.0.weight"] = torch.zeros(8, 32)
    teacher["uni_projector.weight"] = torch.zeros(8, 32)
    path = tmp_path / "GPFM.pth"
    torch.save({"teacher": teacher, "student": {"backbone.cls_token": torch.zeros(1)}, "iteration": 87499}, path)
    enc = create_encoder("gpfm", weights=path, overrides=SMALL)
    assert torch.equal(enc(x224), ref(x224))


def test_gpfm_teacher_at_another_grid_resamples_pos_embed(tmp_path, x224):
    ref = create_encoder("gpfm", weights="random", overrides={**SMALL, "img_size": 98}, seed=5)
    _save({"backbone." + k: v for k, v in ref.model.state_dict().items()}, tmp_path / "w.safetensors")
    enc = create_encoder("gpfm", weights=tmp_path / "w.safetensors", overrides=SMALL)
    assert enc.model.pos_embed.shape == (1, 257, 32) and torch.isfinite(enc(x224)).all()


def test_conch_open_clip_layout_and_pooler_formula(tmp_path):
    small = {"embed_dim": 32, "depth": 1, "num_heads": 2, "embed_dim_contrast": 16, "pool_heads": 2}
    ref = create_encoder("conch", weights="random", overrides=small, seed=7)
    sd = {"visual." + k: v for k, v in ref.model.state_dict().items()}
    sd["visual.attn_pool_caption.query"] = torch.zeros(256, 24)  # caption pooler and text tower are dropped
    sd["visual.ln_caption.weight"] = torch.ones(24)
    sd["text.token_embedding.weight"] = torch.zeros(10, 24)
    sd["logit_scale"] = torch.ones([])
    torch.save(sd, tmp_path / "pytorch_model.bin")
    enc = create_encoder("conch", weights=tmp_path / "pytorch_model.bin", overrides=small)
    x = torch.rand(1, 3, 448, 448)
    assert torch.equal(enc(x), ref(x))
    # CONCH's definition from the raw tensors: softmax(q K^T / sqrt(d)) V over LN'ed trunk tokens, LN, no proj.
    t = enc.model.trunk.forward_features(x)[0]
    p = {k[len("visual.attn_pool_contrast."):]: v for k, v in sd.items() if k.startswith("visual.attn_pool_contrast.")}
    kv = F.layer_norm(t, (32,), p["ln_k.weight"], p["ln_k.bias"])
    q = F.layer_norm(p["query"], (16,), p["ln_q.weight"], p["ln_q.bias"])
    b = p["attn.in_proj_bias"]
    qh = (q @ p["attn.q_proj_weight"].T + b[:16]).view(1, 2, 8).transpose(0, 1)
    kh = (kv @ p["attn.k_proj_weight"].T + b[16:32]).view(-1, 2, 8).transpose(0, 1)
    vh = (kv @ p["attn.v_proj_weight"].T + b[32:]).view(-1, 2, 8).transpose(0, 1)
    o = torch.softmax(qh @ kh.transpose(1, 2) / 8 ** 0.5, -1) @ vh
    o = o.transpose(0, 1).reshape(1, 16) @ p["attn.out_proj.weight"].T + p["attn.out_proj.bias"]
    want = F.layer_norm(o, (16,), sd["visual.ln_contrast.weight"], sd["visual.ln_contrast.bias"])
    assert torch.allclose(enc(x), want, atol=1e-5)


def test_ctranspath_timm054_layout(tmp_path, x224):
    small = {"embed_dim": 32, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 2, 4)}
    ref = create_encoder("ctranspath", weights="random", overrides=small, seed=9)
    old = {}
    for k, v in ref.model.state_dict().items():  # timm 0.5.4: stage i ends with the downsample into stage i+1
        old[re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k)] = v
    old["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    old["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 49, 49)
    old["head.weight"], old["head.bias"] = torch.zeros(1000, 256), torch.zeros(1000)
    assert "layers.0.downsample.reduction.weight" in old and "patch_embed.proj.0.weight" in old
    torch.save({"model": old}, tmp_path / "ctranspath.pth")
    enc = create_encoder("ctranspath", weights=tmp_path / "ctranspath.pth", overrides=small)
    assert torch.equal(enc(x224), ref(x224))
    assert enc.forward_tokens(x224).shape == (2, 49, 256) and enc.dim == 256


def test_resnet50_trunc_from_full_imagenet_checkpoint(tmp_path):
    import timm

    torch.manual_seed(0)
    full = timm.create_model("resnet50", pretrained=False).eval()
    _save(full.state_dict(), tmp_path / "model.safetensors")  # with layer4.* and fc.*
    enc = create_encoder("resnet50-trunc", weights=tmp_path)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        h = full.maxpool(full.act1(full.bn1(full.conv1(x))))
        want = full.layer3(full.layer2(full.layer1(h))).mean(dim=(2, 3))
    assert enc.dim == 1024 and torch.allclose(enc(x), want, atol=1e-5)


def test_exported_student_loads_by_path_from_config(tmp_path, x224):
    import timm

    args = {"img_size": 224, "patch_size": 16, "embed_dim": 48, "depth": 2, "num_heads": 3}
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **args).eval()
    _save(model.state_dict(), tmp_path / "model.safetensors")
    cfg = {"architecture": "vit_small_patch16_224", "model_args": {**args, "num_classes": 0}, "num_features": 48,
           "global_pool": "token", "num_classes": 0,
           "pretrained_cfg": {"input_size": [3, 224, 224], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                              "interpolation": "bicubic"},
           "gpfm": {"source": "ukd student", "steps": 10}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for name, weights in (("gpfm", tmp_path), ("timm-export", tmp_path / "model.safetensors")):
        enc = create_encoder(name, weights=weights)
        assert enc.dim == 48 and enc.transform.mean == (0.5, 0.5, 0.5)
        with torch.no_grad():
            assert torch.equal(enc(x224), model.forward_features(x224)[:, 0])
    with pytest.raises(GpfmError, match="needs --weights"):
        create_encoder("timm-export")


def test_tiny_weights_trained_elsewhere_load_by_path(tmp_path, x224):
    from gpfm.encoders.weights import save_weights

    trained = create_encoder("tiny-vit", seed=11)
    save_weights(trained, tmp_path / "expert.safetensors")
    enc = create_encoder("tiny-vit", weights=tmp_path / "expert.safetensors")
    assert torch.equal(enc(x224), trained(x224)) and enc.weights_sha256 != "random"


# ------------------------------------------------------------------------------------------ bad input
def test_wrong_architecture_lists_missing_and_unexpected(tmp_path):
    save_file({k: v.contiguous() for k, v in create_encoder("tiny-vit").model.state_dict().items()},
              str(tmp_path / "vit.safetensors"))
    with pytest.raises(GpfmError, match=r"vit.safetensors: weights do not fit tiny-cnn .*\d+ missing \(features"
                                        r".*\d+ unexpected \(blocks\.0\."):
        create_encoder("tiny-cnn", weights=tmp_path / "vit.safetensors")
    deeper = create_encoder("uni", weights="random", overrides={**SMALL, "depth": 3})
    torch.save(deeper.model.state_dict(), tmp_path / "deep.pth")
    with pytest.raises(GpfmError, match=r"14 unexpected \(blocks\.2\."):
        create_encoder("uni", weights=tmp_path / "deep.pth", overrides=SMALL)
    wide = create_encoder("uni", weights="random", overrides={**SMALL, "embed_dim": 64})
    torch.save(wide.model.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(GpfmError, match="mis-shaped"):
        create_encoder("uni", weights=tmp_path / "wide.pth", overrides=SMALL)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickles_with_objects_are_refused(tmp_path):
    torch.save({"model": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(GpfmError, match="cannot read weights safely"):
        read_state_dict(tmp_path / "evil.pt")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(GpfmError, match="unknown weights format"):
        read_state_dict(tmp_path / "w.npz")


def test_missing_file_says_what_is_expected(tmp_path):
    with pytest.raises(GpfmError, match=r"not found for uni \(the official file is pytorch_model.bin from "
                                        r"https://huggingface.co/MahmoodLab/UNI\)"):
        create_encoder("uni", weights=tmp_path / "nope.bin")
    with pytest.raises(GpfmError, match="expected one weights file"):
        create_encoder("uni", weights=tmp_path)  # empty folder


def test_offline_hub_is_a_fast_clear_error(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GpfmError, match=r"uni: weights are not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                                        r"download pytorch_model.bin from https://huggingface.co/MahmoodLab/UNI "
                                        r"\(gated.*HF_TOKEN\)"):
        create_encoder("uni", overrides=SMALL)


def test_hub_cache_is_used_without_network(tmp_path, monkeypatch, x224):
    hub = pytest.importorskip("huggingface_hub")
    ref = create_encoder("uni", weights="random", overrides=SMALL, seed=2)
    repo = tmp_path / "models--MahmoodLab--UNI"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    torch.save(ref.model.state_dict(), snap / "pytorch_model.bin")
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = create_encoder("uni", overrides=SMALL)
    assert torch.equal(enc(x224), ref(x224)) and enc.weights_source.endswith("pytorch_model.bin")


def test_unreachable_host_probe_returns_quickly():
    import time

    t = time.perf_counter()
    assert not reachable("http://127.0.0.1:9", timeout=1.0)  # discard port: refused
    assert time.perf_counter() - t < 2.0


def test_digest_is_sha256_and_warns_on_checksum_mismatch(tmp_path, caplog):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    assert file_digest(p, "md5:00") == hashlib.sha256(b"abc").hexdigest()
    assert "differs from the official" in caplog.text
