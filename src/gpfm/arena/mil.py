"""Multiple-instance learning heads on frozen tile features: ABMIL (as in GPFM), gated ABMIL, TransMIL, mean/max.

One interface: `model(x, mask=None) -> logits (B, n_out)` with x (B, N, D) tile features and mask (B, N) True
for real tiles (padded mini-batches); `model.attention(x, mask=None) -> (B, N)` per-tile weights summing to 1
over each bag's real tiles, for heatmaps. `supports_mask` is False for models whose output depends on the padded
length (TransMIL): the trainer then runs their bags one at a time. Build by name with `build_mil`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpfm.io import GpfmError


def _embed(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=1)


class MILModel(nn.Module):
    """Base: embed tiles, pool to one bag vector, classify it."""

    supports_mask = True

    def pool_weights(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(x)
        a = self.pool_weights(h, mask)  # (B, N)
        return self.classifier(torch.einsum("bn,bnd->bd", a, h))

    @torch.no_grad()
    def attention(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool_weights(self.embed(x), mask)


class ABMIL(MILModel):
    """Attention MIL exactly as GPFM's att_mil: Linear(D,512)-ReLU-Dropout(0.25); attention Linear(512,128)-tanh-
    Linear(128,1), softmax over tiles; attention-weighted sum; Linear(512, n_out)."""

    def __init__(self, in_dim: int, n_out: int, hidden: int = 512, attn_hidden: int = 128, dropout: float = 0.25):
        super().__init__()
        self.fc = _embed(in_dim, hidden, dropout)
        self.attention_net = nn.Sequential(nn.Linear(hidden, attn_hidden), nn.Tanh(), nn.Linear(attn_hidden, 1))
        self.classifier = nn.Linear(hidden, n_out)

    def pool_weights(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return _masked_softmax(self.attention_net(h).squeeze(-1), mask)


class GatedABMIL(ABMIL):
    """Gated attention (Ilse et al. 2018): a = w^T (tanh(V h) * sigmoid(U h))."""

    def __init__(self, in_dim: int, n_out: int, hidden: int = 512, attn_hidden: int = 128, dropout: float = 0.25):
        super().__init__(in_dim, n_out, hidden, attn_hidden, dropout)
        self.attention_net = None
        self.attn_v = nn.Sequential(nn.Linear(hidden, attn_hidden), nn.Tanh())
        self.attn_u = nn.Sequential(nn.Linear(hidden, attn_hidden), nn.Sigmoid())
        self.attn_w = nn.Linear(attn_hidden, 1)

    def pool_weights(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return _masked_softmax(self.attn_w(self.attn_v(h) * self.attn_u(h)).squeeze(-1), mask)


class MeanPoolMIL(MILModel):
    """Baseline: embedded tiles averaged (uniform weights)."""

    def __init__(self, in_dim: int, n_out: int, hidden: int = 512, dropout: float = 0.25, **_):
        super().__init__()
        self.fc = _embed(in_dim, hidden, dropout)
        self.classifier = nn.Linear(hidden, n_out)

    def pool_weights(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        m = torch.ones(h.shape[:2], device=h.device) if mask is None else mask.float()
        return m / m.sum(dim=1, keepdim=True).clamp(min=1)


class MaxPoolMIL(MeanPoolMIL):
    """Baseline: per-channel max over embedded tiles; attention = share of channels each tile wins."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(x)
        if mask is not None:
            h = h.masked_fill(~mask[..., None], float("-inf"))
        return self.classifier(h.max(dim=1).values)

    def pool_weights(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            h = h.masked_fill(~mask[..., None], float("-inf"))
        wins = F.one_hot(h.argmax(dim=1), h.shape[1]).float()  # (B, C, N)
        return wins.mean(dim=1)


class _PPEG(nn.Module):
    """TransMIL's pyramid position encoding: depthwise 7/5/3 convolutions over the square token grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls, feat = x[:, :1], x[:, 1:]
        grid = feat.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        grid = grid + sum(c(grid) for c in self.convs)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class _TransLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        return x + self.drop(self.proj(y))

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention of the class token over all tokens, averaged over heads: (B, n)."""
        q, k, _ = self._qkv(x)
        a = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return a.mean(dim=1)[:, 0]


class TransMIL(MILModel):
    """TransMIL (Shao et al. 2021): class token + 2 self-attention layers with a PPEG between, over the tiles
    padded to a square grid by repeating the first ones. Exact softmax attention (torch SDPA) replaces the
    Nystrom approximation, so large bags need the memory-efficient SDPA kernels (or use max_tiles)."""

    supports_mask = False

    def __init__(self, in_dim: int, n_out: int, hidden: int = 512, heads: int = 8, dropout: float = 0.25, **_):
        super().__init__()
        self.fc = _embed(in_dim, hidden, dropout)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.layer1, self.layer2 = _TransLayer(hidden, heads, dropout), _TransLayer(hidden, heads, dropout)
        self.ppeg = _PPEG(hidden)
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, n_out)

    def _tokens(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, int, int]:
        if mask is not None:
            if x.shape[0] != 1:
                raise GpfmError("TransMIL runs one bag at a time (its grid depends on the bag size)")
            x = x[:, mask[0]]
        h = self.fc(x)
        n = h.shape[1]
        side = max(1, math.ceil(math.sqrt(n)))
        h = torch.cat([h, h[:, : side * side - n]], dim=1) if side * side > n else h
        return torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1), side, n

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        t, side, _ = self._tokens(x, mask)
        t = self.layer2(self.ppeg(self.layer1(t), side))
        return self.classifier(self.norm(t)[:, 0])

    @torch.no_grad()
    def attention(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        t, side, n = self._tokens(x, mask)
        tok = self.layer2.cls_attention(self.ppeg(self.layer1(t), side))[:, 1:]
        a = tok[:, :n].clone()
        a[:, : tok.shape[1] - n] += tok[:, n:]  # padding token n+j repeats tile j: credit it
        a = a / a.sum(dim=1, keepdim=True)
        if mask is not None:
            full = a.new_zeros(mask.shape)
            full[mask] = a[0]
            return full
        return a


MIL_MODELS = {"abmil": ABMIL, "gated_abmil": GatedABMIL, "transmil": TransMIL, "mean": MeanPoolMIL,
              "max": MaxPoolMIL}


def build_mil(name: str, in_dim: int, n_out: int, hidden: int = 512, attn_hidden: int = 128,
              dropout: float = 0.25) -> MILModel:
    """A MIL head by name (abmil, gated_abmil, transmil, mean, max)."""
    if name not in MIL_MODELS:
        raise GpfmError(f"unknown MIL model '{name}' (valid: {', '.join(MIL_MODELS)})")
    if name in ("abmil", "gated_abmil"):
        return MIL_MODELS[name](in_dim, n_out, hidden, attn_hidden, dropout)
    return MIL_MODELS[name](in_dim, n_out, hidden=hidden, dropout=dropout)


def attention_scores(model: MILModel, bag: torch.Tensor) -> torch.Tensor:
    """Per-tile attention of one bag (N, D) -> (N,), in eval mode, for heatmaps (align with the coords)."""
    was = model.training
    model.eval()
    try:
        return model.attention(bag[None])[0]
    finally:
        model.train(was)
