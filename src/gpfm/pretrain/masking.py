"""iBOT block-wise masks for the global crops (GPFM-METHOD.md §2.3; the BEiT/DINOv2 block generator).

Per step, `probability` of the global-crop images of the *global* batch are masked, with target ratios spread
over linear bins in [ratio_min, ratio_max]; which image gets which bin, and each image's blocks, are drawn from
generators seeded by (seed, step, image), so any process can compute its own slice of the batch and the masks
do not depend on the number of processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gpfm.io import GpfmError


@dataclass
class MaskingConfig:
    probability: float = 0.5  # share of global-crop images that are masked
    ratio_min: float = 0.1
    ratio_max: float = 0.5
    min_block_patches: int = 4
    aspect_min: float = 0.3  # block aspect ratio in [aspect_min, 1 / aspect_min]
    max_ratio: float = 0.5  # a block covers at most this share of the grid

    def __post_init__(self) -> None:
        if not (0.0 <= self.probability <= 1.0 and 0.0 <= self.ratio_min <= self.ratio_max <= 1.0):
            raise GpfmError("config 'masking': need 0 <= probability <= 1 and 0 <= ratio_min <= ratio_max <= 1")
        if not 0.0 < self.aspect_min <= 1.0:
            raise GpfmError("config key 'masking.aspect_min' must be in (0, 1]")


def block_mask(rng: np.random.Generator, grid: tuple[int, int], n_target: int, min_block: int = 4,
               aspect_min: float = 0.3, max_block: int | None = None) -> np.ndarray:
    """A (h, w) bool mask of about `n_target` patches (never more) built from random rectangles."""
    h, w = grid
    mask = np.zeros((h, w), dtype=bool)
    max_block = h * w if max_block is None else max_block
    log_aspect = (math.log(aspect_min), -math.log(aspect_min))
    count = 0
    while count < n_target:
        added = _add_block(mask, rng, min(n_target - count, max_block), min_block, log_aspect)
        if added == 0:
            break
        count += added
    return mask


def _add_block(mask: np.ndarray, rng: np.random.Generator, max_new: int, min_block: int,
               log_aspect: tuple[float, float]) -> int:
    """Try (10 times) to mask one rectangle adding between 1 and `max_new` new patches; return how many."""
    h, w = mask.shape
    for _ in range(10):
        lo, hi = sorted((float(min_block), float(max_new)))
        area = rng.uniform(lo, hi)
        aspect = math.exp(rng.uniform(*log_aspect))
        bh, bw = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < bh < h and 0 < bw < w:
            top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            box = mask[top:top + bh, left:left + bw]
            new = bh * bw - int(box.sum())
            if 0 < new <= max_new:
                box[...] = True
                return new
    return 0


def ratio_bins(seed: int, step: int, n_images: int, cfg: MaskingConfig) -> np.ndarray:
    """(n_images, 2) target-ratio range per image of the step's global batch; NaN rows are not masked."""
    n_masked = int(n_images * cfg.probability)
    edges = np.linspace(cfg.ratio_min, cfg.ratio_max, n_masked + 1)
    order = np.random.default_rng([seed, 7, step]).permutation(n_images)
    out = np.full((n_images, 2), np.nan)
    out[order[:n_masked], 0] = edges[:-1]
    out[order[:n_masked], 1] = edges[1:]
    return out


def step_masks(seed: int, step: int, n_images: int, image_ids: np.ndarray | list[int], grid: tuple[int, int],
               cfg: MaskingConfig) -> np.ndarray:
    """Masks (len(image_ids), h*w) for the given images (indices into the step's global list of
    global-crop images), identical whichever process computes them."""
    bins = ratio_bins(seed, step, n_images, cfg)
    n_tok = grid[0] * grid[1]
    max_block = int(cfg.max_ratio * n_tok)
    out = np.zeros((len(image_ids), n_tok), dtype=bool)
    for row, j in enumerate(image_ids):
        lo, hi = bins[j]
        if np.isnan(lo):
            continue
        rng = np.random.default_rng([seed, 11, step, int(j)])
        n_target = int(n_tok * rng.uniform(lo, hi))
        out[row] = block_mask(rng, grid, n_target, cfg.min_block_patches, cfg.aspect_min, max_block).reshape(-1)
    return out
