"""Frozen experts for UKD (GPFM-METHOD.md §2.4, R1, R2): zoo encoders that give CLS and patch-token targets.

Each expert receives crops in [0, 1] rendered at its own input size and applies its own resize/normalisation
through `encoder.transform.prepare` (R1). A patch term exists only for experts with spatial tokens, and a
weight for a term that does not exist is an error (R2). Everything is checked once, before the first step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gpfm.io import GpfmError

log = logging.getLogger("gpfm.pretrain")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ExpertConfig:
    name: str = ""  # encoder name in the zoo (gpfm.encoders.create_encoder)
    weights: str | None = None
    cls_weight: float = 1.0
    patch_weight: float | None = None  # None: no patch term; a number needs spatial tokens (R2)
    standardize: bool = False  # per-channel running standardisation of the targets
    allow_random: bool = False  # accept an encoder without trained weights (tests, benchmarks)
    label: str | None = None  # name in logs and checkpoints (default: `name`)

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class DistillConfig:
    view: str = "rerender"  # rerender: crop box re-rendered at the expert's size | student: student crop,
    #                         resized by the expert | compat: ImageNet-normalised student crop as is (ablation)
    colour: bool = True  # experts see the colour-augmented views, like the student (False: geometry only)
    standardize_momentum: float = 0.99
    experts: list[ExpertConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.view not in ("rerender", "student", "compat"):
            raise GpfmError(f"config key 'distill.view': '{self.view}' is not one of rerender, student, compat")
        keys = [e.key for e in self.experts]
        for i, e in enumerate(self.experts):
            if not e.name:
                raise GpfmError(f"config key 'distill.experts[{i}].name' is required (an encoder name)")
            if keys.count(e.key) > 1:
                raise GpfmError(f"config 'distill.experts': two experts named '{e.key}'; give each a label")


class RunningStandardizer(nn.Module):
    """Per-channel standardisation with EMA statistics of the global batch (naver/unic style)."""

    def __init__(self, dim: int, momentum: float = 0.99, eps: float = 1e-6):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros(()))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        from gpfm.pretrain.losses import _all_reduce_sum

        x = x.float().reshape(-1, x.shape[-1])
        stats = _all_reduce_sum(torch.cat([x.sum(0), x.pow(2).sum(0), x.new_tensor([x.shape[0]])]))
        n = stats[-1].clamp_min(1)
        mean = stats[: x.shape[1]] / n
        var = (stats[x.shape[1]: -1] / n - mean.pow(2)).clamp_min(0)
        m = self.momentum if self.count > 0 else 0.0
        self.mean.mul_(m).add_(mean * (1 - m))
        self.var.mul_(m).add_(var * (1 - m))
        self.count += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / torch.sqrt(self.var + self.eps)


def _input_hw(transform: Any) -> tuple[int, int]:
    size = transform.input_size
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    return size[-2], size[-1]


class Expert(nn.Module):
    """One frozen encoder with its loss weights and (optional) standardisers."""

    def __init__(self, cfg: ExpertConfig, encoder: nn.Module, momentum: float):
        super().__init__()
        self.cfg, self.key = cfg, cfg.key
        self.encoder = encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.input_hw = _input_hw(encoder.transform)
        self.grid = tuple(encoder.patch_grid) if getattr(encoder, "patch_grid", None) else None
        self.cls_dim, self.token_dim = self._probe()
        self.has_patch_term = cfg.patch_weight is not None
        self.std_cls = RunningStandardizer(self.cls_dim, momentum) if cfg.standardize else None
        self.std_tok = (RunningStandardizer(self.token_dim, momentum)
                        if cfg.standardize and self.has_patch_term else None)

    @torch.no_grad()
    def _probe(self) -> tuple[int, int | None]:
        dev = next(self.encoder.parameters(), torch.zeros(())).device
        x = torch.full((1, 3, *self.input_hw), 0.5, device=dev)
        cls, tok = self.encoder.forward_cls_and_tokens(self.prepare(x))
        if tok is not None and self.grid is not None and tok.shape[1] != self.grid[0] * self.grid[1]:
            raise GpfmError(f"expert '{self.key}': {tok.shape[1]} tokens do not form its {self.grid} grid")
        return cls.shape[-1], (tok.shape[-1] if tok is not None and self.grid is not None else None)

    @torch.no_grad()
    def targets(self, images: torch.Tensor, compat: bool = False,
                autocast: Callable[[], Any] = contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(CLS target, patch-token target or None), fp32, standardised when configured.

        `images` are (B, 3, H, W) in [0, 1]; with `compat` they are already ImageNet-normalised and go to the
        encoder as they are (the original GPFM behaviour, for ablations only)."""
        x = images if compat else self.prepare(images)
        with autocast():
            cls, tok = self.encoder.forward_cls_and_tokens(x)
        cls = cls.float()
        tok = tok.float() if (tok is not None and self.has_patch_term) else None
        if self.std_cls is not None:
            self.std_cls.update(cls)
            cls = self.std_cls(cls)
        if self.std_tok is not None and tok is not None:
            self.std_tok.update(tok)
            tok = self.std_tok(tok)
        return cls, tok

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's own transform. A view already rendered at the input size is only normalised: it is the
        expert's whole view, so a centre-crop rule meant for full tiles must not cut it (spatial alignment)."""
        t = self.encoder.transform
        if tuple(images.shape[-2:]) == self.input_hw and hasattr(t, "normalize"):
            return t.normalize(images.float())
        return t.prepare(images)

    def standardizer_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for part, s in (("cls", self.std_cls), ("tok", self.std_tok)):
            if s is not None:
                out.update({f"{part}.{k}": v for k, v in s.state_dict().items()})
        return out

    def load_standardizer_state(self, state: dict[str, torch.Tensor]) -> None:
        for part, s in (("cls", self.std_cls), ("tok", self.std_tok)):
            if s is not None:
                s.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(part + ".")})


def _default_factory(name: str, weights: str | None, device: str | None) -> nn.Module:
    try:
        from gpfm.encoders import create_encoder
    except ImportError as e:
        raise GpfmError(f"expert '{name}': gpfm.encoders is not available ({e})") from e
    return create_encoder(name, weights=weights, device=device)


def build_experts(cfg: DistillConfig, device: str | torch.device,
                  factory: Callable[[str, str | None, str | None], nn.Module] | None = None) -> list[Expert]:
    """Load and check every expert (weights, patch-term weights, shapes) before training starts."""
    factory = factory or _default_factory
    experts = []
    for i, e in enumerate(cfg.experts):
        where = f"distill.experts[{i}] '{e.key}'"
        try:
            enc = factory(e.name, e.weights, str(device))
        except GpfmError as err:
            raise GpfmError(f"{where}: {err}") from err
        except (RuntimeError, KeyError, ValueError, OSError) as err:
            raise GpfmError(f"{where}: weights {e.weights} do not load into '{e.name}' ({str(err)[:200]}); "
                            "check the file is this encoder's checkpoint") from err
        sha = str(getattr(enc, "weights_sha256", "random"))
        if sha == "random" and not e.allow_random:
            raise GpfmError(f"{where}: has no trained weights; set its `weights` to the checkpoint file "
                            "(or allow_random=true for tests)")
        if e.patch_weight is not None and getattr(enc, "patch_grid", None) is None:
            raise GpfmError(f"{where}: patch_weight is set but '{e.name}' has no spatial tokens; remove it (R2)")
        expert = Expert(e, enc.to(device), cfg.standardize_momentum).to(device)
        if e.patch_weight is not None and expert.token_dim is None:
            raise GpfmError(f"{where}: patch_weight is set but the encoder returned no patch tokens (R2)")
        log.info("expert %s: %s, input %s, cls %d-d, tokens %s, weights %s", e.key, e.name, expert.input_hw,
                 expert.cls_dim, expert.grid if expert.has_patch_term else "unused", sha[:12])
        experts.append(expert)
    return experts


def student_normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of the student's [0, 1] crops (the student's own transform)."""
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std
