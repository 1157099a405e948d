"""Export the EMA teacher's backbone as a timm model: `model.safetensors` + `config.json` (contracts.md).

config.json: {"architecture", "model_args", "num_classes": 0, "global_pool": "token", "num_features",
"pretrained_cfg": {input_size, mean, std, interpolation}, "gpfm": {model card: source run, checkpoint, step,
images seen, data, experts, config, init}}.
`timm.create_model(architecture, num_classes=0, **model_args)` then `load_state_dict` (strict) rebuilds it;
the export is verified that way before it is written. `create_encoder("gpfm", weights=DIR)` loads it by path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gpfm.io import GpfmError, atomic_path, write_json
from gpfm.pretrain.checkpoint import load_checkpoint
from gpfm.pretrain.experts import IMAGENET_MEAN, IMAGENET_STD

PREFIX = "backbone.vit."


def teacher_backbone_state(teacher_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm keys of the teacher backbone (mask token and heads dropped)."""
    return {k[len(PREFIX):]: v.detach().float().contiguous().clone() for k, v in teacher_state.items()
            if k.startswith(PREFIX)}


def export_teacher(ckpt: dict[str, Any], out_dir: str | Path) -> Path:
    """Write the teacher backbone of a checkpoint dict to `out_dir`; returns the folder."""
    import timm
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    arch = ckpt["arch"]
    model_args = {k: v for k, v in ckpt["model_args"].items() if k != "num_classes"}  # timm hub: top level
    state = teacher_backbone_state(ckpt["teacher"])
    model = timm.create_model(arch, pretrained=False, num_classes=0, **model_args)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise GpfmError(f"{ckpt.get('path', 'checkpoint')}: teacher does not rebuild as {arch} ({e})") from e
    cfg = ckpt["config"]
    size = int(model_args.get("img_size", 224))
    card = {
        "source": "gpfm pretrain (UKD)", "checkpoint": ckpt.get("path"), "step": int(ckpt["step"]),
        "images_seen": int(ckpt["step"]) * int(cfg["data"]["batch_size"]), "data": cfg["data"],
        "experts": [{k: e[k] for k in ("name", "weights", "cls_weight", "patch_weight")}
                    for e in cfg["distill"]["experts"]],
        "init": ckpt.get("init"), "config": cfg, "feature": "cls",  # final-norm CLS of the EMA teacher
    }
    config = {
        "architecture": arch, "model_args": model_args, "num_classes": 0, "global_pool": "token",
        "num_features": int(model.num_features),
        "pretrained_cfg": {"input_size": [3, size, size], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                           "interpolation": "bicubic", "crop_pct": 1.0, "num_classes": 0},
        "gpfm": card,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "architecture": arch})
    write_json(out_dir / "config.json", json.loads(json.dumps(config, default=str)))
    return out_dir


def export_run(run: str | Path, checkpoint: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Export the latest (or the given) checkpoint of a run to RUN/export (or `out`)."""
    ckpt = load_checkpoint(checkpoint or run)
    return export_teacher(ckpt, out or Path(run) / "export")


def export_command(args: Any) -> int:
    """`gpfm pretrain export RUN [--checkpoint PATH] [--out DIR]`."""
    out = export_run(args.run, args.checkpoint, args.out)
    print(f"exported teacher to {out}/model.safetensors (+ config.json)")
    return 0
