"""One `Slide` interface over OpenSlide (default), tiffslide (fallback) and plain images (one-level slides).

Every backend answers in the same terms: level-0 (x, y) locations, (h, w, 3) uint8 RGB arrays that are white
outside the slide, and a level-0 µm/px taken from the metadata (OpenSlide / tiffslide `mpp-x`, `aperio.MPP`, TIFF
resolution tags) unless the caller overrides it. A missing µm/px is an error that suggests `--mpp`, never a guess.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from gpfm.io import GpfmError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp"}
TIFF_EXTENSIONS = {".tif", ".tiff"}
SLIDE_EXTENSIONS = {".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".qptiff",
                    *TIFF_EXTENSIONS, *IMAGE_EXTENSIONS}
# A level may be used for a target µm/px when it is at most this much coarser (scanners say 0.2520 for "0.25").
MPP_TOLERANCE = 0.05
# Metadata values outside this range are not a microscope scan (72 dpi = 352.8 µm/px is a writer's default).
PLAUSIBLE_MPP = (0.01, 50.0)
# Pixels held at once when a whole level is read and reduced (strips of the level are read one by one).
READ_BUDGET_PX = 16_000_000


class Slide:
    """A whole-slide image. Subclasses implement `_read` for boxes that lie inside the level."""

    backend = "?"

    def __init__(self, path: Path, level_dimensions: list[tuple[int, int]], level_downsamples: list[float],
                 properties: dict[str, str], mpp: float | None, metadata_mpp: tuple[float | None, str]):
        self.path = path
        self.slide_id = path.stem
        self.level_dimensions = [(int(w), int(h)) for w, h in level_dimensions]
        self.level_downsamples = [float(d) for d in level_downsamples]
        self.properties = properties
        self._mpp_note = metadata_mpp[1]
        self.mpp_source = "override" if mpp is not None else metadata_mpp[1]
        self._mpp = _check_override(path, mpp) if mpp is not None else metadata_mpp[0]

    # ------------------------------------------------------------------------------------------- geometry
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def mpp_or_none(self) -> float | None:
        return self._mpp

    @property
    def mpp(self) -> float:
        """Level-0 µm/px; a GpfmError suggesting --mpp when the metadata has none and none was given."""
        if self._mpp is None:
            raise GpfmError(f"{self.path}: no µm/px in the slide's metadata ({self._mpp_note}); "
                            "pass --mpp X (or --mpp-csv with columns slide,mpp)")
        return self._mpp

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level whose µm/px is still <= target (within MPP_TOLERANCE); 0 when none is."""
        ok = [lv for lv in range(self.level_count) if self.level_mpp(lv) <= target_mpp * (1 + MPP_TOLERANCE)]
        return max(ok, key=lambda lv: self.level_downsamples[lv]) if ok else 0

    def best_level_for_downsample(self, downsample: float) -> int:
        ok = [lv for lv, d in enumerate(self.level_downsamples) if d <= downsample * (1 + MPP_TOLERANCE)]
        return max(ok, key=lambda lv: self.level_downsamples[lv]) if ok else 0

    # ---------------------------------------------------------------------------------------------- reads
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 RGB of `size` px at `level`, top-left at level-0 `location`; white outside the slide."""
        if not 0 <= level < self.level_count:
            raise GpfmError(f"{self.path}: level {level} does not exist (the slide has {self.level_count})")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise GpfmError(f"{self.path}: read size must be positive, got {size}")
        x0, y0 = int(location[0]), int(location[1])
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        # The box in level coordinates, clipped to the level; reads only the part that exists.
        lx, ly = math.floor(x0 / ds), math.floor(y0 / ds)
        cx0, cy0, cx1, cy1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
        if cx0 == lx and cy0 == ly and cx1 == lx + w and cy1 == ly + h:
            return self._safe_read((x0, y0), level, (w, h))
        out = np.full((h, w, 3), 255, np.uint8)
        if cx1 > cx0 and cy1 > cy0:
            loc = (x0 if cx0 == lx else round(cx0 * ds), y0 if cy0 == ly else round(cy0 * ds))
            out[cy0 - ly:cy1 - ly, cx0 - lx:cx1 - lx] = self._safe_read(loc, level, (cx1 - cx0, cy1 - cy0))
        return out

    def read_level(self, level: int, factor: int = 1) -> np.ndarray:
        """The whole `level`, block-averaged by an integer `factor`, read in strips so memory stays bounded."""
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        rows = max(factor, (READ_BUDGET_PX // max(lw, 1)) // factor * factor)
        strips = []
        for y in range(0, lh, rows):
            strip = self._safe_read((0, round(y * ds)), level, (lw, min(rows, lh - y)), as_image=True)
            strips.append(np.array(strip.reduce(factor) if factor > 1 else strip))
        return strips[0] if len(strips) == 1 else np.concatenate(strips, axis=0)

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """RGB thumbnail whose longer side is at most `max_size`, from the smallest level that is big enough."""
        from PIL import Image

        need = max(self.dimensions) / max_size
        level = self.best_level_for_downsample(max(need, 1.0))
        factor = max(1, int(need / self.level_downsamples[level]))
        img = Image.fromarray(self.read_level(level, factor))
        img.thumbnail((max_size, max_size), Image.Resampling.BILINEAR)
        return np.asarray(img)

    def _safe_read(self, location: tuple[int, int], level: int, size: tuple[int, int], as_image: bool = False):
        """Backend read of an in-bounds box as an RGB array (or PIL image), errors as one-line GpfmErrors."""
        from PIL import Image

        try:
            out = self._read(location, level, size)
        except GpfmError:
            raise
        except Exception as e:
            raise GpfmError(f"{self.path}: cannot read level {level} at {location} "
                            f"({type(e).__name__}: {_one_line(e)}); the file may be corrupt") from e
        if isinstance(out, Image.Image):
            return out if as_image else np.array(out)  # writable, unlike np.asarray of an image
        out = _to_rgb(out)
        return Image.fromarray(out) if as_image else out

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Any:
        """Pixels of an in-bounds box: an array (any layout `_to_rgb` takes) or an RGB PIL image."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- misc
    def close(self) -> None:
        pass

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Slide({str(self.path)!r}, backend={self.backend}, dimensions={self.dimensions}, "
                f"levels={self.level_count}, mpp={self._mpp})")


class _OpenSlide(Slide):
    backend = "openslide"

    def __init__(self, path: Path, mpp: float | None):
        import openslide

        self._os = openslide.OpenSlide(str(path))
        props = dict(self._os.properties)
        super().__init__(path, list(self._os.level_dimensions), list(self._os.level_downsamples), props, mpp,
                         mpp_from_metadata(props, ("openslide.mpp-x", "aperio.MPP"),
                                           _tiff_resolution(props.get("tiff.XResolution"),
                                                            props.get("tiff.ResolutionUnit"))))

    def _read(self, location, level, size):
        from PIL import Image

        img = self._os.read_region(location, level, size)
        if img.getchannel("A").getextrema()[0] < 255:  # transparent (not scanned): composite on white
            img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
        return img.convert("RGB")

    def close(self) -> None:
        self._os.close()


class _TiffSlide(Slide):
    backend = "tiffslide"

    def __init__(self, path: Path, mpp: float | None):
        import tiffslide

        self._ts = tiffslide.TiffSlide(str(path))
        try:
            self._ts.read_region((0, 0), 0, (1, 1), as_array=True)  # tiffslide opens files it cannot decode
        except Exception:
            self._ts.close()
            raise
        props = {k: str(v) for k, v in self._ts.properties.items() if v is not None}
        super().__init__(path, list(self._ts.level_dimensions), list(self._ts.level_downsamples), props, mpp,
                         mpp_from_metadata(props, ("tiffslide.mpp-x", "aperio.MPP"), None))

    def _read(self, location, level, size):
        return self._ts.read_region(location, level, size, as_array=True)

    def close(self) -> None:
        self._ts.close()


class _ImageSlide(Slide):
    """A plain image (PNG, JPEG, strip TIFF) held in memory as a one-level slide."""

    backend = "image"

    def __init__(self, path: Path, mpp: float | None):
        from PIL import Image

        with Image.open(path) as im:
            dpi = im.info.get("dpi")
            self._array = _to_rgb(np.asarray(im.convert("RGBA") if "A" in im.mode else im.convert("RGB")))
        h, w = self._array.shape[:2]
        res = _tiff_resolution(dpi[0], "inch") if dpi else None
        super().__init__(path, [(w, h)], [1.0], {}, mpp, mpp_from_metadata({}, (), res))

    def _read(self, location, level, size):
        x, y = location
        return self._array[y:y + size[1], x:x + size[0]].copy()  # never hand out the slide's own pixels

    def close(self) -> None:
        self._array = np.zeros((0, 0, 3), np.uint8)


# --------------------------------------------------------------------------------------------------- open
def open_slide(path: str | os.PathLike, mpp: float | None = None) -> Slide:
    """Open `path` with OpenSlide, else tiffslide, else as a plain image; GpfmError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise GpfmError(f"{path}: no such slide file")
    ext = path.suffix.lower()
    backends = [_ImageSlide] if ext in IMAGE_EXTENSIONS else [_OpenSlide, _TiffSlide]
    if ext in TIFF_EXTENSIONS:
        backends.append(_ImageSlide)
    reasons = []
    for backend in backends:
        try:
            return backend(path, mpp)
        except GpfmError:
            raise
        except Exception as e:
            reasons.append(f"{backend.backend}: {_one_line(e)}")
    raise GpfmError(f"{path}: cannot open as a slide ({'; '.join(reasons)}); "
                    "check the file, or convert it to a pyramidal TIFF")


def mpp_from_metadata(props: dict[str, str], keys: tuple[str, ...],
                      resolution: float | None) -> tuple[float | None, str]:
    """First plausible µm/px among property `keys`, then TIFF resolution; (value or None, where it came from)."""
    rejected = []
    candidates = [(k, props.get(k)) for k in keys] + [("TIFF resolution tags", resolution)]
    for key, raw in candidates:
        try:
            value = float(raw) if raw not in (None, "") else None
        except (TypeError, ValueError):
            value = None
        if value is None or not math.isfinite(value):
            continue
        if PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1]:
            return value, key
        rejected.append(f"ignored implausible {key} = {value:.4g} µm/px")
    return None, "; ".join(rejected) or "none of " + ", ".join([*keys, "TIFF resolution tags"]) + " is set"


def _tiff_resolution(xres: Any, unit: Any) -> float | None:
    """µm/px from a TIFF XResolution (px per unit) and ResolutionUnit ('centimeter'/'inch'); None otherwise."""
    try:
        xres = float(xres)
    except (TypeError, ValueError):
        return None
    per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(str(unit).lower())
    return per_unit / xres if per_unit and xres > 0 else None


def _check_override(path: Path, mpp: float) -> float:
    mpp = float(mpp)
    if not (math.isfinite(mpp) and mpp > 0):
        raise GpfmError(f"{path}: --mpp must be a positive number of µm per pixel, got {mpp}")
    return mpp


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """Any backend's pixels as C-contiguous (h, w, 3) uint8 RGB; alpha is composited on white."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        arr = (arr.astype(np.float32) * (255.0 / np.iinfo(arr.dtype).max)).round().astype(np.uint8) \
            if arr.dtype.kind in "ui" else np.clip(arr * 255.0, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] in (2, 4):  # gray+alpha or RGBA
        alpha = arr[..., -1:].astype(np.float32) / 255.0
        arr = (arr[..., :-1] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]
