"""UKD loss terms as pure functions on tensors (GPFM-METHOD.md §2.2, §2.4, §2.5).

Batch statistics (centre, Sinkhorn-Knopp marginals) are all-reduced as sums and counts, so a run on N
processes computes exactly what one process computes on the same global batch. Losses are computed in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpfm.io import GpfmError


@dataclass
class LossConfig:
    """Self-distillation terms and their weights (expert weights live on each expert)."""

    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    koleo_group_size: int = 0  # 0: whole per-process batch (GPFM); >0: fixed groups, same at any world size
    student_temp: float = 0.1
    centering: str = "centering"  # centering | sinkhorn
    center_momentum: float = 0.9
    sinkhorn_iters: int = 3

    def __post_init__(self) -> None:
        if self.centering not in ("centering", "sinkhorn"):
            raise GpfmError(f"config key 'loss.centering': '{self.centering}' is not one of centering, sinkhorn")


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


# ------------------------------------------------------------------------------------------- teacher targets
def softmax_center(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Teacher probabilities: softmax((logits - centre) / T)."""
    return F.softmax((teacher_logits.float() - center) / temp, dim=-1)


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """EMA of the teacher logits' global batch mean: m * centre + (1 - m) * mean (all ranks, all rows)."""
    stats = torch.cat([teacher_logits.float().sum(0), teacher_logits.new_tensor([teacher_logits.shape[0]]).float()])
    stats = _all_reduce_sum(stats)
    if stats[-1] == 0:  # no rows anywhere (e.g. no masked tokens this step)
        return center
    return center * momentum + (stats[:-1] / stats[-1]) * (1.0 - momentum)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, n_iters: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets (B, K): every row sums to 1, every prototype gets about B/K of the mass.

    The global maximum is subtracted before exp (it cancels in the first normalisation) to avoid overflow.
    """
    logits = teacher_logits.float() / temp
    gmax = logits.max().reshape(1)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX)
    q = torch.exp(logits - gmax).t()  # K x B
    n = _all_reduce_sum(q.new_tensor([q.shape[1]]))  # global B
    k = q.shape[0]
    tiny = torch.finfo(q.dtype).tiny  # a prototype or sample whose mass underflowed stays 0, not NaN
    q /= _all_reduce_sum(q.sum().reshape(1))
    for _ in range(n_iters):
        q /= _all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp_min(tiny)
        q /= k
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)
        q /= n
    return (q * n).t()


# ------------------------------------------------------------------------------------------ self-distillation
def _cross_entropy(teacher_probs: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per-row H(teacher, softmax(student / T))."""
    return -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)


def dino_loss(student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor],
              student_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO cross-entropy over crop pairs: (global term, local term).

    `student_logits` lists the global crops first (as many as `teacher_probs`), then the local crops.
    Each student global crop is scored against every *other* teacher global crop, each local crop against
    every teacher global crop; both sums are divided by the pair count n_g(n_g-1) + n_g n_l (DINOv2/GPFM).
    """
    n_g = len(teacher_probs)
    n_l = len(student_logits) - n_g
    n_pairs = n_g * (n_g - 1) + n_g * n_l
    if n_pairs <= 0:
        raise GpfmError("DINO loss needs at least two global crops or one local crop (crops.n_local)")
    zero = student_logits[0].new_zeros((), dtype=torch.float32)
    glob, loc = zero, zero
    for i, s in enumerate(student_logits):
        for j, t in enumerate(teacher_probs):
            if i == j:
                continue
            term = _cross_entropy(t, s, student_temp).mean()
            if i < n_g:
                glob = glob + term
            else:
                loc = loc + term
    return glob / n_pairs, loc / n_pairs


def ibot_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor,
              student_temp: float) -> torch.Tensor:
    """iBOT loss on masked tokens only: mean over the images of each image's mean masked-token cross-entropy.

    `student_logits`/`teacher_probs` are (M, K) rows for `masks.nonzero()` in row-major order, where `masks`
    is (B, N) bool; an image with n_i masked patches weighs each of its tokens by 1/n_i, and the sum is divided
    by B (all images, masked or not), as in DINOv2.
    """
    if masks.dtype != torch.bool or masks.ndim != 2:
        raise ValueError("masks must be a (B, N) bool tensor")
    n_per_image = masks.sum(1).clamp_min(1).float()
    weights = (1.0 / n_per_image)[:, None].expand_as(masks)[masks]
    ce = _cross_entropy(teacher_probs, student_logits, student_temp)
    return (ce * weights).sum() / masks.shape[0]


def koleo_loss(x: torch.Tensor, group_size: int = 0, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser: mean of -log(nearest-neighbour distance) of L2-normalised rows, in fp32.

    `group_size` > 0 scores consecutive groups of that many rows separately and averages them (so the value
    does not depend on how the batch is split across processes). The distance is sqrt(|d|^2 + eps^2): a
    duplicate image gives -log(eps) with a finite gradient instead of inf (R9).
    """
    x = F.normalize(x.float(), dim=-1, eps=eps)
    groups = [x] if group_size <= 0 else list(x.split(group_size))
    if any(g.shape[0] < 2 for g in groups):
        raise GpfmError("KoLeo needs at least 2 images per group: raise the batch size or loss.koleo_group_size")
    losses = []
    for g in groups:
        with torch.no_grad():
            sim = g @ g.t()
            sim.fill_diagonal_(-2.0)
            nn_idx = sim.argmax(dim=1)
        d = ((g - g[nn_idx]).pow(2).sum(-1) + eps * eps).sqrt()
        losses.append(-torch.log(d).mean())
    return torch.stack(losses).mean()


# ------------------------------------------------------------------------------------------ expert distillation
def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine similarity over the last dimension (expert CLS loss, GPFM `radio`)."""
    return 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


def resample_tokens(tokens: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, C) token grid -> (B, H*W, C) by bicubic interpolation (identity when the grids match)."""
    if tuple(src) == tuple(dst):
        return tokens
    b, n, c = tokens.shape
    if n != src[0] * src[1]:
        raise ValueError(f"{n} tokens do not form a {src[0]}x{src[1]} grid")
    grid = tokens.float().transpose(1, 2).reshape(b, c, src[0], src[1])
    grid = F.interpolate(grid, size=tuple(dst), mode="bicubic", align_corners=False)
    return grid.reshape(b, c, dst[0] * dst[1]).transpose(1, 2)


def expert_patch_loss(pred: torch.Tensor, target: torch.Tensor, pred_grid: tuple[int, int],
                      target_grid: tuple[int, int], cos_weight: float = 0.9, l1_weight: float = 0.1) -> torch.Tensor:
    """Expert patch loss: resample the expert's grid to the student's (bicubic), then
    0.9 * (1 - mean cosine) + 0.1 * SmoothL1(beta=1, mean)."""
    target = resample_tokens(target, target_grid, pred_grid)
    if pred.shape != target.shape:
        raise ValueError(f"student tokens {tuple(pred.shape)} and resampled expert tokens {tuple(target.shape)} differ")
    smooth = F.smooth_l1_loss(pred.float(), target.float(), beta=1.0)
    return cos_weight * cosine_loss(pred, target) + l1_weight * smooth


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean row entropy of a probability matrix (collapse monitor: ~0 when one prototype wins)."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()
