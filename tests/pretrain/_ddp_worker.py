"""One torchrun-style process of the distributed test: `python _ddp_worker.py '[[OUT_DIR, [overrides...]], ...]'`
with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set (gloo on CPU); runs the jobs one after the other."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import conftest as C  # noqa: E402

from gpfm import dist  # noqa: E402
from gpfm.config import load_config  # noqa: E402
from gpfm.pretrain.trainer import PretrainConfig, train  # noqa: E402

if __name__ == "__main__":
    for out, overrides in json.loads(sys.argv[1]):
        cfg = load_config(PretrainConfig, C.TINY, C.TEST_OVERRIDES + overrides)
        train(cfg, out, source=C.ArraySource(C.colour_tiles(96, 64, seed=0)), expert_factory=C.expert_factory,
              quiet=True)
    dist.destroy_process_group()
