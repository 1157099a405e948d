"""A small transformer text decoder over visual memory, with batched greedy and beam-search decoding.

Visual memory (`VisualMemory`): frozen features (B, N, D) -> LayerNorm -> Linear(D, d_model). For slides with
many tiles, `memory_tokens` > 0 compresses the N tiles to M learned-query tokens by cross-attention
(Perceiver-style pooling; padding-masked), so the decoder attends to M tokens whatever N is (10,000+ tiles fit).
For ROIs the memory is the single image feature (N = 1).

Decoder (`TextDecoder`): token + learned position embeddings, pre-norm nn.TransformerDecoder layers (causal
self-attention, cross-attention to the memory), tied output projection. Trained with teacher forcing
(`caption_loss`); decoded with `greedy_decode` or `beam_search` (GNMT length penalty ((5 + L) / 6) ** alpha,
a hard `max_len`), both batched over reports. Decoding runs the same layers one position at a time
(`TextDecoder.step`) with cached self-attention keys/values and cross-attention keys/values computed once, so a
step costs one position instead of the whole prefix (tested equal to the full forward pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gpfm.arena.text import BOS, EOS, PAD
from gpfm.io import GpfmError


@dataclass
class DecoderConfig:
    """Sizes of the visual memory and the decoder (`settings.decoder` in a task spec)."""

    d_model: int = 256
    n_layers: int = 3
    n_heads: int = 8
    ff_mult: int = 4
    dropout: float = 0.1
    memory_tokens: int = 32  # learned-query pooling of tiles to this many tokens; 0 = attend to every tile
    max_len: int = 256  # tokens per text, <bos>/<eos> excluded

    def check(self, where: str = "settings.decoder") -> None:
        if self.d_model % self.n_heads:
            raise GpfmError(f"{where}: d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if min(self.d_model, self.n_layers, self.n_heads, self.ff_mult, self.max_len) < 1 or self.memory_tokens < 0:
            raise GpfmError(f"{where}: sizes must be positive (memory_tokens >= 0)")


class AttentionPool(nn.Module):
    """M learned queries cross-attend to N inputs (masked) -> (B, M, d), then a residual feed-forward block."""

    def __init__(self, d: int, n_queries: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, d) * d ** -0.5)
        self.norm_kv = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self.queries.unsqueeze(0).expand(x.size(0), -1, -1)
        kv = self.norm_kv(x)
        out = q + self.attn(q, kv, kv, key_padding_mask=pad_mask, need_weights=False)[0]
        return out + self.ff(out)


class VisualMemory(nn.Module):
    """Project frozen features (B, N, in_dim) to d_model; optionally pool them to `memory_tokens` tokens."""

    def __init__(self, in_dim: int, cfg: DecoderConfig):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, cfg.d_model), nn.GELU(),
                                  nn.Dropout(cfg.dropout))
        self.pool = AttentionPool(cfg.d_model, cfg.memory_tokens, cfg.n_heads, cfg.dropout) \
            if cfg.memory_tokens > 0 else None

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(memory (B, M, d), its key padding mask (True = padding) or None)."""
        h = self.proj(x)
        if self.pool is None:
            return h, pad_mask
        return self.pool(h, pad_mask), None


class TextDecoder(nn.Module):
    """Causal transformer decoder with cross-attention to memory; logits over the vocabulary."""

    def __init__(self, vocab_size: int, cfg: DecoderConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.d_model, padding_idx=PAD)
        nn.init.normal_(self.embed.weight, std=cfg.d_model ** -0.5)  # tied: keeps initial logits O(1)
        self.pos = nn.Parameter(torch.zeros(cfg.max_len + 2, cfg.d_model))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerDecoderLayer(cfg.d_model, cfg.n_heads, cfg.ff_mult * cfg.d_model, cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerDecoder(layer, cfg.n_layers)
        self.norm = nn.LayerNorm(cfg.d_model)

    @property
    def vocab_size(self) -> int:
        return self.embed.num_embeddings

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Logits (B, T, V) for next-token prediction at every position of `tokens` (B, T)."""
        t = tokens.size(1)
        if t > self.pos.size(0):
            raise GpfmError(f"decoder input of {t} tokens exceeds max_len + 2 = {self.pos.size(0)}")
        h = self.embed(tokens) * self.cfg.d_model ** 0.5 + self.pos[:t]
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device, dtype=h.dtype)
        h = self.layers(h, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=memory_mask)
        return self.norm(h) @ self.embed.weight.T

    # ---- incremental decoding: the same computation as forward(), one position at a time with cached keys/values
    def start(self, memory: torch.Tensor, memory_mask: torch.Tensor | None = None) -> DecodeState:
        """Decoding state for `memory`: cross-attention keys/values computed once, empty self-attention caches."""
        cross = [_kv(layer.multihead_attn, memory) for layer in self.layers.layers]
        keep = None if memory_mask is None else ~memory_mask[:, None, None, :]
        return DecodeState(cross, [None] * len(cross), keep, 0)

    def step(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Next-token logits (B, V) after feeding `tokens` (B,) at position state.t (then state.t += 1)."""
        if state.t >= self.pos.size(0):
            raise GpfmError(f"decoding past max_len + 2 = {self.pos.size(0)} positions")
        h = self.embed(tokens)[:, None] * self.cfg.d_model ** 0.5 + self.pos[state.t]
        for li, layer in enumerate(self.layers.layers):
            x = layer.norm1(h)
            q, k, v = _qkv(layer.self_attn, x)
            if state.self_kv[li] is not None:
                k = torch.cat([state.self_kv[li][0], k], 2)
                v = torch.cat([state.self_kv[li][1], v], 2)
            state.self_kv[li] = (k, v)
            h = h + _attend(layer.self_attn, q, k, v, None)
            q = _q(layer.multihead_attn, layer.norm2(h))
            h = h + _attend(layer.multihead_attn, q, *state.cross[li], state.keep)
            h = h + layer.linear2(layer.activation(layer.linear1(layer.norm3(h))))
        state.t += 1
        return (self.norm(h) @ self.embed.weight.T)[:, 0]


@dataclass
class DecodeState:
    """Per-layer cross-attention (K, V), self-attention caches (K, V) (B, heads, t, head_dim), memory mask."""

    cross: list[tuple[torch.Tensor, torch.Tensor]]
    self_kv: list[tuple[torch.Tensor, torch.Tensor] | None]
    keep: torch.Tensor | None  # (B, 1, 1, M) True = attend
    t: int

    def select(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search reorders its beams)."""
        self.cross = [(k[index], v[index]) for k, v in self.cross]
        self.self_kv = [None if c is None else (c[0][index], c[1][index]) for c in self.self_kv]
        self.keep = None if self.keep is None else self.keep[index]


def _heads(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, mha.num_heads, -1).transpose(1, 2)


def _q(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    d = mha.embed_dim
    return _heads(mha, F.linear(x, mha.in_proj_weight[:d], mha.in_proj_bias[:d]))


def _kv(mha: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = mha.embed_dim
    k, v = F.linear(x, mha.in_proj_weight[d:], mha.in_proj_bias[d:]).chunk(2, -1)
    return _heads(mha, k), _heads(mha, v)


def _qkv(mha: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
    return _heads(mha, q), _heads(mha, k), _heads(mha, v)


def _attend(mha: nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            keep: torch.Tensor | None) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # eval mode: no dropout
    b, _, t, _ = out.shape
    return mha.out_proj(out.transpose(1, 2).reshape(b, t, mha.embed_dim))


def caption_loss(decoder: TextDecoder, ids: torch.Tensor, memory: torch.Tensor,
                 memory_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher-forced cross-entropy of `ids` (B, T) = <bos> w1 .. wn <eos> <pad>..., padding ignored."""
    logits = decoder(ids[:, :-1], memory, memory_mask)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), ignore_index=PAD)


def _next_logp(decoder: TextDecoder, tokens: torch.Tensor, state: DecodeState, last: bool) -> torch.Tensor:
    logp = F.log_softmax(decoder.step(tokens, state).float(), dim=-1)
    logp[:, PAD] = -torch.inf
    logp[:, BOS] = -torch.inf
    if last:  # the length limit: only <eos> may follow
        eos = logp[:, EOS].clone()
        logp.fill_(-torch.inf)
        logp[:, EOS] = eos
    return logp


@torch.no_grad()
def greedy_decode(decoder: TextDecoder, memory: torch.Tensor, memory_mask: torch.Tensor | None = None,
                  max_len: int | None = None) -> torch.Tensor:
    """Most likely next token at each step; (B, L) ids after <bos>, <eos>-terminated or cut at max_len."""
    max_len = min(max_len or decoder.cfg.max_len, decoder.cfg.max_len)
    b = memory.size(0)
    state = decoder.start(memory, memory_mask)
    tok = torch.full((b,), BOS, dtype=torch.long, device=memory.device)
    done = torch.zeros(b, dtype=torch.bool, device=memory.device)
    out = []
    for t in range(max_len + 1):
        tok = _next_logp(decoder, tok, state, t == max_len).argmax(-1)
        tok = torch.where(done, torch.full_like(tok, PAD), tok)
        out.append(tok)
        done |= tok == EOS
        if bool(done.all()):
            break
    return torch.stack(out, 1)


def length_penalty(length: torch.Tensor | float, alpha: float) -> torch.Tensor | float:
    """GNMT length normalisation ((5 + L) / 6) ** alpha (alpha 0: plain log-probability)."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def beam_search(decoder: TextDecoder, memory: torch.Tensor, memory_mask: torch.Tensor | None = None,
                beam: int = 3, max_len: int | None = None, alpha: float = 0.6) -> torch.Tensor:
    """Batched beam search; returns the best hypothesis per item, (B, L) ids after <bos> (<eos>-terminated).

    Finished hypotheses are ranked by log-probability / length_penalty(words, alpha); the search stops for an
    item once no live beam can beat its `beam` finished ones, or at max_len where <eos> is forced.
    """
    if beam <= 1:
        return greedy_decode(decoder, memory, memory_mask, max_len)
    max_len = min(max_len or decoder.cfg.max_len, decoder.cfg.max_len)
    b, k, dev = memory.size(0), beam, memory.device
    state = decoder.start(memory.repeat_interleave(k, 0),
                          memory_mask.repeat_interleave(k, 0) if memory_mask is not None else None)
    seqs = torch.full((b * k, 1), BOS, dtype=torch.long, device=dev)
    scores = torch.full((b, k), -torch.inf, device=dev)
    scores[:, 0] = 0.0
    fin_scores = torch.full((b, k), -torch.inf, device=dev)
    fin_seqs = torch.full((b, k, max_len + 1), PAD, dtype=torch.long, device=dev)
    rows = torch.arange(b, device=dev)[:, None]
    for t in range(max_len + 1):
        logp = _next_logp(decoder, seqs[:, -1], state, t == max_len)
        v = logp.size(-1)
        top_s, top_i = (scores.reshape(b * k, 1) + logp).reshape(b, k * v).topk(2 * k, dim=1)
        src, tok = top_i // v, top_i % v
        prev = seqs.reshape(b, k, -1)[rows, src, 1:]  # (b, 2k, t) words so far of each candidate's beam
        # candidates ending in <eos> join the finished pool (t words, normalised)
        is_eos = tok == EOS
        norm = torch.where(is_eos & torch.isfinite(top_s), top_s / length_penalty(float(t), alpha), -torch.inf)
        cand = torch.full((b, 2 * k, max_len + 1), PAD, dtype=torch.long, device=dev)
        cand[:, :, :t] = prev
        cand[:, :, t] = EOS
        pool_s, pool_i = torch.cat([fin_scores, norm], 1).topk(k, dim=1)
        fin_seqs = torch.cat([fin_seqs, cand], 1)[rows, pool_i]
        fin_scores = pool_s
        # the best k other candidates stay alive
        live_s, live_j = torch.where(is_eos, -torch.inf, top_s).topk(k, dim=1)
        new = torch.cat([prev[rows, live_j], tok[rows, live_j][..., None]], dim=2)
        seqs = torch.cat([torch.full((b, k, 1), BOS, dtype=torch.long, device=dev), new], 2).reshape(b * k, -1)
        scores = live_s
        state.select((rows * k + src[rows, live_j]).reshape(-1))
        best_live = torch.maximum(scores[:, 0] / length_penalty(float(t + 1), alpha),
                                  scores[:, 0] / length_penalty(float(max_len), alpha))
        if bool((fin_scores[:, -1] >= best_live).all()):
            break
    return fin_seqs[:, 0]
