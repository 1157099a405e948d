"""Per-slide PNG thumbnails with the tissue contour (green) and the kept tiles (blue), to check at a glance."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpfm.io import atomic_path

CONTOUR = (0, 200, 0)
TILE = (30, 60, 255)


def render_thumbnail(rgb: np.ndarray, mask: np.ndarray, coords: np.ndarray, patch_size_level0: int,
                     level0_size: tuple[int, int], max_size: int = 1024) -> np.ndarray:
    """Draw the mask's outline and each tile (level-0 `coords`, `patch_size_level0` px) on a slide image.

    `rgb` is any view of the whole slide (it is resized to fit `max_size`); `mask` covers the same extent.
    Tiles smaller than 5 px on the thumbnail are shown as a blue tint instead of outlines.
    """
    from PIL import Image, ImageDraw

    img = Image.fromarray(rgb)
    img.thumbnail((max_size, max_size), Image.Resampling.BILINEAR)
    w, h = img.size
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 0
    edge = _outline(m, thick=max(w, h) >= 512)
    out = np.array(img)
    out[edge] = CONTOUR
    sx, sy = w / level0_size[0], h / level0_size[1]
    span_x, span_y = max(patch_size_level0 * sx - 1, 0), max(patch_size_level0 * sy - 1, 0)
    boxes = [(x * sx, y * sy, x * sx + span_x, y * sy + span_y) for x, y in np.asarray(coords, np.float64)]
    if patch_size_level0 * min(sx, sy) >= 5:
        canvas = Image.fromarray(out)
        draw = ImageDraw.Draw(canvas)
        for box in boxes:
            draw.rectangle(box, outline=TILE)
        return np.asarray(canvas)
    cover = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(cover)
    for box in boxes:
        draw.rectangle(box, fill=255)
    tint = np.asarray(cover) > 0
    out[tint] = (0.6 * out[tint] + 0.4 * np.array(TILE)).astype(np.uint8)
    return out


def _outline(m: np.ndarray, thick: bool) -> np.ndarray:
    """Pixels of `m` with a 4-neighbour outside `m` (the image border counts as outside); 2 px when thick."""
    p = np.pad(m, 1)
    inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    edge = m & ~inner
    if thick:
        e = np.pad(edge, 1)
        edge = edge | e[:-2, 1:-1] | e[1:-1, :-2]
    return edge


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB array as PNG atomically (fast compression: thumbnails are many and small)."""
    from PIL import Image

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        Image.fromarray(rgb).save(f, format="PNG", compress_level=1)
