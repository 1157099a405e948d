"""Encoder registry: one record per encoder, and `create_encoder`.

API (stable; the pretraining experts, the demo and `gpfm extract` rely on it)
----------------------------------------------------------------------------
``create_encoder(name, weights=None, device=None, *, overrides=None, seed=0) -> Encoder``
    name     registry name or alias (`uni`, `uni_v1`, `pathology/mahmood_uni`, ...); unknown names raise GpfmError
             listing close names.
    weights  None: tiny encoders get seeded random weights; published ones load from the Hugging Face cache or hub
             (HF_TOKEN from the environment), else GpfmError saying which file to pass.
             "random": seeded random init (any encoder; tests, ablations).
             a path: a weights file (.safetensors; .pt/.pth/.bin read with torch.load(weights_only=True)) in the
             encoder's official key layout (mapped onto our modules), or a folder holding the expected file.
             For `gpfm` and `timm-export`, a folder (or a file) with a timm-style `config.json` beside
             `model.safetensors` builds the architecture from that config (exported UKD students, demo experts).
    device   None (cpu), "cpu", "cuda[:i]" (GpfmError when no GPU) or "meta" (no memory, no weights: shapes and
             parameter counts only).
    overrides  architecture kwargs for a reduced build of the SAME code path (tests: {"depth": 2, "embed_dim": 64}).
    seed     random-init seed (same seed, same weights, in any process).

``Encoder`` (torch.nn.Module, eval mode, parameters frozen)
    .name, .record (EncoderRecord), .dim (feature size), .cls_dim, .token_dim (None without tokens),
    .transform (EncoderTransform, frozen and hashable: .input_size .resize_size .crop ("center" | "none")
                .interpolation .mean .std; .prepare(x01 float (B,3,H,W) in [0,1]) and
                .prepare_uint8(uint8 (B,H,W,3) or (B,3,H,W)) -> float32 (B, 3, input_size, input_size) on the
                input's device; the parts: .resize(x01) (geometry only) and .normalize(x01 at input size)),
    .patch_grid ((h, w) token grid at input_size, or None), .has_tokens,
    .weights_sha256 (hex digest of the weights file, or "random"), .weights_source (path or "random"),
    forward(prepared) -> (B, dim): the published feature,
    forward_tokens(prepared) -> (B, h*w, token_dim): final-norm patch tokens (CLS and registers excluded);
        GpfmError when the model has none,
    forward_cls_and_tokens(prepared) -> (cls (B, cls_dim), tokens (B, h*w, token_dim) or None): one trunk pass;
        cls = final-norm CLS token (ViTs), pooled feature (CNN/Swin), or for contrastive models (conch, plip)
        the L2-normalised projected embedding.

Weights made elsewhere: ``gpfm.encoders.weights.save_weights(encoder, path)`` writes `encoder.model`'s state dict
as safetensors; ``create_encoder(name, weights=path)`` loads it back.
``list_encoders(include_tiny=True) -> list[str]``; ``get_record(name) -> EncoderRecord``;
``encoder_table() -> list[dict]`` (what `gpfm encoders` prints; parameter counts on the meta device).

Tiny random encoders: ``tiny-vit`` (ViT, patch 16, 224 px, 96-d CLS, 14x14 tokens, ImageNet statistics) and
``tiny-cnn`` (4 stride-2 conv stages, 112 px input, 128-d pooled, no tokens, CLIP statistics).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gpfm.encoders.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, EncoderTransform
from gpfm.io import GpfmError


@dataclass(frozen=True)
class WeightSource:
    """Where a published encoder's weights live and how their keys are laid out."""

    hub_id: str | None = None  # Hugging Face repo id
    filenames: tuple[str, ...] = ()  # file names to look for (first that exists wins)
    layout: str = "timm"  # key layout, see gpfm.encoders.weights.CONVERTERS
    checksum: str | None = None  # "sha256:<hex>" or "md5:<hex>" of the official file when known
    licence: str = "see the model card"
    gated: bool = False
    url: str | None = None  # where a human gets the file

    @property
    def where(self) -> str:
        if self.url:
            return self.url
        return f"https://huggingface.co/{self.hub_id}" if self.hub_id else "-"


@dataclass(frozen=True)
class EncoderRecord:
    """Everything needed to build, feed and describe one encoder (timm pretrained_cfg style)."""

    name: str
    architecture: str  # human description
    kind: str  # builder in gpfm.encoders.zoo.BUILDERS
    model_args: dict[str, Any] = field(default_factory=dict)
    feature: str = "cls"  # cls | cls+mean | proj | pooled | conch
    feature_text: str = "CLS"
    dim: int = 0
    input_size: int = 224
    resize_size: int = 224
    crop: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    mpp: float = 0.5  # recommended µm/px of the tiles
    tile_size: int = 224  # recommended tile size in px at `mpp`
    weights: WeightSource | None = None  # None: random only (tiny encoders)
    aliases: tuple[str, ...] = ()
    notes: str = ""

    @property
    def transform(self) -> EncoderTransform:
        return EncoderTransform(input_size=self.input_size, resize_size=self.resize_size, crop=self.crop,
                                interpolation=self.interpolation, mean=self.mean, std=self.std)

    @property
    def is_tiny(self) -> bool:
        return self.weights is None and self.kind != "timm-export"


_REGISTRY: dict[str, EncoderRecord] = {}
_ALIASES: dict[str, str] = {}


def register(record: EncoderRecord) -> EncoderRecord:
    """Add a record (and its aliases); names are case-insensitive, '_' and '-' interchangeable."""
    key = _norm(record.name)
    if key in _ALIASES:
        raise ValueError(f"encoder name {record.name!r} already registered")
    _REGISTRY[record.name] = record
    for n in (record.name, *record.aliases):
        _ALIASES[_norm(n)] = record.name
    return record


def _norm(name: str) -> str:
    name = name.strip().lower()
    name = name.removeprefix("pathology/")
    return name.replace("_", "-")


def _records() -> dict[str, EncoderRecord]:
    import gpfm.encoders.zoo  # noqa: F401  (registers the zoo)

    return _REGISTRY


def get_record(name: str) -> EncoderRecord:
    """The record for a name or alias; unknown names raise GpfmError listing the closest registered names."""
    recs = _records()
    canon = _ALIASES.get(_norm(name))
    if canon is None:
        close = difflib.get_close_matches(_norm(name), list(_ALIASES), n=4, cutoff=0.5)
        close = list(dict.fromkeys(_ALIASES[c] for c in close))
        hint = f"did you mean {', '.join(close)}?" if close else "see `gpfm encoders`"
        raise GpfmError(f"unknown encoder {name!r}: {hint} (known: {', '.join(sorted(recs))})")
    return recs[canon]


def list_encoders(include_tiny: bool = True) -> list[str]:
    """Registered encoder names (published first, in table order; tiny ones last)."""
    recs = _records().values()
    return [r.name for r in recs if include_tiny or not r.is_tiny]


def create_encoder(name: str, weights: str | Path | None = None, device: str | None = None, *,
                   overrides: dict[str, Any] | None = None, seed: int = 0):
    """Build an encoder with its weights, transform and feature rule (see the module docstring)."""
    import torch

    from gpfm.encoders import weights as W
    from gpfm.encoders import zoo

    record = get_record(name)
    device = check_device(device)
    export = W.find_export(weights) if record.name in ("gpfm", "timm-export") and weights not in (None, "random") \
        else None
    if export is not None:
        record = W.record_from_export(record.name, export)
    elif record.kind == "timm-export":
        raise GpfmError(f"{record.name} needs --weights: a folder with model.safetensors and a timm-style config.json")
    if overrides:
        record = replace(record, model_args={**record.model_args, **overrides})

    path = None
    if device != "meta" and weights != "random":
        path = W.resolve_weights(record, weights, export)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device == "meta" or path is not None:  # loading weights: skip the (slow) random init of large models
            enc = zoo.build(record, device="meta")
            if device != "meta":
                enc = zoo.build(record, "cpu") if _has_unsaved_buffers(enc) else enc.to_empty(device="cpu")
        else:
            enc = zoo.build(record, device="cpu")
    enc.record = record
    if path is not None:
        W.load_weights(enc, path)
    enc.eval().requires_grad_(False)
    if device not in ("cpu", "meta"):
        enc.to(device)
    return enc


def _has_unsaved_buffers(module) -> bool:
    """Non-persistent buffers are not in a checkpoint, so a meta-built module cannot be filled by loading."""
    return len({n for n, _ in module.named_buffers()} - set(module.state_dict())) > 0


def check_device(device: str | None) -> str:
    """'cpu' / 'cuda[:i]' / 'meta'; GpfmError when CUDA is asked for and absent."""
    import torch

    device = (device or "cpu").strip()
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GpfmError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
        idx = device.partition(":")[2]
        if idx and int(idx) >= torch.cuda.device_count():
            raise GpfmError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device not in ("cpu", "meta"):
        raise GpfmError(f"--device {device}: use cpu or cuda[:index]")
    return device


def count_parameters(name: str) -> int:
    """Parameter count of an encoder, computed on the meta device (no memory, no weights)."""
    enc = create_encoder(name, device="meta")
    return sum(p.numel() for p in enc.parameters())


def encoder_table(include_tiny: bool = True) -> list[dict[str, Any]]:
    """One row per encoder for `gpfm encoders`."""
    rows = []
    for name in list_encoders(include_tiny):
        r = get_record(name)
        if r.kind == "timm-export":
            params = "-"
        else:
            params = f"{count_parameters(name) / 1e6:.1f}M"
        t = r.transform
        stats = _stats_name(r.mean, r.std)
        rows.append({
            "name": r.name, "architecture": r.architecture, "parameters": params, "dim": r.dim or "-",
            "input": t.describe(), "normalisation": stats, "feature": r.feature_text,
            "tile": f"{r.tile_size}px@{r.mpp}µm/px",
            "weights": (r.weights.where if r.weights else ("--weights DIR" if r.kind == "timm-export" else "random")),
            "licence": r.weights.licence if r.weights else "-", "aliases": ", ".join(r.aliases),
        })
    return rows


def _stats_name(mean: tuple, std: tuple) -> str:
    if (tuple(mean), tuple(std)) == (IMAGENET_MEAN, IMAGENET_STD):
        return "ImageNet"
    if (tuple(mean), tuple(std)) == (CLIP_MEAN, CLIP_STD):
        return "CLIP"
    return "mean " + ",".join(f"{m:.3f}" for m in mean) + " std " + ",".join(f"{s:.3f}" for s in std)


TABLE_COLUMNS = ["name", "architecture", "parameters", "dim", "input", "normalisation", "feature", "tile",
                 "weights"]


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Plain aligned text columns."""
    cells = [[str(c) for c in columns]] + [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)


def encoders_command(args: Any) -> int:
    """`gpfm encoders`: the zoo table (parameter counts computed on the meta device)."""
    import csv
    import json
    import sys

    rows = encoder_table(include_tiny=not getattr(args, "no_tiny", False))
    fmt = getattr(args, "format", "table")
    if fmt == "json":
        print(json.dumps(rows, indent=1))
    elif fmt == "csv":
        w = csv.DictWriter(sys.stdout, fieldnames=[*TABLE_COLUMNS, "licence", "aliases"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    else:
        print(format_table(rows, TABLE_COLUMNS))
        print("\naliases: " + "; ".join(f"{r['name']}: {r['aliases']}" for r in rows if r["aliases"]))
    return 0
