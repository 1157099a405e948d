"""Slide reader: real fixtures open with the right geometry, every backend gives the same pixels, µm/px lookup."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from gpfm.io import GpfmError
from gpfm.slides import reader
from gpfm.slides.reader import mpp_from_metadata, open_slide


def test_fixtures_open_with_right_dimensions_and_levels(shared_data):
    fx = shared_data / "fixtures"
    with open_slide(fx / "small.svs") as s:
        assert (s.backend, s.dimensions, s.level_count, s.mpp) == ("openslide", (16, 16), 1, 0.499)
        assert s.read_region((0, 0), 0, (16, 16)).shape == (16, 16, 3)
    with open_slide(fx / "boxes.tiff") as s:
        assert s.level_dimensions == [(300, 250), (150, 125), (75, 62), (37, 31)]
        assert s.level_count == 4 and s.level_downsamples[1] == 2.0
        # Its 352.8 µm/px comes from a 72 dpi writer default: refused, with the fix in the message.
        assert s.mpp_or_none is None
        with pytest.raises(GpfmError, match="--mpp"):
            _ = s.mpp
        # Every level's pixels equal tifffile's own decoding of that level.
        for lv in range(4):
            ref = tifffile.imread(fx / "boxes.tiff", key=lv)[..., :3]
            assert np.array_equal(s.read_region((0, 0), lv, s.level_dimensions[lv]), ref)
    with open_slide(fx / "boxes_0.dcm") as s:
        assert (s.backend, s.dimensions, s.level_count, s.mpp) == ("openslide", (16, 16), 1, 0.499)
    with open_slide(fx / "boxes.tiff", mpp=0.25) as s:
        assert s.mpp == 0.25 and s.mpp_source == "override"
        assert s.level_mpp(2) == pytest.approx(0.25 * s.level_downsamples[2])


def test_cmu_slide_metadata(shared_data):
    with open_slide(shared_data / "cmu_small_region.svs") as s:
        assert s.dimensions == (2220, 2967) and s.level_count == 1
        assert s.mpp == pytest.approx(0.499) and s.mpp_source == "openslide.mpp-x"
        assert s.slide_id == "cmu_small_region"
        th = s.thumbnail(256)
        assert max(th.shape[:2]) == 256 and th.shape[2] == 3


def test_unopenable_file_is_one_clear_line(shared_data):
    path = shared_data / "fixtures" / "unopenable.tiff"
    with pytest.raises(GpfmError) as e:
        open_slide(path)
    msg = str(e.value)
    assert "unopenable.tiff" in msg and "cannot open" in msg and "\n" not in msg
    with pytest.raises(GpfmError, match="no such slide"):
        open_slide(path.with_name("missing.svs"))


def test_png_is_a_one_level_slide_and_needs_mpp(shared_data, he_rgb):
    path = shared_data / "he_target_tile.png"
    with open_slide(path) as s:
        assert (s.backend, s.dimensions, s.level_count) == ("image", (1000, 1000), 1)
        with pytest.raises(GpfmError, match=r"he_target_tile.png.*pass --mpp"):
            _ = s.mpp
    with open_slide(path, mpp=0.5) as s:
        assert s.mpp == 0.5
        assert np.array_equal(s.read_region((100, 200), 0, (64, 32)), he_rgb[200:232, 100:164])
    with pytest.raises(GpfmError, match="positive"):
        open_slide(path, mpp=-1)


def test_strip_tiff_falls_back_to_tiffslide_with_resolution_tags(tmp_path, he_rgb):
    path = tmp_path / "strips.tif"  # not tiled: OpenSlide refuses it
    tifffile.imwrite(path, he_rgb, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")
    with open_slide(path) as s:
        assert s.backend == "tiffslide" and s.dimensions == (1000, 1000)
        assert s.mpp == pytest.approx(0.5)
        assert np.array_equal(s.read_region((10, 20), 0, (50, 40)), he_rgb[20:60, 10:60])


def test_read_region_is_white_outside_and_matches_inside(he_pyramid):
    with open_slide(he_pyramid) as s:
        full = s.read_region((0, 0), 1, s.level_dimensions[1])
        out = s.read_region((-40, -20), 1, (100, 60))  # level-0 (-40, -20) = level-1 (-20, -10)
        assert (out[:10] == 255).all() and (out[:, :20] == 255).all()
        assert np.array_equal(out[10:, 20:], full[:50, :80])
        w, h = s.level_dimensions[1]
        edge = s.read_region((2 * (w - 5), 2 * (h - 5)), 1, (10, 10))
        assert np.array_equal(edge[:5, :5], full[-5:, -5:]) and (edge[5:] == 255).all()
        assert (s.read_region((10**6, 10**6), 0, (8, 8)) == 255).all()
        assert s.read_region((0, 0), 0, (4, 4)).flags.writeable
        with pytest.raises(GpfmError, match="level 9"):
            s.read_region((0, 0), 9, (4, 4))


def test_levels_and_best_level_for_mpp(he_pyramid):
    with open_slide(he_pyramid) as s:
        assert s.level_count == 4 and s.mpp == pytest.approx(0.25)
        assert [s.best_level_for_mpp(m) for m in (0.25, 0.26, 0.5, 0.9, 1.0, 8.0)] == [0, 0, 1, 1, 2, 3]
        assert s.best_level_for_mpp(0.1) == 0


def test_read_level_in_strips_equals_one_read(he_pyramid, monkeypatch):
    with open_slide(he_pyramid) as s:
        whole = s.read_level(0, 4)
        ref = np.asarray(Image.fromarray(s.read_region((0, 0), 0, s.dimensions)).reduce(4))
        assert np.array_equal(whole, ref)
        monkeypatch.setattr(reader, "READ_BUDGET_PX", 2048 * 100)  # strips of 100 rows (a multiple of 4)
        assert np.array_equal(s.read_level(0, 4), whole)


def test_mpp_lookup_chain():
    props = {"openslide.mpp-x": "0.2520", "aperio.MPP": "0.5"}
    assert mpp_from_metadata(props, ("openslide.mpp-x", "aperio.MPP"), None) == (0.252, "openslide.mpp-x")
    assert mpp_from_metadata({"aperio.MPP": "0.5"}, ("openslide.mpp-x", "aperio.MPP"), 2.0)[0] == 0.5
    assert reader._tiff_resolution(20000, "centimeter") == pytest.approx(0.5)
    assert reader._tiff_resolution(50800, "inch") == pytest.approx(0.5)
    assert reader._tiff_resolution(72, "none") is None
    value, note = mpp_from_metadata({"openslide.mpp-x": "352.78"}, ("openslide.mpp-x",), None)
    assert value is None and "implausible" in note
    assert mpp_from_metadata({}, (), reader._tiff_resolution(72, "inch"))[0] is None  # 72 dpi default
