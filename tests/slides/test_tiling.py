"""Tiling: exact tissue fractions, tiles on tissue and not on glass (real slide), µm/px geometry, coords files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image

from gpfm.io import GpfmError
from gpfm.slides import open_slide
from gpfm.slides.tiling import (
    TilingParams,
    grid,
    read_coords,
    read_tile,
    tile_slide,
    tissue_fractions,
    write_coords,
)
from gpfm.slides.tissue import saturation

TRIDENT_ATTRS = {"patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
                 "level0_width", "level0_height", "name"}
OUR_ATTRS = {"target_mpp", "level0_mpp", "read_level", "tissue_threshold", "gpfm_version"}


def test_grid_covers_the_slide_edges():
    g = grid(1000, 600, 256, 256)
    assert g[:, 0].max() == 768 and g[:, 1].max() == 512 and len(g) == 4 * 3
    assert len(grid(1000, 600, 256, 128)) == 7 * 4
    assert grid(100, 100, 256, 256).tolist() == [[0, 0]]


def test_tissue_fractions_are_exact_area_averages():
    rng = np.random.default_rng(0)
    mask = rng.random((40, 50)) < 0.4
    coords = np.stack([rng.integers(0, 180, 300), rng.integers(0, 140, 300)], axis=1)
    # Integer scale: exactly the block mean of the up-sampled mask.
    up = np.repeat(np.repeat(mask, 4, 0), 4, 1)
    ref = [up[y:y + 20, x:x + 20].mean() for x, y in coords]
    assert np.allclose(tissue_fractions(mask, (4.0, 4.0), coords, 20), ref)
    # Non-integer scale and a box that leaves the mask: the part outside counts as no tissue.
    fine = np.repeat(np.repeat(mask, 37, 0), 37, 1)  # 3.7 level-0 px per mask px, sampled at 0.1 px
    got = tissue_fractions(mask, (3.7, 3.7), np.array([[17, 23], [170, 130]]), 30)
    ref = [np.pad(fine, ((0, 400), (0, 400)))[y * 10:(y + 30) * 10, x * 10:(x + 30) * 10].mean()
           for x, y in ((17, 23), (170, 130))]
    assert np.allclose(got, ref, atol=1e-9)


def test_cmu_tiles_lie_on_tissue_and_none_on_glass(shared_data):
    with open_slide(shared_data / "cmu_small_region.svs") as s:
        res = tile_slide(s, TilingParams(target_mpp=0.5, patch_size=256))
        c = res.coords
        assert 20 <= len(c) <= 60 and res.attrs["patch_size_level0"] == 257 and res.attrs["read_level"] == 0
        assert 0.2 < res.attrs["tissue_fraction"] < 0.6  # about half of the region is glass
        assert (res.fractions >= 0.5).all()
        # Every kept tile is mostly tissue in its own pixels; grid tiles the mask calls glass are glass.
        everything = grid(*s.dimensions, 257, 257)
        frac = tissue_fractions(res.mask, res.view.scale, everything, 257)
        kept = {tuple(p) for p in c.tolist()}

        def stained(x, y):
            t = s.read_region((int(x), int(y)), 0, (257, 257))
            return (saturation(t) > 40).mean()

        on_tissue = [stained(x, y) for x, y in c]
        assert min(on_tissue) > 0.3 and np.median(on_tissue) > 0.6
        glass = [p for p, f in zip(everything.tolist(), frac) if f == 0]
        assert len(glass) >= 30 and not kept & {tuple(p) for p in glass}
        on_glass = [stained(x, y) for x, y in glass]
        assert max(on_glass) < 0.1 and np.median(on_glass) < 0.01


def test_two_target_mpp_on_a_pyramid_scale_tile_counts(he_pyramid):
    with open_slide(he_pyramid) as s:
        fine = tile_slide(s, TilingParams(target_mpp=0.5, patch_size=128))
        coarse = tile_slide(s, TilingParams(target_mpp=1.0, patch_size=128))
        assert (fine.attrs["patch_size_level0"], fine.attrs["read_level"]) == (256, 1)
        assert (coarse.attrs["patch_size_level0"], coarse.attrs["read_level"]) == (512, 2)
        # The H&E box is 1024 x 1024 level-0 px: 4 x 4 tiles of 256 px, 2 x 2 of 512 px, all inside the box.
        assert len(fine.coords) == 16 and len(coarse.coords) == 4
        for r, size in ((fine, 256), (coarse, 512)):
            x, y = r.coords[:, 0], r.coords[:, 1]
            assert (x + size <= 1024).all() and (y >= 512).all() and (y + size <= 1536).all()
        overlapped = tile_slide(s, TilingParams(target_mpp=0.5, patch_size=128, overlap=64))
        assert overlapped.attrs["step_size_level0"] == 128 and len(overlapped.coords) > 3 * len(fine.coords)


def test_read_tile_reads_the_recorded_level_and_resizes(tmp_path, he_pyramid):
    with open_slide(he_pyramid) as s:
        res = tile_slide(s, TilingParams(target_mpp=0.5, patch_size=128))
        write_coords(tmp_path / "c.h5", res.coords, res.attrs)
        coords = read_coords(tmp_path / "c.h5")
        x, y = coords.coords[0]
        tile = read_tile(s, coords, 0)
        assert tile.shape == (128, 128, 3)
        assert np.array_equal(tile, s.read_region((int(x), int(y)), 1, (128, 128)))
        # A geometry without a level of its own (0.7 µm/px): read at level 1, resized.
        res = tile_slide(s, TilingParams(target_mpp=0.7, patch_size=100))
        write_coords(tmp_path / "d.h5", res.coords, res.attrs)
        coords = read_coords(tmp_path / "d.h5")
        assert (coords.patch_size_level0, coords.read_level) == (280, 1)
        x, y = coords.coords[0]
        ref = Image.fromarray(s.read_region((int(x), int(y)), 1, (140, 140))).resize((100, 100),
                                                                                     Image.Resampling.BICUBIC)
        assert np.array_equal(read_tile(s, coords, 0), np.asarray(ref))


def test_target_finer_than_native_is_refused(he_pyramid):
    with open_slide(he_pyramid) as s, pytest.raises(GpfmError, match=r"finer than the slide's native 0.25"):
        tile_slide(s, TilingParams(target_mpp=0.125))
    with open_slide(he_pyramid) as s:
        assert tile_slide(s, TilingParams(target_mpp=0.245, patch_size=64)).attrs["patch_size_level0"] == 63
    with pytest.raises(GpfmError, match="overlap"):
        TilingParams(patch_size=64, overlap=64).check()


def test_coords_file_attributes_empty_and_legacy(tmp_path, he_pyramid):
    with open_slide(he_pyramid) as s:
        res = tile_slide(s, TilingParams(target_mpp=0.5, patch_size=256))
    write_coords(tmp_path / "he.h5", res.coords, res.attrs)
    with h5py.File(tmp_path / "he.h5") as f:
        ds = f["coords"]
        assert ds.dtype == np.int64 and ds.shape == (len(res.coords), 2)
        assert TRIDENT_ATTRS | OUR_ATTRS <= set(ds.attrs)
        assert ds.attrs["level0_magnification"] == 40 and ds.attrs["target_magnification"] == 20
    c = read_coords(tmp_path / "he.h5")
    assert np.array_equal(c.coords, res.coords) and c.slide_id == "he_pyramid"
    assert (c.patch_size, c.patch_size_level0, c.read_level, c.target_mpp) == (256, 512, 1, 0.5)
    write_coords(tmp_path / "empty.h5", np.zeros((0, 2)), {**res.attrs, "name": "empty"})
    e = read_coords(tmp_path / "empty.h5")
    assert e.coords.shape == (0, 2) and e.coords.dtype == np.int64 and len(e) == 0
    with h5py.File(tmp_path / "clam.h5", "w") as f:  # CLAM create_patches_fp output
        ds = f.create_dataset("coords", data=np.array([[0, 0], [1024, 512]], np.int64))
        ds.attrs.update(patch_level=1, patch_size=256, downsample=np.array([2.0, 2.0]), name="clam")
    legacy = read_coords(tmp_path / "clam.h5")
    assert (legacy.patch_size, legacy.patch_size_level0, legacy.read_level, legacy.target_mpp) == (256, 512, 1, None)
    with open_slide(he_pyramid) as s:
        assert np.array_equal(read_tile(s, legacy, 1), s.read_region((1024, 512), 1, (256, 256)))
