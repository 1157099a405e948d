"""DDP (and FSDP2) with 2 gloo processes equal one process on the same global batch; their checkpoints resume
at world 1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpfm.io import read_jsonl
from gpfm.pretrain.checkpoint import load_checkpoint
from gpfm.pretrain.trainer import train

WORKER = Path(__file__).with_name("_ddp_worker.py")
# drop-path draws per-process random numbers and KoLeo scores per-process batches: fix both so that the
# world-1 and world-2 runs compute the same function (koleo_group_size = the per-process batch at world 2).
# No LayerScale: with gamma=1e-5 all CLS start equal and KoLeo's 1/distance gradient amplifies rounding noise.
SAME = ["run.steps=4", "run.ckpt_every=2", "model.drop_path_rate=0.0", "loss.koleo_group_size=4", "model.layerscale=null",
        "distill.experts=[{name: colour, patch_weight: 0.25, standardize: true}]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(jobs: list[tuple[str, list[str]]], world: int) -> None:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(jobs)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]


def _assert_same_run(a: dict, b: dict) -> None:
    for part in ("student", "teacher"):
        assert sorted(a[part]) == sorted(b[part])
        for k, v in a[part].items():
            assert torch.allclose(v, b[part][k], rtol=1e-4, atol=2e-5), (part, k, (v - b[part][k]).abs().max())
    for k in ("dino", "ibot"):
        assert torch.allclose(a["centers"][k], b["centers"][k], atol=1e-5)


def test_ddp_and_fsdp_on_two_processes_equal_one_and_resume_at_world_one(h, tiny_cfg, tmp_path):
    src = h.ArraySource(h.colour_tiles(96, 64, seed=0))
    single = train(tiny_cfg(*SAME), tmp_path / "w1", source=src, expert_factory=h.expert_factory, quiet=True)
    a = load_checkpoint(tmp_path / "w1")
    runs = {"ddp": [], "fsdp": ["run.fsdp=true"]}
    _launch([(str(tmp_path / name), SAME + extra) for name, extra in runs.items()], world=2)
    for name in runs:
        b = load_checkpoint(tmp_path / name)
        assert a["step"] == b["step"] == 4 and b["world_size"] == 2
        _assert_same_run(a, b)
        rows2 = read_jsonl(tmp_path / name / "metrics.jsonl")  # logged terms are global-batch means
        for r1, r2 in zip(single["metrics"], rows2, strict=True):
            for k in ("dino_global", "ibot", "koleo", "colour_cls", "colour_patch"):
                assert r1[k] == pytest.approx(r2[k], rel=1e-4, abs=1e-5), (name, r1["step"], k)
    # the step-2 checkpoint written by 2 FSDP processes resumes in 1 and continues as the 1-process run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "fsdp" / "checkpoints" / "step_00000002.pt", resumed / "checkpoints")
    rest = train(tiny_cfg(*SAME), resumed, source=src, expert_factory=h.expert_factory, quiet=True)
    assert [r["step"] for r in rest["metrics"]] == [2, 3]
    _assert_same_run(a, load_checkpoint(resumed))
