"""Heads: the DINO/iBOT prototype head and the per-expert projector (GPFM-METHOD.md §2.2, §2.4).

Both end in a weight-normalised linear layer named `last_layer`; the trainer freezes every `last_layer`
for the first `optim.freeze_last_layer_iters` steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class HeadsConfig:
    prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    ibot_separate_head: bool = False  # GPFM shares the DINO head with iBOT
    ibot_prototypes: int | None = None  # separate head only; default: `prototypes`
    projector_bottleneck: int = 256


class WeightNormLinear(nn.Module):
    """Linear map without bias whose rows are v / |v| * g. `g` is fixed at 1 (DINO prototypes) or learned,
    initialised to 1 (expert projector)."""

    def __init__(self, in_dim: int, out_dim: int, learn_norm: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)
        if learn_norm:
            self.norm_scale = nn.Parameter(torch.ones(out_dim))
        else:
            self.register_buffer("norm_scale", torch.ones(out_dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.weight, dim=1) * self.norm_scale[:, None]
        return F.linear(x, w)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DINOHead(nn.Module):
    """MLP (GELU) -> bottleneck -> L2 norm -> weight-normalised prototypes (no bias, norm fixed at 1)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, learn_norm=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


class ExpertProjector(nn.Module):
    """Linear (bias) -> L2 norm -> weight-normalised Linear (no bias, norm initialised to 1) to the expert's
    dimension. One per expert, shared by its CLS and patch targets."""

    def __init__(self, in_dim: int, out_dim: int, bottleneck_dim: int = 256):
        super().__init__()
        self.proj = nn.Linear(in_dim, bottleneck_dim)
        _init_linear(self.proj)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, learn_norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.proj(x), dim=-1, eps=1e-6))
