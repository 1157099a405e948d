"""Tissue masks: reference-equal primitives, areas in µm² that hold at any magnification, low-res reads only."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage.filters import threshold_otsu

from gpfm.slides import open_slide
from gpfm.slides.tissue import (
    TissueParams,
    fill_small_holes,
    otsu_threshold,
    read_segmentation_view,
    remove_small_objects,
    saturation,
    segmentation_plan,
    tissue_mask,
)

from .conftest import blank_rgb, write_pyramid


def test_otsu_and_saturation_equal_reference_libraries(he_rgb):
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(40, 10, 5000), rng.normal(150, 20, 3000)]).clip(0, 255).astype(np.uint8)
    assert otsu_threshold(values) == threshold_otsu(values)
    hsv_s = np.asarray(Image.fromarray(he_rgb).convert("HSV"))[..., 1]
    assert np.array_equal(saturation(he_rgb), hsv_s)
    dark = np.zeros((2, 2, 3), np.uint8) + np.array([10, 0, 0], np.uint8)  # saturated but black
    assert saturation(dark, dark_value=25).max() == 0


def scene(he_rgb: np.ndarray, px_um: float) -> np.ndarray:
    """Glass with a 1.6 mm tissue square holding an 80 µm and a 480 µm hole, and a 24 µm speck; px_um µm/px."""
    n = int(round(3200 / px_um))
    img = blank_rgb(n, n)
    tissue = np.asarray(Image.fromarray(he_rgb).resize((int(1600 / px_um),) * 2))
    a, b = int(800 / px_um), int(2400 / px_um)
    img[a:b, a:b] = tissue[: b - a, : b - a]
    for y, size in ((1000, 80), (1600, 480)):
        y0, y1, x0 = int(y / px_um), int((y + size) / px_um), int(1000 / px_um)
        img[y0:y1, x0:x0 + (y1 - y0)] = 240
    s0, s1 = int(200 / px_um), int(224 / px_um)
    img[s0:s1, s0:s1] = (120, 40, 140)
    return img


@pytest.mark.parametrize("px_um", [8.0, 16.0])
def test_mask_fills_small_holes_keeps_large_drops_specks_at_any_mpp(he_rgb, px_um):
    mask = tissue_mask(scene(he_rgb, px_um), px_um)

    def frac(y_um, x_um, size_um):
        y0, x0, n = int(y_um / px_um), int(x_um / px_um), max(1, int(size_um / px_um))
        return mask[y0:y0 + n, x0:x0 + n].mean()

    assert frac(1000, 1000, 80) == 1.0  # 80 µm hole (6,400 µm² < 10,000) is filled
    assert frac(1650, 1050, 380) == 0.0  # 480 µm hole (230,400 µm²) stays open
    assert frac(180, 180, 64) == 0.0  # 24 µm speck is dropped
    assert frac(0, 0, 700) == 0.0 and frac(2500, 2500, 600) == 0.0  # glass
    tissue_um2 = mask.sum() * px_um**2
    assert tissue_um2 == pytest.approx(1600**2 - 480**2, rel=0.04)


def test_blank_glass_has_no_tissue():
    assert not tissue_mask(blank_rgb(400, 400), 8.0).any()


def test_area_filters():
    m = np.zeros((20, 20), bool)
    m[2:12, 2:12] = True
    m[5:7, 5:7] = False  # 4 px hole
    m[15:17, 15:17] = True  # 4 px object
    assert fill_small_holes(m, 5)[5:7, 5:7].all() and not fill_small_holes(m, 4)[5:7, 5:7].any()
    assert not remove_small_objects(m, 5)[15:17, 15:17].any() and remove_small_objects(m, 4)[15:17, 15:17].all()
    assert not fill_small_holes(m, 1000)[0, 0]  # background touching the border is never a hole


def test_segmentation_reads_only_the_low_resolution_level(tmp_path, he_rgb, monkeypatch):
    # 4096 px at 1 µm/px, levels at 1, 2, 4, 8 µm/px: the 8 µm/px level is used and nothing else is read.
    canvas = np.full((4096, 4096, 3), 245, np.uint8)
    canvas[500:1500, 500:1500] = he_rgb
    path = write_pyramid(tmp_path / "big.tiff", canvas, mpp=1.0, levels=4, compression="jpeg")
    with open_slide(path) as s:
        assert segmentation_plan(s) == (3, 1)
        reads = []
        orig = s._read
        monkeypatch.setattr(s, "_read", lambda loc, lv, size: reads.append(lv) or orig(loc, lv, size))
        view = read_segmentation_view(s)
        assert set(reads) == {3} and view.mpp == pytest.approx(8.0) and view.rgb.shape == (512, 512, 3)
        mask = tissue_mask(view.rgb, view.mpp)
        assert mask[70:180, 70:180].all() and not mask[200:].any()


def test_single_level_slide_is_reduced_into_the_range(shared_data):
    with open_slide(shared_data / "cmu_small_region.svs") as s:
        level, factor = segmentation_plan(s)
        assert level == 0 and 8 / 1.05 <= factor * s.mpp <= 16
        view = read_segmentation_view(s, TissueParams())
        assert 7.5 <= view.mpp <= 16 and max(view.preview.shape[:2]) >= 1024
        assert view.rgb.shape[0] == pytest.approx(2967 / view.factor, abs=1)
