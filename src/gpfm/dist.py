"""torch.distributed from the torchrun or SLURM environment; rank/world helpers; work sharding.

A plain process is rank 0 of 1. Under `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK) or `srun` (SLURM_PROCID/
SLURM_NTASKS/SLURM_LOCALID) the same code shards its work list and, for training, joins a process group:
gloo on CPU, NCCL on GPU. Importing this module does not import torch (tiling stays fast).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def env() -> DistEnv:
    """Rank, world size and local rank from torchrun's or SLURM's variables (torchrun's win)."""
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return DistEnv(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in e and "SLURM_NTASKS" in e:
        return DistEnv(int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", 0)))
    return DistEnv()


def shard(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's share of a work list: every item exactly once across ranks (strided, so shares are even)."""
    d = env()
    rank = d.rank if rank is None else rank
    world_size = d.world_size if world_size is None else world_size
    return list(items[rank::world_size])


def init_process_group(device: str = "cpu") -> DistEnv:
    """Join the process group when launched under torchrun/SLURM; a no-op for a plain process."""
    d = env()
    if not d.is_distributed:
        return d
    import torch.distributed as tdist

    if not tdist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # SLURM without torchrun: single-node default
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            import torch

            torch.cuda.set_device(d.local_rank)
        tdist.init_process_group(backend=backend, rank=d.rank, world_size=d.world_size)
    return d


def barrier() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def destroy_process_group() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
