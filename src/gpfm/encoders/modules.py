"""Encoder wrappers (one feature rule each) and the few model parts timm does not have.

An `Encoder` holds the network in `.model` (whose state-dict keys are what checkpoints are mapped onto), its
`transform`, and the published feature rule. Wrappers: `ViTEncoder` (CLS, CLS + mean patch token, projected CLS),
`PooledEncoder` (globally pooled feature map: CNNs, Swin), `ConchEncoder` (CoCa attentional pooler).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpfm.encoders.transforms import EncoderTransform
from gpfm.io import GpfmError


class Encoder(nn.Module):
    """A frozen image encoder: `forward(prepared) -> (B, dim)`; see gpfm.encoders.registry for the API."""

    def __init__(self, name: str, model: nn.Module, transform: EncoderTransform, feature: str):
        super().__init__()
        self.name = name
        self.model = model
        self.transform = transform
        self.feature = feature
        self.weights_sha256 = "random"
        self.weights_source = "random"
        self.record = None  # set by create_encoder

    # subclasses set these
    dim: int
    cls_dim: int
    token_dim: int | None = None
    patch_grid: tuple[int, int] | None = None

    @property
    def has_tokens(self) -> bool:
        return self.patch_grid is not None

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm patch tokens (B, h*w, C), CLS and registers excluded."""
        tokens = self.forward_cls_and_tokens(x)[1]
        if tokens is None:
            raise GpfmError(f"encoder {self.name} has no spatial patch tokens; use forward() or another encoder")
        return tokens

    def forward_cls_and_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name}, dim={self.dim}, feature={self.feature}, weights={self.weights_sha256[:12]}"


class ViTEncoder(Encoder):
    """timm VisionTransformer. feature: 'cls' | 'cls+mean' (concat CLS and mean patch token) | 'proj' (head(CLS))."""

    def __init__(self, name: str, model: nn.Module, transform: EncoderTransform, feature: str):
        super().__init__(name, model, transform, feature)
        if feature not in ("cls", "cls+mean", "proj"):
            raise ValueError(f"unknown ViT feature rule {feature!r}")
        width = model.embed_dim
        self.npt = model.num_prefix_tokens  # CLS + registers
        self.token_dim = width
        self.cls_dim = model.head.out_features if feature == "proj" else width
        self.dim = {"cls": width, "cls+mean": 2 * width, "proj": self.cls_dim}[feature]
        patch = model.patch_embed.patch_size
        self.patch_grid = (transform.input_size // patch[0], transform.input_size // patch[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.model.forward_features(x)
        cls = t[:, 0]
        if self.feature == "cls":
            return cls
        if self.feature == "cls+mean":
            return torch.cat([cls, t[:, self.npt:].mean(1)], dim=-1)
        return self.model.head(cls)

    def forward_cls_and_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CLS target: the final-norm CLS token; for projected (contrastive) models the L2-normalised embedding."""
        t = self.model.forward_features(x)
        cls = F.normalize(self.model.head(t[:, 0]), dim=-1) if self.feature == "proj" else t[:, 0]
        return cls, t[:, self.npt:]


class PooledEncoder(Encoder):
    """Globally average-pooled last feature map (timm `forward_head(pre_logits=True)`): CNNs, Swin.

    tokens: 'nhwc' when `forward_features` gives final-norm (B, h, w, C) tokens (Swin), None for CNN maps.
    """

    def __init__(self, name: str, model: nn.Module, transform: EncoderTransform, tokens: str | None = None,
                 stride: int | None = None):
        super().__init__(name, model, transform, "pooled")
        self.dim = self.cls_dim = model.num_features
        self.tokens_layout = tokens
        if tokens == "nhwc":
            self.token_dim = self.dim
            self.patch_grid = (transform.input_size // stride, transform.input_size // stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward_cls_and_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = self.model.forward_features(x)
        pooled = self.model.forward_head(f, pre_logits=True)
        return pooled, (f.flatten(1, 2) if self.tokens_layout == "nhwc" else None)


class ConchEncoder(Encoder):
    """CONCH (CoCa) vision tower. Feature: the contrastive attention-pool query after LayerNorm, before
    `proj_contrast` (TRIDENT's `encode_image(proj_contrast=False, normalize=False)`). Distillation CLS target:
    the L2-normalised projected embedding; tokens: the trunk's final-norm patch tokens (GPFM-METHOD R2)."""

    def __init__(self, name: str, model: ConchVisionTower, transform: EncoderTransform):
        super().__init__(name, model, transform, "conch")
        self.dim = self.cls_dim = model.ln_contrast.normalized_shape[0]
        self.token_dim = model.trunk.embed_dim
        patch = model.trunk.patch_embed.patch_size
        self.patch_grid = (transform.input_size // patch[0], transform.input_size // patch[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.pooled(self.model.trunk.forward_features(x))

    def forward_cls_and_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = self.model.trunk.forward_features(x)
        emb = F.normalize(self.model.pooled(t) @ self.model.proj_contrast, dim=-1)
        return emb, t[:, self.model.trunk.num_prefix_tokens:]


# ------------------------------------------------------------------------------------- parts timm lacks
class AttentionalPooler(nn.Module):
    """CoCa attentional pooling: learned queries cross-attend to LayerNorm'ed context tokens (CONCH layout)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.ln_k(x).transpose(0, 1)  # (L, B, C)
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[0], -1)
        return self.attn(q, k, k, need_weights=False)[0].transpose(0, 1)  # (B, n_queries, d_model)


class ConchVisionTower(nn.Module):
    """CONCH's vision tower minus the caption pooler: timm ViT trunk, contrastive pooler, LN, projection."""

    def __init__(self, trunk: nn.Module, embed_dim: int = 512, n_head: int = 8):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(embed_dim, trunk.embed_dim, n_head=n_head, n_queries=1)
        self.ln_contrast = nn.LayerNorm(embed_dim)
        self.proj_contrast = nn.Parameter(trunk.embed_dim ** -0.5 * torch.randn(embed_dim, embed_dim))

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


class ConvStem(nn.Module):
    """CTransPath's convolutional patch embedding for Swin (two stride-2 3x3 convs + 1x1), NHWC output."""

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 norm_layer: type[nn.Module] | None = None, **_: object):
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise ValueError("ConvStem needs patch_size 4 and embed_dim divisible by 8")
        img = img_size if isinstance(img_size, int) else img_size[0]
        self.img_size = (img, img)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img // patch_size, img // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        c_in, c_out = in_chans, embed_dim // 8
        for _i in range(2):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
            c_in, c_out = c_out, c_out * 2
        layers.append(nn.Conv2d(c_in, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class TinyCNN(nn.Module):
    """A small random CNN for tests and the demo: stride-2 conv/BN/ReLU stages, global average pool."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), in_chans: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chans
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.features = nn.Sequential(*layers)
        self.num_features = c

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        return x.mean(dim=(2, 3))
