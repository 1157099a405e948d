"""Registry: names and aliases, published sizes (meta device), tiny encoders' API, device checks."""

from __future__ import annotations

import pytest
import torch

from gpfm.encoders import create_encoder, encoder_table, get_record, list_encoders
from gpfm.encoders.registry import check_device, count_parameters
from gpfm.io import GpfmError

PUBLISHED = ["gpfm", "uni", "uni2-h", "phikon", "phikon-v2", "conch", "virchow", "virchow2", "h-optimus-0",
             "prov-gigapath", "ctranspath", "plip", "resnet50-trunc"]

# Parameter counts published on the model cards / papers (millions), and a tolerance.
PARAMS_M = {"gpfm": 303, "uni": 303, "uni2-h": 681, "phikon": 86, "phikon-v2": 303, "virchow": 631,
            "virchow2": 631, "h-optimus-0": 1134, "prov-gigapath": 1135, "ctranspath": 27.5, "resnet50-trunc": 8.5,
            "plip": 88, "conch": 88}


def test_every_published_encoder_is_listed():
    names = list_encoders()
    assert names[:len(PUBLISHED)] == PUBLISHED
    assert {"tiny-vit", "tiny-cnn", "timm-export"} <= set(names)
    assert "tiny-vit" not in list_encoders(include_tiny=False)


@pytest.mark.parametrize("alias,name", [
    ("uni_v1", "uni"), ("UNI_V2", "uni2-h"), ("conch_v1", "conch"), ("hoptimus0", "h-optimus-0"),
    ("gigapath", "prov-gigapath"), ("pathology/mahmood_uni", "uni"), ("phikon_v2", "phikon-v2"),
    ("h_optimus_0", "h-optimus-0"), ("resnet50", "resnet50-trunc"), ("pathology/hkust_gpfm", "gpfm"),
    ("paige_virchow2", "virchow2"), ("prov_gigapath", "prov-gigapath")])
def test_aliases(alias, name):
    assert get_record(alias).name == name


def test_unknown_name_lists_close_names():
    with pytest.raises(GpfmError, match=r"unknown encoder 'virchow3'.*did you mean virchow"):
        get_record("virchow3")
    with pytest.raises(GpfmError, match="did you mean phikon"):
        create_encoder("phikonn")


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_architecture_sizes_on_meta(name):
    enc = create_encoder(name, device="meta")
    rec = get_record(name)
    assert enc.dim == rec.dim  # the built feature size is the published one
    n = sum(p.numel() for p in enc.parameters()) / 1e6
    assert abs(n - PARAMS_M[name]) / PARAMS_M[name] < 0.02, n
    assert all(p.device.type == "meta" for p in enc.parameters())
    if enc.has_tokens:
        assert enc.patch_grid == {"conch": (28, 28), "gpfm": (16, 16), "ctranspath": (7, 7), "plip": (7, 7),
                                  "virchow": (16, 16), "virchow2": (16, 16), "h-optimus-0": (16, 16),
                                  "uni2-h": (16, 16)}.get(name, (14, 14))
    else:
        assert name == "resnet50-trunc"


def test_tiny_vit_api_for_experts_and_demo():
    enc = create_encoder("tiny-vit")
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert (enc.dim, enc.patch_grid, enc.transform.input_size, enc.weights_sha256) == (96, (14, 14), 224, "random")
    x01 = torch.rand(3, 3, 256, 256)
    x = enc.transform.prepare(x01)
    feat = enc(x)
    cls, tokens = enc.forward_cls_and_tokens(x)
    assert feat.shape == (3, 96) and tokens.shape == (3, 196, 96)
    assert torch.allclose(cls, feat) and torch.allclose(enc.forward_tokens(x), tokens)
    # the same seed gives the same weights in any process; another seed gives others
    again = create_encoder("tiny-vit")
    assert torch.equal(again(x), feat)
    assert not torch.allclose(create_encoder("tiny-vit", seed=1)(x), feat)


def test_tiny_cnn_has_no_tokens():
    enc = create_encoder("tiny-cnn")
    x = enc.transform.prepare_uint8(torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8))
    assert x.shape == (2, 3, 112, 112)
    cls, tokens = enc.forward_cls_and_tokens(x)
    assert enc(x).shape == (2, 128) and tokens is None and enc.patch_grid is None
    with pytest.raises(GpfmError, match="no spatial patch tokens"):
        enc.forward_tokens(x)


def test_virchow2_feature_concatenates_cls_and_mean_patch_tokens_without_registers():
    enc = create_encoder("virchow2", weights="random", overrides={"embed_dim": 32, "depth": 1, "num_heads": 2})
    x = torch.randn(2, 3, 224, 224)
    t = enc.model.forward_features(x)
    assert t.shape[1] == 1 + 4 + 256  # CLS, 4 registers, 16x16 patches
    assert torch.allclose(enc(x), torch.cat([t[:, 0], t[:, 5:].mean(1)], dim=-1))
    assert enc.forward_tokens(x).shape == (2, 256, 32)


def test_conch_distillation_target_is_normalised_projection():
    enc = create_encoder("conch", weights="random", overrides={"embed_dim": 32, "depth": 1, "num_heads": 2,
                                                               "embed_dim_contrast": 16, "pool_heads": 2})
    x = torch.randn(1, 3, 448, 448)
    cls, tokens = enc.forward_cls_and_tokens(x)
    feat = enc(x)
    assert feat.shape == (1, 16) and tokens.shape == (1, 784, 32)
    assert torch.allclose(cls, torch.nn.functional.normalize(feat @ enc.model.proj_contrast, dim=-1), atol=1e-6)


def test_cuda_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(GpfmError, match="no CUDA GPU"):
        check_device("cuda")
    with pytest.raises(GpfmError, match="no CUDA GPU"):
        create_encoder("tiny-vit", device="cuda:0")
    with pytest.raises(GpfmError, match="use cpu or cuda"):
        check_device("tpu")


def test_table_lists_every_encoder_with_its_definition():
    rows = {r["name"]: r for r in encoder_table()}
    assert set(PUBLISHED) <= set(rows)
    assert rows["conch"]["normalisation"] == "CLIP" and rows["uni"]["normalisation"] == "ImageNet"
    assert rows["prov-gigapath"]["input"].startswith("resize 256, crop 224")
    assert rows["virchow2"]["feature"].startswith("concat(CLS, mean patch token")
    assert rows["uni"]["weights"] == "https://huggingface.co/MahmoodLab/UNI"
    assert rows["uni"]["parameters"] == f"{count_parameters('uni') / 1e6:.1f}M"


def test_model_args_from_json_configs_resolve_layer_names():
    """Hub/exported config.json files spell layers as strings; they must build the same module."""
    from gpfm.encoders.zoo import _timm_kwargs

    want = _timm_kwargs({"mlp_layer": "SwiGLUPacked", "act_layer": "silu"})
    for spelling in ("timm.layers.SwiGLUPacked", "<class 'timm.layers.mlp.SwiGLUPacked'>"):
        got = _timm_kwargs({"mlp_layer": spelling, "act_layer": "<class 'torch.nn.modules.activation.SiLU'>",
                            "num_classes": 0})
        assert got == want
