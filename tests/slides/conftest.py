"""Fixtures for the slide tests: pyramidal TIFFs written with tifffile from real H&E pixels, and blank slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image


def write_pyramid(path: Path, rgb: np.ndarray, mpp: float | None, levels: int = 4, tile: int = 256,
                  compression: str = "zlib") -> Path:
    """A tiled generic TIFF that OpenSlide reads: one IFD per level (each half the previous), µm/px in the tags."""
    img = Image.fromarray(rgb)
    with tifffile.TiffWriter(path) as tw:
        for k in range(levels):
            extra = {"resolution": (1e4 / (mpp * 2**k),) * 2, "resolutionunit": "CENTIMETER"} if mpp else {}
            tw.write(np.asarray(img), tile=(tile, tile), compression=compression, photometric="rgb",
                     subfiletype=1 if k else 0, **extra)
            img = img.reduce(2)
    return path


@pytest.fixture(scope="session")
def he_rgb(shared_data) -> np.ndarray:
    return np.asarray(Image.open(shared_data / "he_target_tile.png").convert("RGB"))


@pytest.fixture(scope="session")
def he_pyramid(tmp_path_factory, he_rgb) -> Path:
    """2048 x 2048 px at 0.25 µm/px, 4 levels: real H&E in the box x 0-1024, y 512-1536 on white glass."""
    canvas = np.full((2048, 2048, 3), 245, np.uint8)
    canvas[512:1536, :1024] = np.asarray(Image.fromarray(he_rgb).resize((1024, 1024), Image.Resampling.BICUBIC))
    return write_pyramid(tmp_path_factory.mktemp("pyr") / "he_pyramid.tiff", canvas, mpp=0.25)


def blank_rgb(h: int = 1024, w: int = 1024, seed: int = 0) -> np.ndarray:
    """Empty glass: near-white with a little sensor noise."""
    rng = np.random.default_rng(seed)
    return np.clip(240 + rng.normal(0, 2, size=(h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def blank_slide(tmp_path) -> Path:
    return write_pyramid(tmp_path / "blank.tiff", blank_rgb(), mpp=0.5, levels=3)
