"""The published pathology encoders (and tiny random ones), one record each, and their builders.

Records follow each model's own loader (model cards, mahmoodlab/TRIDENT, kaiko-ai/eva; GPFM-METHOD §4):
architecture, input size, resize/crop, interpolation, mean/std, feature rule, weights (hub id, file, layout,
licence). Builders construct the SAME module for full and reduced (`overrides`) configurations, so tests of
the key mapping on tiny widths cover the code that loads the real checkpoints.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn

from gpfm.encoders.modules import (
    ConchEncoder,
    ConchVisionTower,
    ConvStem,
    Encoder,
    PooledEncoder,
    TinyCNN,
    ViTEncoder,
)
from gpfm.encoders.registry import EncoderRecord, WeightSource, register
from gpfm.encoders.transforms import CLIP_MEAN, CLIP_STD

NC_ND = "CC-BY-NC-ND-4.0"
_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "silu"}

# ------------------------------------------------------------------------------------------ published
register(EncoderRecord(
    name="gpfm", architecture="ViT-L/14 DINOv2-style, MLP FFN, LayerScale", kind="timm-vit",
    model_args={"arch": "vit_large_patch14_dinov2", "img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
    feature="cls", feature_text="final-norm CLS", dim=1024, input_size=224, resize_size=224, crop="none",
    mpp=0.25, tile_size=512, aliases=("hkust_gpfm",),
    weights=WeightSource(hub_id="majiabo/GPFM", filenames=("GPFM.pth",), layout="dinov2-teacher",
                         checksum="md5:0dc7e345de84f385d09c8c782b4b3236", licence="see github.com/birkhoffkiki/GPFM",
                         url="https://github.com/birkhoffkiki/GPFM/releases (ckpt/GPFM.pth)"),
    notes="EMA teacher of the released GPFM.pth; 512 px level-0 tiles (40x) resized to 224"))
register(EncoderRecord(
    name="uni", architecture="ViT-L/16", kind="timm-vit",
    model_args={"arch": "vit_large_patch16_224", "img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
    feature="cls", feature_text="CLS", dim=1024, mpp=0.5, tile_size=256, aliases=("uni_v1", "mahmood_uni"),
    weights=WeightSource(hub_id="MahmoodLab/UNI", filenames=("pytorch_model.bin",), licence=NC_ND, gated=True)))
register(EncoderRecord(
    name="uni2-h", architecture="ViT-H/14 class: 1536-d, 24 blocks, SwiGLU, 8 registers", kind="timm-vit",
    model_args={"arch": "vit_giant_patch14_224", "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True,
                "reg_tokens": 8, "dynamic_img_size": True, **_SWIGLU},
    feature="cls", feature_text="CLS", dim=1536, mpp=0.5, tile_size=256, aliases=("uni_v2", "mahmood_uni2_h"),
    weights=WeightSource(hub_id="MahmoodLab/UNI2-h", filenames=("pytorch_model.bin",), licence=NC_ND, gated=True)))
register(EncoderRecord(
    name="phikon", architecture="ViT-B/16 (iBOT)", kind="timm-vit",
    model_args={"arch": "vit_base_patch16_224", "img_size": 224, "norm_eps": 1e-12, "dynamic_img_size": True},
    feature="cls", feature_text="CLS (last_hidden_state[:, 0])", dim=768, mpp=0.5, tile_size=224,
    aliases=("owkin_phikon",),
    weights=WeightSource(hub_id="owkin/phikon", filenames=("model.safetensors", "pytorch_model.bin"),
                         layout="hf-vit", licence="Owkin non-commercial")))
register(EncoderRecord(
    name="phikon-v2", architecture="ViT-L/16 (DINOv2)", kind="timm-vit",
    model_args={"arch": "vit_large_patch16_224", "img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
    feature="cls", feature_text="CLS (last_hidden_state[:, 0])", dim=1024, mpp=0.5, tile_size=224,
    aliases=("owkin_phikon_v2",),
    weights=WeightSource(hub_id="owkin/phikon-v2", filenames=("model.safetensors", "pytorch_model.bin"),
                         layout="hf-dinov2", licence="Owkin non-commercial")))
register(EncoderRecord(
    name="conch", architecture="CoCa ViT-B/16 + attentional pooler", kind="conch",
    model_args={"arch": "vit_base_patch16_224", "img_size": 448, "embed_dim_contrast": 512, "pool_heads": 8},
    feature="conch", feature_text="contrastive pool query after LN, before proj_contrast", dim=512,
    input_size=448, resize_size=448, mean=CLIP_MEAN, std=CLIP_STD, mpp=0.5, tile_size=448,
    aliases=("conch_v1", "mahmood_conch"),
    weights=WeightSource(hub_id="MahmoodLab/CONCH", filenames=("pytorch_model.bin",), layout="conch",
                         licence=NC_ND, gated=True)))
register(EncoderRecord(
    name="virchow", architecture="ViT-H/14, SwiGLU", kind="timm-vit",
    model_args={"arch": "vit_huge_patch14_224", "img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375,
                "dynamic_img_size": True, **_SWIGLU},
    feature="cls+mean", feature_text="concat(CLS, mean patch token)", dim=2560, mpp=0.5, tile_size=224,
    aliases=("paige_virchow", "virchow1", "virchow_v1"),
    weights=WeightSource(hub_id="paige-ai/Virchow", filenames=("pytorch_model.bin",), licence="Apache-2.0",
                         gated=True)))
register(EncoderRecord(
    name="virchow2", architecture="ViT-H/14, SwiGLU, 4 registers", kind="timm-vit",
    model_args={"arch": "vit_huge_patch14_224", "img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375,
                "reg_tokens": 4, "dynamic_img_size": True, **_SWIGLU},
    feature="cls+mean", feature_text="concat(CLS, mean patch token; registers excluded)", dim=2560,
    mpp=0.5, tile_size=224, aliases=("paige_virchow2", "virchow_v2"),
    weights=WeightSource(hub_id="paige-ai/Virchow2", filenames=("pytorch_model.bin",), licence=NC_ND, gated=True),
    notes="eva uses the CLS token only (1280-d)"))
register(EncoderRecord(
    name="h-optimus-0", architecture="ViT-g/14, SwiGLU, 4 registers", kind="timm-vit",
    model_args={"arch": "vit_giant_patch14_reg4_dinov2", "img_size": 224, "init_values": 1e-5},
    feature="cls", feature_text="CLS", dim=1536, mean=(0.707223, 0.578729, 0.703617),
    std=(0.211883, 0.230117, 0.177517), mpp=0.5, tile_size=224, aliases=("hoptimus0", "bioptimus_h_optimus_0"),
    weights=WeightSource(hub_id="bioptimus/H-optimus-0", filenames=("model.safetensors", "pytorch_model.bin"),
                         licence="Apache-2.0", gated=True)))
register(EncoderRecord(
    name="prov-gigapath", architecture="ViT-g body (1536-d, 40 blocks, SwiGLU), 16 px patches", kind="timm-vit",
    model_args={"arch": "vit_giant_patch14_dinov2", "img_size": 224, "patch_size": 16, "embed_dim": 1536,
                "depth": 40, "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334},
    feature="cls", feature_text="CLS", dim=1536, resize_size=256, mpp=0.5, tile_size=256,
    aliases=("gigapath", "prov_gigapath"),
    weights=WeightSource(hub_id="prov-gigapath/prov-gigapath", filenames=("pytorch_model.bin",),
                         licence="Apache-2.0", gated=True)))
register(EncoderRecord(
    name="ctranspath", architecture="Swin-T + ConvStem", kind="ctranspath",
    model_args={"arch": "swin_tiny_patch4_window7_224"},
    feature="pooled", feature_text="average-pooled last stage", dim=768, mpp=0.5, tile_size=256,
    aliases=("transpath",),
    weights=WeightSource(hub_id="jamesdolezal/CTransPath", filenames=("ctranspath.pth",), layout="ctranspath",
                         licence="see github.com/Xiyue-Wang/TransPath")))
register(EncoderRecord(
    name="plip", architecture="CLIP ViT-B/32 vision tower + projection", kind="timm-vit",
    model_args={"arch": "vit_base_patch32_clip_quickgelu_224", "img_size": 224, "proj_dim": 512},
    feature="proj", feature_text="projected image embedding", dim=512, mean=CLIP_MEAN, std=CLIP_STD,
    mpp=0.5, tile_size=224, aliases=("vinid_plip",),
    weights=WeightSource(hub_id="vinid/plip", filenames=("model.safetensors", "pytorch_model.bin"),
                         layout="hf-clip")))
register(EncoderRecord(
    name="resnet50-trunc", architecture="ImageNet ResNet-50 up to layer3", kind="timm-pooled",
    model_args={"arch": "resnet50", "truncate_after": "layer3"},
    feature="pooled", feature_text="average-pooled layer3", dim=1024, interpolation="bilinear", mpp=0.5,
    tile_size=256, aliases=("resnet50", "resnet50_tv_trunc"),
    weights=WeightSource(hub_id="timm/resnet50.tv_in1k", filenames=("model.safetensors", "pytorch_model.bin"),
                         layout="resnet-trunc", licence="BSD-3-Clause")))
register(EncoderRecord(
    name="timm-export", architecture="from config.json (timm hub style)", kind="timm-export",
    feature="cls", feature_text="CLS (or the config's gpfm.feature)", dim=0,
    notes="exported models: a folder with model.safetensors + config.json"))

# ---------------------------------------------------------------------------------------------- tiny
register(EncoderRecord(
    name="tiny-vit", architecture="ViT 96-d, 3 blocks, patch 16 (random)", kind="timm-vit",
    model_args={"arch": "vit_tiny_patch16_224", "img_size": 224, "embed_dim": 96, "depth": 3, "num_heads": 3,
                "dynamic_img_size": True},
    feature="cls", feature_text="final-norm CLS", dim=96, mpp=0.5, tile_size=224))
register(EncoderRecord(
    name="tiny-cnn", architecture="4-stage stride-2 CNN (random)", kind="tiny-cnn",
    model_args={"widths": (16, 32, 64, 128)}, feature="pooled", feature_text="average-pooled last stage", dim=128,
    input_size=112, resize_size=112, crop="none", interpolation="bilinear", mean=CLIP_MEAN, std=CLIP_STD,
    mpp=1.0, tile_size=112))


# ------------------------------------------------------------------------------------------- builders
def _timm_kwargs(args: dict) -> dict:
    """JSON-able model args -> timm kwargs ('SwiGLUPacked', 'timm.layers.SwiGLUPacked' or "<class '...'>")."""
    import timm.layers

    args = {k: v for k, v in args.items() if k != "num_classes"}
    for key in ("mlp_layer", "act_layer"):
        if isinstance(args.get(key), str):
            name = re.findall(r"[A-Za-z_]\w*", args[key])[-1]
            args[key] = getattr(timm.layers, name) if key == "mlp_layer" else \
                {"quickgelu": "quick_gelu"}.get(name.lower(), name.lower())
    if "norm_eps" in args:
        args["norm_layer"] = partial(nn.LayerNorm, eps=args.pop("norm_eps"))
    return args


def _timm_vit(record: EncoderRecord) -> Encoder:
    import timm

    args = _timm_kwargs(record.model_args)
    arch, proj_dim = args.pop("arch"), args.pop("proj_dim", None)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **args)
    if proj_dim:
        model.head = nn.Linear(model.embed_dim, proj_dim, bias=False)
    return ViTEncoder(record.name, model, record.transform, record.feature)


def _timm_pooled(record: EncoderRecord) -> Encoder:
    import timm

    args = dict(record.model_args)
    arch, cut = args.pop("arch"), args.pop("truncate_after", None)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **args)
    if cut == "layer3":  # ResNet: drop layer4, pool layer3
        model.layer4 = nn.Identity()
        model.num_features = model.layer3[-1].conv3.out_channels
    return PooledEncoder(record.name, model, record.transform)


def _ctranspath(record: EncoderRecord) -> Encoder:
    import timm

    args = dict(record.model_args)
    model = timm.create_model(args.pop("arch"), pretrained=False, num_classes=0, embed_layer=ConvStem, **args)
    stride = 4 * 2 ** (len(model.layers) - 1)
    return PooledEncoder(record.name, model, record.transform, tokens="nhwc", stride=stride)


def _conch(record: EncoderRecord) -> Encoder:
    import timm

    args = dict(record.model_args)
    arch, dim, heads = args.pop("arch"), args.pop("embed_dim_contrast"), args.pop("pool_heads")
    trunk = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True, **args)
    return ConchEncoder(record.name, ConchVisionTower(trunk, embed_dim=dim, n_head=heads), record.transform)


def _tiny_cnn(record: EncoderRecord) -> Encoder:
    return PooledEncoder(record.name, TinyCNN(tuple(record.model_args["widths"])), record.transform)


def _timm_export(record: EncoderRecord) -> Encoder:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    args = _timm_kwargs(record.model_args)
    model = timm.create_model(args.pop("arch"), pretrained=False, num_classes=0, **args)
    if isinstance(model, VisionTransformer):
        return ViTEncoder(record.name, model, record.transform, record.feature)
    return PooledEncoder(record.name, model, record.transform)


BUILDERS: dict[str, Callable[[EncoderRecord], Encoder]] = {
    "timm-vit": _timm_vit, "timm-pooled": _timm_pooled, "ctranspath": _ctranspath, "conch": _conch,
    "tiny-cnn": _tiny_cnn, "timm-export": _timm_export,
}


def build(record: EncoderRecord, device: str = "cpu") -> Encoder:
    """Construct the (randomly initialised) encoder for a record; "meta" allocates nothing."""
    with torch.device(device):
        return BUILDERS[record.kind](record)
