"""The pretraining config schema: one dataclass per section, loaded by `gpfm.config.load_config` (unknown keys
are errors naming the key). Defaults are the GPFM recipe (configs/pretrain/vitl14_gpfm.yaml spells them out)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpfm.io import GpfmError
from gpfm.pretrain.augment import CropsConfig
from gpfm.pretrain.data import DataConfig
from gpfm.pretrain.experts import DistillConfig
from gpfm.pretrain.heads import HeadsConfig
from gpfm.pretrain.losses import LossConfig
from gpfm.pretrain.masking import MaskingConfig
from gpfm.pretrain.model import ModelConfig
from gpfm.pretrain.schedules import OptimConfig


@dataclass
class RunConfig:
    seed: int = 0
    steps: int = 500_000  # schedule length (iterations)
    stop_after: int | None = None  # stop at this iteration (schedules unchanged); re-run to continue
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16 (grad scaler)
    log_every: int = 10
    ckpt_every: int = 12_500
    keep_ckpts: int = 3
    fsdp: bool = False  # FSDP2 (per-block fully_shard) instead of DDP, for large students on GPUs
    export_at_end: bool = True

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise GpfmError(f"config key 'run.precision': '{self.precision}' is not one of fp32, bf16, fp16")


@dataclass
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
