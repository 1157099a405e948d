"""Student and EMA teacher: a timm VisionTransformer with an iBOT mask token, plus heads and projectors
(GPFM-METHOD.md §2.1). The backbone's state dict under `backbone.vit.` is plain timm, so the exported
teacher loads with `timm.create_model(architecture, **model_args)`.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpfm.io import GpfmError
from gpfm.pretrain.heads import DINOHead, ExpertProjector, HeadsConfig

log = logging.getLogger("gpfm.pretrain")

# preset -> (timm architecture, its arguments). GPFM's student is `vitl14`: DINOv2 ViT-L/14, MLP FFN, 224 px.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("vit_small_patch16_224", {"embed_dim": 96, "depth": 2, "num_heads": 3}),
    "vits16": ("vit_small_patch16_224", {}),
    "vitb16": ("vit_base_patch16_224", {}),
    "vitl14": ("vit_large_patch14_dinov2", {}),
    "vitg14": ("vit_giant_patch14_dinov2", {}),
}


@dataclass
class ModelConfig:
    preset: str = "vitl14"
    model_args: dict[str, Any] = field(default_factory=dict)  # timm VisionTransformer overrides
    img_size: int | None = None  # default: crops.global_size
    drop_path_rate: float = 0.4
    drop_path_uniform: bool = True  # False: timm's linear 0 -> rate over the blocks
    layerscale: float | None = 1e-5
    grad_checkpointing: bool = False
    init: str | None = None  # export folder / model.safetensors / gpfm checkpoint to start the student from
    init_strict: bool = True  # False: load what matches and record every missing/unexpected key (R8)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise GpfmError(f"config key 'model.preset': unknown '{self.preset}' (choose {', '.join(PRESETS)})")


def timm_spec(cfg: ModelConfig, img_size: int) -> tuple[str, dict[str, Any]]:
    """(architecture, model_args) for timm.create_model, without training-only arguments."""
    arch, args = PRESETS[cfg.preset]
    args = {**args, **cfg.model_args, "img_size": cfg.img_size or img_size, "num_classes": 0,
            "dynamic_img_size": True}
    if cfg.layerscale is not None:
        args["init_values"] = cfg.layerscale
    return arch, args


class Backbone(nn.Module):
    """timm ViT plus a learned mask token that replaces masked patch embeddings (iBOT)."""

    def __init__(self, arch: str, model_args: dict[str, Any], drop_path_rate: float = 0.0,
                 grad_checkpointing: bool = False, drop_path_uniform: bool = True):
        super().__init__()
        import timm
        from timm.layers import DropPath

        self.arch, self.model_args = arch, dict(model_args)
        self.vit = timm.create_model(arch, pretrained=False, drop_path_rate=drop_path_rate, **model_args)
        if drop_path_uniform and drop_path_rate > 0:  # DINOv2/GPFM: the same rate in every block
            for blk in self.vit.blocks:
                blk.drop_path1, blk.drop_path2 = DropPath(drop_path_rate), DropPath(drop_path_rate)
        self.vit.set_grad_checkpointing(grad_checkpointing)
        self.embed_dim = self.vit.embed_dim
        self.patch_size = self.vit.patch_embed.patch_size[0]
        self.n_blocks = len(self.vit.blocks)
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None):
        """Images (B, 3, H, W) -> (final-norm CLS (B, C), final-norm patch tokens (B, h*w, C), (h, w))."""
        v = self.vit
        x = v.patch_embed(x)  # (B, h, w, C): dynamic_img_size
        b, h, w, c = x.shape
        if masks is not None:
            x = torch.where(masks.view(b, h, w, 1), self.mask_token.to(x.dtype).view(1, 1, 1, c), x)
        x = v.norm_pre(v.patch_drop(v._pos_embed(x)))
        if v.grad_checkpointing and self.training:
            from timm.models._manipulate import checkpoint_seq

            x = checkpoint_seq(v.blocks, x)
        else:
            x = v.blocks(x)
        x = v.norm(x)
        return x[:, 0], x[:, v.num_prefix_tokens:], (h, w)


class Teacher(nn.Module):
    """What the EMA tracks: backbone and self-distillation heads."""

    def __init__(self, backbone: Backbone, dino_head: DINOHead | None, ibot_head: DINOHead | None):
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head

    def patch_head(self) -> DINOHead | None:
        return self.ibot_head if self.ibot_head is not None else self.dino_head


class Student(Teacher):
    """Teacher's parts plus one projector per expert (a second one where the expert's token width differs)."""

    def __init__(self, backbone: Backbone, dino_head: DINOHead | None, ibot_head: DINOHead | None,
                 projectors: nn.ModuleDict, patch_projectors: nn.ModuleDict, use_ibot: bool):
        super().__init__(backbone, dino_head, ibot_head)
        self.projectors, self.patch_projectors, self.use_ibot = projectors, patch_projectors, use_ibot
        self.patch_experts: set[str] = set()

    def make_teacher(self) -> Teacher:
        t = Teacher(copy.deepcopy(self.backbone), copy.deepcopy(self.dino_head), copy.deepcopy(self.ibot_head))
        for p in t.parameters():
            p.requires_grad_(False)
        return t

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None,
                masks: torch.Tensor | None) -> dict[str, Any]:
        """One call for everything that needs gradients (so DDP sees a single forward)."""
        cls_g, patch_g, grid = self.backbone(global_crops, masks)
        out: dict[str, Any] = {"cls_g": cls_g, "patch_g": patch_g, "grid": grid}
        if self.dino_head is not None:
            cls = [cls_g]
            if local_crops is not None and local_crops.shape[0]:
                cls.append(self.backbone(local_crops)[0])
            n_cls = sum(c.shape[0] for c in cls)
            masked = patch_g[masks] if (self.use_ibot and masks is not None) else patch_g[:, :0].flatten(0, 1)
            if self.ibot_head is None:
                logits = self.dino_head(torch.cat(cls + [masked]))
                out["dino"], out["ibot"] = logits[:n_cls], logits[n_cls:]
            else:
                out["dino"], out["ibot"] = self.dino_head(torch.cat(cls)), self.ibot_head(masked)
        out["proj_cls"] = {e: p(cls_g) for e, p in self.projectors.items()}
        out["proj_patch"] = {}
        for e in self.patch_experts:
            proj = self.patch_projectors[e] if e in self.patch_projectors else self.projectors[e]
            out["proj_patch"][e] = proj(patch_g)
        return out


def build_student(model_cfg: ModelConfig, heads_cfg: HeadsConfig, img_size: int, self_distill: bool,
                  use_ibot: bool, experts: dict[str, tuple[int, int | None]]) -> Student:
    """`experts` maps name -> (CLS target dim, token target dim or None when it has no patch term)."""
    arch, args = timm_spec(model_cfg, img_size)
    backbone = Backbone(arch, args, model_cfg.drop_path_rate, model_cfg.grad_checkpointing,
                        model_cfg.drop_path_uniform)
    d, h = backbone.embed_dim, heads_cfg
    dino = ibot = None
    if self_distill:
        dino = DINOHead(d, h.prototypes, h.hidden_dim, h.bottleneck_dim, h.nlayers)
        if use_ibot and h.ibot_separate_head:
            ibot = DINOHead(d, h.ibot_prototypes or h.prototypes, h.hidden_dim, h.bottleneck_dim, h.nlayers)
    projectors = nn.ModuleDict({e: ExpertProjector(d, dims[0], h.projector_bottleneck) for e, dims in experts.items()})
    patch_projectors = nn.ModuleDict({e: ExpertProjector(d, dims[1], h.projector_bottleneck)
                                      for e, dims in experts.items() if dims[1] is not None and dims[1] != dims[0]})
    student = Student(backbone, dino, ibot, projectors, patch_projectors, use_ibot and self_distill)
    student.patch_experts = {e for e, dims in experts.items() if dims[1] is not None}
    return student


# ------------------------------------------------------------------------------------------ parameter groups
def layer_id(name: str, n_blocks: int) -> int:
    """DINOv2's layer index: 0 for embeddings and tokens, i + 1 for block i, n_blocks + 1 for the rest."""
    if name.startswith("backbone."):
        if any(k in name for k in ("pos_embed", "patch_embed", "mask_token", "cls_token", "reg_token")):
            return 0
        m = re.search(r"\.blocks\.(\d+)\.", name)
        if m:
            return int(m.group(1)) + 1
    return n_blocks + 1


def param_groups(model: nn.Module, n_blocks: int, layer_decay: float, patch_embed_lr_mult: float) -> list[dict]:
    """AdamW groups with `lr_mult`, `wd_mult` and `last_layer` flags: layer-wise lr decay on the backbone,
    patch-embedding lr multiplier, no weight decay on biases, norms and LayerScale."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult = layer_decay ** (n_blocks + 1 - layer_id(name, n_blocks))
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        no_wd = name.endswith(".bias") or "norm" in name or "gamma" in name or p.ndim == 1
        key = (lr_mult, 0.0 if no_wd else 1.0, "last_layer" in name)
        g = groups.setdefault(key, {"params": [], "names": [], "lr_mult": key[0], "wd_mult": key[1],
                                    "last_layer": key[2]})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


# ------------------------------------------------------------------------------------------ initialisation
def load_init(backbone: Backbone, path: str | Path, strict: bool = True) -> dict[str, Any]:
    """Initialise the backbone from an export (model.safetensors, timm keys) or a gpfm checkpoint's teacher.

    Strict: any missing or unexpected key is an error listing them. Not strict: load what matches and
    return every missing/unexpected key for the run record (R8)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise GpfmError(f"{path}: model.init not found; give an export folder, model.safetensors or checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        prefix = "backbone.vit."
        sd = {k[len(prefix):]: v for k, v in ckpt.get("teacher", {}).items() if k.startswith(prefix)}
    own = backbone.vit.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad_shape = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if strict and (missing or unexpected or bad_shape):
        raise GpfmError(f"{path}: does not fit the student ({len(missing)} missing, {len(unexpected)} unexpected, "
                        f"{len(bad_shape)} wrong-shape keys, e.g. {(missing + unexpected + bad_shape)[:3]}); "
                        "fix model.preset/model_args or set model.init_strict=false")
    load = {k: v for k, v in sd.items() if k in own and k not in bad_shape}
    backbone.vit.load_state_dict(load, strict=False)
    report = {"source": str(path), "loaded": len(load), "missing": missing, "unexpected": unexpected,
              "wrong_shape": bad_shape}
    log.info("init from %s: %d tensors loaded, %d missing, %d unexpected, %d wrong shape", path, len(load),
             len(missing), len(unexpected), len(bad_shape))
    return report
