"""World-size-free pretraining checkpoints (R5, R6).

`RUN/checkpoints/step_<k>.pt` holds full (unsharded) state dicts written by rank 0, atomically: student,
teacher, optimizer, grad scaler, loss centres, expert standardisers, the config, and the data position
(`step` = iterations done; the next sample is step * batch_size). Random state needs no saving: every
iteration re-seeds from (seed, step, rank). Loading needs only `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from gpfm.io import GpfmError, atomic_path

FORMAT = "gpfm-pretrain-checkpoint/1"
# Keys that may change between a run and its resumption (they do not change the numbers).
RESUMABLE_CHANGES = ("run.stop_after", "run.log_every", "run.ckpt_every", "run.keep_ckpts", "run.device",
                     "run.export_at_end", "run.fsdp", "data.num_workers", "data.max_retries")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints of a run, oldest first."""
    d = checkpoint_dir(run_dir)
    out = []
    for p in d.glob("step_*.pt") if d.is_dir() else []:
        m = re.fullmatch(r"step_(\d+)\.pt", p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write step_<step>.pt atomically (a crash leaves the previous one intact), then prune to `keep`."""
    path = checkpoint_dir(run_dir) / f"step_{step:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "step": step, **state}, tmp)
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise GpfmError(f"{path}: no checkpoints/step_*.pt in this run folder")
        path = found
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GpfmError(f"{path}: not a readable checkpoint ({e}); delete it to resume from the one before") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise GpfmError(f"{path}: not a gpfm pretraining checkpoint")
    ckpt["path"] = str(path)
    return ckpt


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts, except those in RESUMABLE_CHANGES."""
    a, b = _flatten(saved), _flatten(current)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)
