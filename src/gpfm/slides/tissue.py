"""Tissue masks from a low-resolution view of a slide (about 8-16 µm/px), never from level 0 of a large slide.

Saturation separates stained tissue from glass: Otsu's threshold (kept within a sane range so that a blank or an
all-tissue image does not split its own noise), light smoothing, morphological clean-up, then hole filling and
small-object removal with areas in µm², so the same settings work at any magnification.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpfm.slides.reader import MPP_TOLERANCE, Slide


@dataclass(frozen=True)
class TissueParams:
    """Segmentation settings; lengths in µm, areas in µm², saturations on the 0-255 HSV scale."""

    seg_mpp: tuple[float, float] = (8.0, 16.0)  # µm/px range of the image the mask is computed on
    smooth_um: float = 8.0  # Gaussian sigma applied to the saturation image
    saturation_range: tuple[int, int] = (15, 45)  # Otsu's threshold is clipped into this range
    dark_value: int = 25  # pixels whose brightest channel is below this are not tissue (black borders, pen)
    close_um: float = 24.0  # closing (square side) bridges small gaps between tissue pieces
    open_um: float = 0.0  # opening (square side) removes thin dust lines; off: it also erases thin tissue
    min_tissue_area_um2: float = 20_000.0  # smaller pieces of tissue are dropped
    min_hole_area_um2: float = 10_000.0  # smaller holes are filled; larger ones (lumen, fat) are kept
    max_mask_px: int = 1_000_000  # a reduced image is made coarser (within seg_mpp) to stay under this


@dataclass
class SegmentationView:
    """The low-resolution image a mask is computed on, its µm/px and origin, and a larger preview for thumbnails."""

    rgb: np.ndarray
    mpp: float
    level: int
    factor: int
    scale: tuple[float, float]  # level-0 px per image px along x and y
    preview: np.ndarray  # the whole slide at about `preview_size` px (may be `rgb` itself)


def segmentation_plan(slide: Slide, params: TissueParams = TissueParams()) -> tuple[int, int]:
    """(level, integer reduction factor) giving an image of about `seg_mpp` µm/px at the least read cost.

    A level inside the range is read as it is. Otherwise the finest coarser level within 4x of the range is
    used (cheap, and still several pixels per 128 µm tile); failing that, the coarsest finer level is read in
    strips and block-averaged into the range (bounded memory), as finely as `max_mask_px` allows; a slide
    coarser than all that uses its finest level.
    """
    lo, hi = params.seg_mpp
    mpps = [slide.level_mpp(lv) for lv in range(slide.level_count)]
    inside = [lv for lv, m in enumerate(mpps) if lo / (1 + MPP_TOLERANCE) <= m <= hi * (1 + MPP_TOLERANCE)]
    if inside:
        return min(inside, key=mpps.__getitem__), 1
    coarser = [lv for lv, m in enumerate(mpps) if hi < m <= 4 * hi]
    if coarser:
        return min(coarser, key=mpps.__getitem__), 1
    finer = [lv for lv, m in enumerate(mpps) if m < lo]
    if not finer:
        return min(range(len(mpps)), key=mpps.__getitem__), 1
    level = max(finer, key=mpps.__getitem__)
    lw, lh = slide.level_dimensions[level]
    factor = max(1, int(np.ceil(lo / mpps[level] - 1e-6)))
    while (factor + 1) * mpps[level] <= hi and (lw / factor) * (lh / factor) > params.max_mask_px:
        factor += 1
    return level, factor


def read_segmentation_view(slide: Slide, params: TissueParams = TissueParams(),
                           preview_size: int = 1024) -> SegmentationView:
    """Read the segmentation image (the only pixels segmentation and tiling need) and a thumbnail preview.

    When the segmentation image is a reduction of a level, that level is read once at preview size and the
    segmentation image is reduced from it, so a thumbnail costs no second read. Only a slide too small for a
    512 px preview at the segmentation level gets one more (small) read for its preview.
    """
    from PIL import Image

    level, factor = segmentation_plan(slide, params)
    (w0, h0), (lw, lh) = slide.dimensions, slide.level_dimensions[level]
    pf = max(1, int(max(lw, lh) / preview_size))
    if factor > 1 and pf < factor:
        preview = slide.read_level(level, pf)
        k = max(1, round(factor / pf))
        rgb = np.array(Image.fromarray(preview).reduce(k)) if k > 1 else preview
        factor = pf * k
    else:
        rgb = preview = slide.read_level(level, factor)
    if max(preview.shape[:2]) < min(512, max(w0, h0)):  # a small slide: preview from the coarsest level >= 512 px
        big = [lv for lv in range(slide.level_count) if max(slide.level_dimensions[lv]) >= 512] or [0]
        lv = max(big, key=lambda i: slide.level_downsamples[i])
        preview = slide.read_level(lv, max(1, int(max(slide.level_dimensions[lv]) / preview_size)))
    scale = (w0 / lw * factor, h0 / lh * factor)
    return SegmentationView(rgb=rgb, mpp=slide.mpp * scale[0], level=level, factor=factor, scale=scale,
                            preview=preview)


def saturation(rgb: np.ndarray, dark_value: int = 0) -> np.ndarray:
    """HSV saturation (0-255, uint8) of an (h, w, 3) uint8 image; 0 where the brightest channel < dark_value."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    sat = ((mx - mn).astype(np.uint16) * 255 // np.maximum(mx, 1)).astype(np.uint8)
    if dark_value:
        sat[mx < dark_value] = 0
    return sat


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: pixels > threshold form the upper class."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 / total - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = 0
    return int(np.argmax(between))


def tissue_mask(rgb: np.ndarray, mpp: float, params: TissueParams = TissueParams()) -> np.ndarray:
    """Boolean tissue mask of an RGB image whose pixels are `mpp` µm wide."""
    from scipy import ndimage

    sat = saturation(rgb, params.dark_value)
    sigma = params.smooth_um / mpp
    if sigma >= 0.3:
        sat = ndimage.gaussian_filter(sat, sigma=sigma, truncate=2.0)
    lo, hi = params.saturation_range
    mask = (sat > int(np.clip(otsu_threshold(sat), lo, hi))).view(np.uint8)
    close_px, open_px = _odd(params.close_um / mpp), _odd(params.open_um / mpp)
    if close_px > 1:  # square structuring elements: separable, so cheap at any size
        mask = ndimage.minimum_filter(ndimage.maximum_filter(mask, close_px, mode="constant"), close_px,
                                      mode="nearest")
    if open_px > 1:
        mask = ndimage.maximum_filter(ndimage.minimum_filter(mask, open_px, mode="nearest"), open_px,
                                      mode="constant")
    area_px = mpp * mpp
    mask = fill_small_holes(mask.view(bool), params.min_hole_area_um2 / area_px)
    return remove_small_objects(mask, params.min_tissue_area_um2 / area_px)


def remove_small_objects(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected components of `mask` smaller than `min_px` pixels."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0 or min_px <= 1:
        return mask
    keep = np.bincount(labels.ravel()) >= min_px
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill holes (background not connected to the image border) smaller than `max_px` pixels."""
    from scipy import ndimage

    labels, n = ndimage.label(~mask)  # 4-connected background, the complement of 8-connected tissue
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = sizes < max_px
    fill[border] = False
    fill[0] = False
    return mask | fill[labels]


def _odd(px: float) -> int:
    return max(1, int(round(px)) | 1)
