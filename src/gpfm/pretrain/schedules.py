"""Per-iteration schedules as pure functions of the step: learning rate, weight decay, EMA momentum,
teacher temperature and last-layer freezing (GPFM-METHOD.md §2.6; DINOv2's `CosineScheduler` semantics).

Being functions of the step (not stateful objects), they need no saving: a resumed run recomputes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gpfm.io import GpfmError


@dataclass
class OptimConfig:
    """AdamW and its schedules. `base_lr` is per `lr_ref_batch` images, scaled to the global batch."""

    base_lr: float = 4e-4
    lr_ref_batch: int = 1024
    lr_scaling: str = "sqrt"  # sqrt | linear | none
    min_lr: float = 1e-6
    warmup_iters: int = 50_000
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0  # per student sub-module; 0 disables
    freeze_last_layer_iters: int = 1250
    momentum_teacher: float = 0.992
    momentum_teacher_end: float = 1.0
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_iters: int = 37_500

    def __post_init__(self) -> None:
        if self.lr_scaling not in ("sqrt", "linear", "none"):
            raise GpfmError(f"config key 'optim.lr_scaling': '{self.lr_scaling}' is not one of sqrt, linear, none")
        if len(self.betas) != 2:
            raise GpfmError("config key 'optim.betas': give two numbers, e.g. [0.9, 0.999]")


def cosine(step: int, total: int, start: float, end: float, warmup: int = 0, warmup_start: float = 0.0) -> float:
    """Linear warm-up from `warmup_start` to `start` over `warmup` steps, then half-cosine from `start` to `end`
    over the remaining `total - warmup` steps; `end` from `total` on."""
    if step < warmup:
        return warmup_start + (start - warmup_start) * step / warmup
    if step >= total:
        return end
    n = max(total - warmup, 1)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * (step - warmup) / n))


def linear_warmup(step: int, warmup: int, start: float, end: float) -> float:
    """Linear from `start` to `end` over `warmup` steps, then constant (teacher temperature)."""
    if warmup <= 0 or step >= warmup:
        return end
    return start + (end - start) * step / warmup


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Peak lr for the global batch: base_lr * sqrt(B / ref) (GPFM), B / ref (linear) or base_lr."""
    ratio = global_batch / cfg.lr_ref_batch
    return cfg.base_lr * {"sqrt": math.sqrt(ratio), "linear": ratio, "none": 1.0}[cfg.lr_scaling]


def values_at(step: int, total: int, cfg: OptimConfig, global_batch: int) -> dict[str, float]:
    """Every scheduled value at `step` of a `total`-step schedule (the row logged to metrics.jsonl)."""
    peak = scaled_lr(cfg, global_batch)
    lr = cosine(step, total, peak, cfg.min_lr, warmup=cfg.warmup_iters)
    return {
        "lr": lr,
        "wd": cosine(step, total, cfg.weight_decay, cfg.weight_decay_end),
        "momentum": cosine(step, total, cfg.momentum_teacher, cfg.momentum_teacher_end),
        "teacher_temp": linear_warmup(step, cfg.warmup_teacher_temp_iters, cfg.warmup_teacher_temp, cfg.teacher_temp),
        "last_layer_frozen": float(step < cfg.freeze_last_layer_iters),
    }
