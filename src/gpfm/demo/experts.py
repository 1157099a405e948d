"""Specialist expert encoders for the demo: tiny ViTs, each supervised on ONE hidden variable of the cohort.

The demo's UKD student is distilled from two experts that know different things, as GPFM distils from UNI,
CONCH and Phikon: `label` (the tumour-pattern cue of the ROI tiles: normal / ductal / lobular) and `grade`
(the stromal cue, 1-3). Each is `create_encoder("tiny-vit")` trained with a linear head and cross-entropy on the
cohort's ROI train split (random 112-px crops, flips, right-angle rotations, stain jitter), and
saved as `model.safetensors` + timm-style `config.json` (contracts.md), so that both
`create_encoder("tiny-vit", weights=DIR)` and `create_encoder("timm-export", weights=DIR)` load it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gpfm.demo.render import E_OD, H_OD
from gpfm.io import GpfmError, append_jsonl, log, read_json, write_json

TARGETS = ("label", "grade")


@dataclass(frozen=True)
class ExpertParams:
    """Training settings (the defaults train one expert in about a minute on 2 CPU cores). Random crops keep the
    tiles' native 0.5 µm/px (the ViT interpolates its position embeddings), so features are taken at 224 px."""

    encoder: str = "tiny-vit"
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 10
    crop: int | None = 112  # train on random crops of this size at native resolution (4x cheaper steps)
    seed: int = 0


def load_roi(cohort_dir: str | os.PathLike, target: str, splits: tuple[str, ...]) -> tuple[list[str], np.ndarray,
                                                                                           list[str]]:
    """ROI tile paths (relative to roi/) of the given splits, their integer targets, and the class names."""
    import pandas as pd

    if target not in TARGETS:
        raise GpfmError(f"expert target must be one of {', '.join(TARGETS)}, not {target!r}")
    csv = Path(cohort_dir) / "roi" / "roi.csv"
    if not csv.is_file():
        raise GpfmError(f"{csv}: not found; generate the cohort first (gpfm.demo.cohort.make_cohort)")
    df = pd.read_csv(csv)
    classes = sorted(df[target].astype(str).unique())
    df = df[df["split"].isin(splits)]
    y = df[target].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    return df["path"].tolist(), y, classes


def read_images(cohort_dir: str | os.PathLike, paths: list[str], size: int):
    """uint8 (N, 3, size, size) tensor of the ROI tiles, resized once (bicubic, antialiased)."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    root = Path(cohort_dir) / "roi"
    arr = np.stack([np.asarray(Image.open(root / p).convert("RGB")) for p in paths])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def augment(x, gen):
    """float (B, 3, H, W) in [0, 1]: random flips, right-angle rotation, and stain jitter: each image's
    haematoxylin and eosin densities (unmixed with the renderer's stain vectors) scaled by 0.6-1.4, as the
    slides' own stains vary, plus a small brightness shift, so colour alone cannot carry the target."""
    import torch

    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-2)
    x = torch.rot90(x, int(torch.randint(0, 4, (), generator=gen)), (-2, -1))
    stains = torch.from_numpy(np.stack([H_OD, E_OD]))  # (2 stains, 3 channels)
    od = -torch.log(x.clamp(min=1 / 255))
    conc = torch.einsum("bchw,cs->bshw", od, torch.linalg.pinv(stains))
    scale = 0.6 + 0.8 * torch.rand(x.shape[0], 2, 1, 1, generator=gen)
    od = od + torch.einsum("bshw,sc->bchw", conc * (scale - 1), stains)
    shift = 0.04 * (2 * torch.rand(x.shape[0], 1, 1, 1, generator=gen) - 1)
    return torch.exp(-od).add_(shift).clamp_(0, 1)


def train_expert(cohort_dir: str | os.PathLike, target: str, out_dir: str | os.PathLike,
                 params: ExpertParams = ExpertParams(), quiet: bool = False) -> Path:
    """Train one expert on the ROI train split and save it under `out_dir`; returns that folder.

    A folder that already holds the expert trained with the same settings is reused.
    """
    import torch
    import torch.nn.functional as F

    from gpfm.encoders import create_encoder
    from gpfm.encoders.weights import save_weights
    from gpfm.io import progress

    out = Path(out_dir)
    paths, y, classes = load_roi(cohort_dir, target, ("train",))
    cohort = read_json(Path(cohort_dir) / "cohort.json").get("params", {}) \
        if (Path(cohort_dir) / "cohort.json").is_file() else str(cohort_dir)
    card = dict(source="gpfm.demo.experts", target=target, cohort=cohort, **asdict(params))
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        if read_json(out / "config.json").get("gpfm", {}).get("train") == card:
            return out
    t0 = time.perf_counter()
    vpaths, vy, _ = load_roi(cohort_dir, target, ("val",))
    if len(set(y.tolist())) < 2:
        raise GpfmError(f"{cohort_dir}: the ROI train split has fewer than 2 classes of {target}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        enc = create_encoder(params.encoder, weights="random", seed=params.seed)
        head = torch.nn.Linear(enc.dim, len(classes))
    size = enc.transform.input_size
    x, xv = read_images(cohort_dir, paths, size), read_images(cohort_dir, vpaths, size)
    y_t, gen = torch.from_numpy(y.copy()), torch.Generator().manual_seed(params.seed)
    enc.train().requires_grad_(True)
    model_params = list(enc.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(model_params, lr=params.lr, weight_decay=params.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / params.warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(s / params.steps, 1.0))))
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    with progress(range(params.steps), desc=f"expert {target}", unit="step", quiet=quiet) as bar:
        for step in bar:
            idx = torch.randint(0, len(x), (params.batch_size,), generator=gen)
            xb = enc.transform.normalize(augment(_crops(x[idx], params.crop, gen).float().div_(255), gen))
            loss = F.cross_entropy(head(enc(xb)), y_t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model_params, 3.0)
            opt.step()
            sched.step()
            append_jsonl(out / "metrics.jsonl", dict(step=step, loss=loss.item()))
    enc.eval().requires_grad_(False)
    val_acc = round(_accuracy(enc, head, xv, vy), 4) if len(vy) else None
    save_weights(enc, out / "model.safetensors")
    config = export_config(enc, dict(train=card, classes=classes, val_accuracy=val_acc,
                                     seconds=round(time.perf_counter() - t0, 1)))
    write_json(out / "config.json", config)  # written last: a folder with config.json is complete
    log.info("expert %s: %d steps, val accuracy %s, %.0f s -> %s", target, params.steps, val_acc,
             time.perf_counter() - t0, out)
    return out


def _crops(x, size: int | None, gen):
    """A random size x size window of each image (None or the full size: the images as they are)."""
    import torch

    if size is None or size >= x.shape[-1]:
        return x
    off = torch.randint(0, x.shape[-1] - size + 1, (len(x), 2), generator=gen).tolist()
    return torch.stack([im[:, i:i + size, j:j + size] for im, (i, j) in zip(x, off)])


def make_experts(cohort_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 params: ExpertParams = ExpertParams(), quiet: bool = False,
                 targets: tuple[str, ...] = TARGETS) -> dict[str, Path]:
    """The demo experts: `<out_dir>/expert-label` and `<out_dir>/expert-grade` (each reused when done)."""
    for t in targets:
        if t not in TARGETS:
            raise GpfmError(f"expert target must be one of {', '.join(TARGETS)}, not {t!r}")
    return {t: train_expert(cohort_dir, t, Path(out_dir) / f"expert-{t}", params, quiet) for t in targets}


def _accuracy(enc, head, x, y: np.ndarray) -> float:
    import torch

    with torch.inference_mode():
        pred = torch.cat([head(enc(enc.transform.normalize(x[i:i + 64].float().div_(255)))).argmax(1)
                          for i in range(0, len(x), 64)])
    return float((pred.numpy() == y).mean())


def export_config(enc, card: dict) -> dict:
    """timm hub-style config.json for an encoder built from a timm ViT (contracts.md, "Exported models")."""
    args = {k: v for k, v in enc.record.model_args.items() if k != "arch"}
    t = enc.transform
    return {
        "architecture": enc.record.model_args["arch"],
        "model_args": args,
        "num_features": enc.dim,
        "pretrained_cfg": {"input_size": [3, t.input_size, t.input_size], "mean": list(t.mean),
                           "std": list(t.std), "interpolation": t.interpolation, "crop_pct": 1.0},
        "gpfm": {"feature": enc.record.feature, "mpp": enc.record.mpp, "tile_size": enc.record.tile_size,
                 **card},
    }
