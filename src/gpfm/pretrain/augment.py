"""Multi-crop augmentation for UKD (GPFM-METHOD.md §2.3): 2 global + N local crops with flips, 90-degree
rotations, HED stain jitter, colour jitter, grayscale, blur and solarisation.

Each view is first *sampled* as plain parameters (`View`), then *rendered* from the tile. Sampling uses a
per-sample `random.Random`, so a view depends only on (seed, sample index); rendering the same `View` at
another size gives an expert the same crop at its own input size (R1). Images stay float in [0, 1]:
normalisation belongs to whoever consumes them (the student's ImageNet statistics, each expert's own).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from gpfm.io import GpfmError

_BICUBIC = TF.InterpolationMode.BICUBIC


@dataclass
class CropsConfig:
    """DINOv2/GPFM defaults. `blur_p` is (global crop 1, global crop 2, local crops): the intended values (R7);
    `compat_inverted_blur` reproduces upstream's effective 1 - p for the global crops (ablations only)."""

    global_size: int = 224
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_size: int = 98
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    n_local: int = 8
    aspect: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    vflip: float = 0.0
    rot90: float = 0.0  # probability of a random 90/180/270-degree rotation
    hed_p: float = 0.0  # H&E stain jitter (off in the GPFM recipe)
    hed_sigma: float = 0.05  # stain concentration scale in [1 - s, 1 + s], shift in [-s, s]
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])
    blur_kernel: int = 9
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    solarize_p: float = 0.2  # global crop 2 only
    solarize_threshold: float = 128 / 255
    compat_inverted_blur: bool = False

    def __post_init__(self) -> None:
        if len(self.blur_p) != 3:
            raise GpfmError("config key 'crops.blur_p': give 3 probabilities (global 1, global 2, locals)")
        if self.blur_kernel % 2 == 0:
            raise GpfmError("config key 'crops.blur_kernel' must be odd")

    def effective_blur_p(self) -> list[float]:
        """Blur probability actually applied per crop kind: intended, or upstream's inverted global values."""
        g1, g2, loc = self.blur_p
        return [1.0 - g1, 1.0 - g2, loc] if self.compat_inverted_blur else [g1, g2, loc]


@dataclass(frozen=True)
class View:
    """One augmented view: a crop box in tile pixels plus the random choices applied to it."""

    box: tuple[int, int, int, int]  # top, left, height, width
    hflip: bool = False
    vflip: bool = False
    rot90: int = 0
    hed: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # (scale x3, shift x3)
    jitter: tuple[tuple[str, float], ...] = ()  # ordered (op, factor)
    gray: bool = False
    blur_sigma: float | None = None  # in pixels of a `ref_size` rendering
    solarize: bool = False


def crop_box(rng: random.Random, hw: tuple[int, int], scale: list[float], aspect: list[float]) -> tuple[int, ...]:
    """RandomResizedCrop's box: area share in `scale`, log-uniform aspect; centre crop after 10 misses."""
    height, width = hw
    area = height * width
    log_ratio = (math.log(aspect[0]), math.log(aspect[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ratio = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < aspect[0]:
        w, h = width, round(width / aspect[0])
    elif in_ratio > aspect[1]:
        h, w = height, round(height * aspect[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_view(rng: random.Random, hw: tuple[int, int], cfg: CropsConfig, kind: int) -> View:
    """Draw one view. `kind` 0 and 1 are the two global crops, 2 a local crop."""
    scale = cfg.global_scale if kind < 2 else cfg.local_scale
    box = crop_box(rng, hw, scale, cfg.aspect)
    hflip = rng.random() < cfg.hflip
    vflip = rng.random() < cfg.vflip
    rot = rng.randint(1, 3) if rng.random() < cfg.rot90 else 0
    hed = None
    if rng.random() < cfg.hed_p:
        s = cfg.hed_sigma
        hed = (tuple(rng.uniform(1 - s, 1 + s) for _ in range(3)), tuple(rng.uniform(-s, s) for _ in range(3)))
    jitter: tuple[tuple[str, float], ...] = ()
    if rng.random() < cfg.color_jitter_p:
        ops = [("brightness", cfg.brightness), ("contrast", cfg.contrast), ("saturation", cfg.saturation),
               ("hue", cfg.hue)]
        rng.shuffle(ops)
        jitter = tuple((op, rng.uniform(-a, a) if op == "hue" else rng.uniform(max(0.0, 1 - a), 1 + a))
                       for op, a in ops if a > 0)
    gray = rng.random() < cfg.grayscale_p
    blur = rng.uniform(*cfg.blur_sigma) if rng.random() < cfg.effective_blur_p()[kind] else None
    solarize = kind == 1 and rng.random() < cfg.solarize_p
    return View(box, hflip, vflip, rot, hed, jitter, gray, blur, solarize)


# Ruifrok & Johnston haematoxylin / eosin / DAB optical-density vectors (rows, unit length).
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def hed_jitter(img: torch.Tensor, scale: tuple[float, ...], shift: tuple[float, ...]) -> torch.Tensor:
    """Scale and shift the H, E and D stain concentrations of a (3, H, W) image in [0, 1] (Tellez et al.)."""
    od = -torch.log(img.clamp_min(1e-6)).permute(1, 2, 0)  # H, W, 3
    conc = od @ _HED_FROM_RGB.to(img)
    conc = conc * torch.tensor(scale).to(img) + torch.tensor(shift).to(img)
    return torch.exp(-(conc @ _RGB_FROM_HED.to(img))).permute(2, 0, 1).clamp(0.0, 1.0)


def render(tile: torch.Tensor, view: View, size: int, cfg: CropsConfig, ref_size: int | None = None,
           colour: bool = True) -> torch.Tensor:
    """Render `view` of a (3, H, W) float tile at `size` px. Blur scales with size / `ref_size` so a view
    rendered larger for an expert is the same image; `colour=False` keeps only the geometry."""
    top, left, h, w = view.box
    x = TF.resized_crop(tile, top, left, h, w, [size, size], interpolation=_BICUBIC, antialias=True).clamp(0, 1)
    if view.hflip:
        x = TF.hflip(x)
    if view.vflip:
        x = TF.vflip(x)
    if view.rot90:
        x = torch.rot90(x, view.rot90, dims=(1, 2))
    if not colour:
        return x
    if view.hed is not None:
        x = hed_jitter(x, *view.hed)
    for op, factor in view.jitter:
        x = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
             "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}[op](x, factor)
    if view.gray:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if view.blur_sigma is not None:
        ratio = size / (ref_size or size)
        kernel = max(3, 2 * round((cfg.blur_kernel * ratio - 1) / 2) + 1)
        x = TF.gaussian_blur(x, [kernel, kernel], [view.blur_sigma * ratio] * 2)
    if view.solarize:
        x = TF.solarize(x, cfg.solarize_threshold)
    return x


def tile_to_tensor(tile: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    if tile.ndim != 3 or tile.shape[2] != 3 or tile.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 tile, got {tile.shape} {tile.dtype}")
    return torch.from_numpy(np.require(tile, requirements=["C", "W"])).permute(2, 0, 1).float().div_(255.0)


def multi_crop(tile: np.ndarray, rng: random.Random, cfg: CropsConfig, expert_sizes: tuple[int, ...] = (),
               expert_colour: bool = True) -> dict[str, torch.Tensor | dict[int, torch.Tensor]]:
    """All views of one tile: `global` (2, 3, G, G), `local` (n, 3, L, L) and, per expert input size S,
    `experts[S]` (2, 3, S, S): the two global views re-rendered from the tile at S px."""
    x = tile_to_tensor(tile)
    hw = (x.shape[1], x.shape[2])
    views = [sample_view(rng, hw, cfg, k) for k in (0, 1)]
    locals_ = [sample_view(rng, hw, cfg, 2) for _ in range(cfg.n_local)]
    out: dict = {"global": torch.stack([render(x, v, cfg.global_size, cfg) for v in views])}
    out["local"] = (torch.stack([render(x, v, cfg.local_size, cfg) for v in locals_]) if locals_
                    else torch.zeros(0, 3, cfg.local_size, cfg.local_size))
    out["experts"] = {s: torch.stack([render(x, v, s, cfg, cfg.global_size, expert_colour) for v in views])
                      for s in expert_sizes}
    return out
