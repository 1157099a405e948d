"""Schedules (GPFM recipe numbers) and iBOT block masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from gpfm.io import GpfmError
from gpfm.pretrain.masking import MaskingConfig, block_mask, ratio_bins, step_masks
from gpfm.pretrain.schedules import OptimConfig, cosine, linear_warmup, scaled_lr, values_at

GPFM_TOTAL, GPFM_BATCH = 500_000, 1536


def test_cosine_and_warmup_shape():
    assert cosine(0, 100, 1.0, 0.0, warmup=10) == 0.0
    assert cosine(5, 100, 1.0, 0.0, warmup=10) == pytest.approx(0.5)
    assert cosine(10, 100, 1.0, 0.0, warmup=10) == pytest.approx(1.0)
    assert cosine(55, 100, 1.0, 0.0, warmup=10) == pytest.approx(0.5)
    assert cosine(100, 100, 1.0, 0.0, warmup=10) == 0.0 and cosine(10**6, 100, 1.0, 0.0) == 0.0
    assert linear_warmup(0, 10, 0.04, 0.07) == 0.04 and linear_warmup(10, 10, 0.04, 0.07) == 0.07


def test_gpfm_recipe_values():
    cfg = OptimConfig()
    assert scaled_lr(cfg, GPFM_BATCH) == pytest.approx(4e-4 * math.sqrt(1.5))  # ~4.90e-4
    v = lambda s: values_at(s, GPFM_TOTAL, cfg, GPFM_BATCH)  # noqa: E731
    assert v(0)["lr"] == 0.0 and v(25_000)["lr"] == pytest.approx(scaled_lr(cfg, GPFM_BATCH) / 2)
    assert v(50_000)["lr"] == pytest.approx(4.899e-4, rel=1e-3)
    assert v(GPFM_TOTAL)["lr"] == pytest.approx(1e-6)
    assert v(0)["wd"] == pytest.approx(0.04) and v(GPFM_TOTAL // 2)["wd"] == pytest.approx(0.22)
    assert v(GPFM_TOTAL)["wd"] == pytest.approx(0.4)
    assert v(0)["momentum"] == pytest.approx(0.992) and v(GPFM_TOTAL)["momentum"] == 1.0
    # the released checkpoint (iteration 87,500): lr ~4.8e-4, momentum ~0.9926 (GPFM-METHOD.md §2.7)
    assert v(87_500)["lr"] == pytest.approx(4.8e-4, rel=0.01)
    assert v(87_500)["momentum"] == pytest.approx(0.9926, abs=1e-4)
    assert v(0)["teacher_temp"] == 0.04 and v(18_750)["teacher_temp"] == pytest.approx(0.055)
    assert v(37_500)["teacher_temp"] == 0.07 and v(400_000)["teacher_temp"] == 0.07
    assert v(1249)["last_layer_frozen"] == 1.0 and v(1250)["last_layer_frozen"] == 0.0
    with pytest.raises(GpfmError):
        OptimConfig(lr_scaling="cubic")


def test_block_mask_never_exceeds_target_and_is_blocky():
    rng = np.random.default_rng(0)
    sizes, comps = [], []
    for target in (26, 51, 77, 102, 128):
        m = block_mask(rng, (16, 16), target, min_block=4, aspect_min=0.3, max_block=128)
        assert m.sum() <= target
        assert m.sum() >= 0.7 * target  # blocks fill close to the target
        sizes.append(m.sum())
        comps.append(ndimage.label(m)[1])
    assert np.sum(sizes) / np.sum(comps) >= 8  # masked patches come in blocks, not scattered pixels
    assert not block_mask(rng, (16, 16), 0).any()


def test_step_masks_share_ratios_and_slices():
    cfg = MaskingConfig()
    n, grid = 64, (16, 16)
    masks = step_masks(0, 3, n, np.arange(n), grid, cfg)
    masked = masks.any(1)
    assert masked.sum() == int(n * cfg.probability)  # exactly half of the images
    ratios = masks[masked].mean(1)
    assert ratios.max() <= cfg.ratio_max + 1e-9 and ratios.min() >= 0.5 * cfg.ratio_min
    bins = ratio_bins(0, 3, n, cfg)
    lo = np.sort(bins[~np.isnan(bins[:, 0]), 0])
    assert np.allclose(lo, np.linspace(0.1, 0.5, 33)[:-1])  # linear bins over [0.1, 0.5]
    # any process computes the same masks for its slice; a new step gives new masks
    assert np.array_equal(step_masks(0, 3, n, np.arange(10, 20), grid, cfg), masks[10:20])
    assert not np.array_equal(step_masks(0, 4, n, np.arange(n), grid, cfg), masks)
    with pytest.raises(GpfmError):
        MaskingConfig(ratio_min=0.6, ratio_max=0.5)
