"""Tile grids at a target µm/px, the coords file (one writer, one reader), tile reads, and the `gpfm tile` batch.

A slide is tiled from its low-resolution segmentation view alone: the grid is laid in level-0 px, each tile's
tissue fraction is the exact area average of the mask over the tile (an integral image), and tiles whose fraction
reaches the threshold are kept. Coords files use TRIDENT's attribute names plus ours (DESIGN.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpfm import __version__
from gpfm.io import BatchReport, GpfmError, read_h5, write_h5
from gpfm.slides.reader import MPP_TOLERANCE, Slide, open_slide
from gpfm.slides.tissue import SegmentationView, TissueParams, read_segmentation_view, tissue_mask

log = logging.getLogger("gpfm")


@dataclass(frozen=True)
class TilingParams:
    """Grid settings: `patch_size` px at `target_mpp`, `overlap` px (at target) shared by neighbours."""

    target_mpp: float = 0.5
    patch_size: int = 256
    overlap: int = 0
    tissue_threshold: float = 0.5  # keep tiles whose tissue fraction >= this (and > 0)
    tissue: TissueParams = field(default_factory=TissueParams)

    def check(self) -> TilingParams:
        if not self.target_mpp > 0:
            raise GpfmError(f"--target-mpp must be positive, got {self.target_mpp}")
        if self.patch_size < 1:
            raise GpfmError(f"--patch-size must be at least 1 px, got {self.patch_size}")
        if not 0 <= self.overlap < self.patch_size:
            raise GpfmError(f"--overlap must be in [0, patch size {self.patch_size}), got {self.overlap}")
        if not 0 <= self.tissue_threshold <= 1:
            raise GpfmError(f"--tissue-threshold is a fraction in [0, 1], got {self.tissue_threshold}")
        return self


@dataclass
class Coords:
    """A coords file: `coords` int64 (N, 2) level-0 top-left corners and the attributes that explain them."""

    coords: np.ndarray
    attrs: dict[str, Any]

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def patch_size(self) -> int:
        return int(self.attrs["patch_size"])

    @property
    def patch_size_level0(self) -> int:
        return int(self.attrs["patch_size_level0"])

    @property
    def read_level(self) -> int | None:
        v = self.attrs.get("read_level")
        return None if v in (None, "none") else int(v)

    @property
    def target_mpp(self) -> float | None:
        v = self.attrs.get("target_mpp")
        return None if v in (None, "none") else float(v)

    @property
    def slide_id(self) -> str:
        return str(self.attrs.get("name", ""))


@dataclass
class TilingResult:
    coords: np.ndarray
    fractions: np.ndarray  # tissue fraction of each kept tile
    attrs: dict[str, Any]
    view: SegmentationView
    mask: np.ndarray


# ------------------------------------------------------------------------------------------------- tiling
def magnification(mpp: float) -> float:
    """Nominal objective magnification of a µm/px, with TRIDENT's bins (0.5 µm/px -> 20x)."""
    for limit, mag in ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5)):
        if mpp < limit:
            return mag
    return round(10.0 / mpp, 2)


def grid(width: int, height: int, size: int, step: int) -> np.ndarray:
    """Top-left corners (N, 2) int64 of `size` px tiles every `step` px covering width x height.

    Tiles at the right and bottom edges may extend past the slide (reads there are white), so tissue that
    touches the border is tiled too; the tissue fraction counts the part outside as glass.
    """
    xs = np.arange(0, max(width - size, 0) + step, step, dtype=np.int64)
    ys = np.arange(0, max(height - size, 0) + step, step, dtype=np.int64)
    xs, ys = xs[xs < width], ys[ys < height]
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def tissue_fractions(mask: np.ndarray, scale: tuple[float, float], coords: np.ndarray, size: int) -> np.ndarray:
    """Exact fraction of each level-0 box (coords, size) covered by `mask` (whose px is `scale` level-0 px).

    The integral image of a piecewise-constant mask is bilinear inside each cell, so interpolating it at the
    box corners gives the exact covered area, even for boxes a few mask pixels wide.
    """
    if len(coords) == 0:
        return np.zeros(0)
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1))
    sat[1:, 1:] = mask.cumsum(0, dtype=np.float64).cumsum(1)
    u0, v0 = coords[:, 0] / scale[0], coords[:, 1] / scale[1]
    u1, v1 = u0 + size / scale[0], v0 + size / scale[1]
    area = _integral(sat, u1, v1) - _integral(sat, u0, v1) - _integral(sat, u1, v0) + _integral(sat, u0, v0)
    return np.clip(area / ((size / scale[0]) * (size / scale[1])), 0.0, 1.0)


def _integral(sat: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    u, v = np.clip(u, 0, w), np.clip(v, 0, h)
    j, i = np.minimum(u.astype(np.int64), w - 1), np.minimum(v.astype(np.int64), h - 1)
    fu, fv = u - j, v - i
    return (sat[i, j] * (1 - fu) * (1 - fv) + sat[i, j + 1] * fu * (1 - fv)
            + sat[i + 1, j] * (1 - fu) * fv + sat[i + 1, j + 1] * fu * fv)


def tile_slide(slide: Slide, params: TilingParams = TilingParams()) -> TilingResult:
    """Segment `slide` on its low-resolution view and keep the grid tiles that lie on tissue."""
    params.check()
    mpp0 = slide.mpp
    if params.target_mpp * (1 + MPP_TOLERANCE) < mpp0:
        raise GpfmError(f"{slide.path}: target {params.target_mpp:g} µm/px is finer than the slide's native "
                        f"{mpp0:.4g} µm/px; choose --target-mpp {mpp0:.3g} or coarser")
    size0 = max(1, round(params.patch_size * params.target_mpp / mpp0))
    step0 = max(1, round((params.patch_size - params.overlap) * params.target_mpp / mpp0))
    view = read_segmentation_view(slide, params.tissue)
    mask = tissue_mask(view.rgb, view.mpp, params.tissue)
    candidates = grid(*slide.dimensions, size0, step0)
    frac = tissue_fractions(mask, view.scale, candidates, size0)
    keep = (frac >= params.tissue_threshold) & (frac > 0)
    attrs = {
        "patch_size": int(params.patch_size),
        "patch_size_level0": int(size0),
        "level0_magnification": magnification(mpp0),
        "target_magnification": magnification(params.target_mpp),
        "overlap": int(params.overlap),
        "level0_width": int(slide.dimensions[0]),
        "level0_height": int(slide.dimensions[1]),
        "name": slide.slide_id,
        "target_mpp": float(params.target_mpp),
        "level0_mpp": float(mpp0),
        "read_level": int(slide.best_level_for_mpp(params.target_mpp)),
        "tissue_threshold": float(params.tissue_threshold),
        "gpfm_version": __version__,
        "step_size_level0": int(step0),
        "tissue_fraction": float(mask.mean()) if mask.size else 0.0,
        "seg_level": int(view.level),
        "seg_mpp": float(view.mpp),
        "mpp_source": slide.mpp_source,
    }
    return TilingResult(coords=candidates[keep], fractions=frac[keep], attrs=attrs, view=view, mask=mask)


# ---------------------------------------------------------------------------------------------- coords files
def write_coords(path: str | Path, coords: np.ndarray, attrs: dict[str, Any]) -> None:
    """The one coords writer: dataset `coords` int64 (N, 2) with `attrs` on it, written atomically."""
    arr = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    write_h5(path, {"coords": arr}, {"coords": dict(attrs)})


def read_coords(path: str | Path) -> Coords:
    """Read a gpfm, TRIDENT or legacy CLAM (patch_level, patch_size, downsample) coords file."""
    path = Path(path)
    data, attrs = read_h5(path, ["coords"])
    coords, attrs = np.asarray(data["coords"], dtype=np.int64).reshape(-1, 2), dict(attrs["coords"])
    attrs.setdefault("name", path.stem)
    if "patch_size_level0" not in attrs:
        if "patch_size" not in attrs:
            raise GpfmError(f"{path}: coords have no patch_size attribute; re-tile with `gpfm tile`")
        level = int(attrs.get("patch_level", 0))
        ds = attrs.get("downsample")
        if ds is None and level != 0:
            raise GpfmError(f"{path}: CLAM coords at patch_level {level} without 'downsample'; "
                            "re-tile with `gpfm tile`")
        factor = float(np.atleast_1d(ds)[0]) if ds is not None else 1.0
        attrs["patch_size_level0"] = int(round(int(attrs["patch_size"]) * factor))
        attrs.setdefault("read_level", level)
    return Coords(coords=coords, attrs=attrs)


def read_tile(slide: Slide, coords: Coords, i: int) -> np.ndarray:
    """Tile `i` as the encoder should see it: (patch_size, patch_size, 3) uint8 RGB."""
    from PIL import Image

    ps, ps0 = coords.patch_size, coords.patch_size_level0
    level = coords.read_level
    if level is None or level >= slide.level_count:
        level = slide.best_level_for_downsample(ps0 / ps)
    box = max(1, round(ps0 / slide.level_downsamples[level]))
    x, y = (int(v) for v in coords.coords[i])
    tile = slide.read_region((x, y), level, (box, box))
    if box != ps:
        tile = np.asarray(Image.fromarray(tile).resize((ps, ps), Image.Resampling.BICUBIC))
    return tile


# ------------------------------------------------------------------------------------------------------ batch
SUMMARY_COLUMNS = ["slide", "status", "tiles", "tissue_fraction", "mpp", "seconds", "error", "path"]


def tile_one(path: Path, out: Path, params: TilingParams, mpp: float | None = None) -> dict[str, Any]:
    """Tile one slide into out/coords and out/thumbnails; a summary row (never raises for bad input)."""
    from gpfm.slides.thumbnails import render_thumbnail, write_png

    t0 = time.perf_counter()
    row: dict[str, Any] = {"slide": path.stem, "path": str(path)}
    try:
        with open_slide(path, mpp=mpp) as slide:
            res = tile_slide(slide, params)
            thumb = render_thumbnail(res.view.preview, res.mask, res.coords, res.attrs["patch_size_level0"],
                                     slide.dimensions)
        # Thumbnail first, coords last: a coords file that exists means the slide is complete.
        write_png(out / "thumbnails" / f"{path.stem}.png", thumb)
        write_coords(out / "coords" / f"{path.stem}.h5", res.coords, res.attrs)
        row.update(status="ok" if len(res.coords) else "no_tissue", tiles=len(res.coords),
                   tissue_fraction=res.attrs["tissue_fraction"], mpp=res.attrs["level0_mpp"])
        if not len(res.coords):
            row["error"] = f"{path}: no tissue found; wrote a coords file with 0 tiles (check the thumbnail)"
    except GpfmError as e:
        row.update(status="skipped", error=str(e))
    except Exception as e:  # a crash in one slide must not end the batch
        row.update(status="failed", error=f"{path}: {type(e).__name__}: {' '.join(str(e).split())}")
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def list_inputs(source: str | Path) -> list[tuple[Path, float | None]]:
    """Slides named by a file, a folder (its slide files; one .dcm per folder) or a CSV (`path`[, `mpp`])."""
    import csv

    from gpfm.slides.reader import SLIDE_EXTENSIONS

    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS)
        dicom = [p for p in files if p.suffix.lower() == ".dcm"]
        files = [p for p in files if p.suffix.lower() != ".dcm"] + dicom[:1]  # DICOM levels share one slide
        items = [(p, None) for p in sorted(files)]
    elif source.suffix.lower() == ".csv" and source.is_file():
        with open(source, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and "path" not in rows[0]:
            raise GpfmError(f"{source}: a slide list needs a 'path' column (optional 'mpp'); has {list(rows[0])}")
        items = [(source.parent / r["path"], _mpp_cell(source, r.get("mpp"))) for r in rows]
    elif source.is_file():
        items = [(source, None)]
    else:
        raise GpfmError(f"{source}: no such slide, folder or CSV")
    if not items:
        raise GpfmError(f"{source}: no slides found (looked for {', '.join(sorted(SLIDE_EXTENSIONS))})")
    return items


def read_mpp_csv(path: str | Path) -> dict[str, float]:
    """A µm/px override table with columns slide,mpp; `slide` is a slide id or a file name."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise GpfmError(f"{path}: no such --mpp-csv file")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"slide", "mpp"} <= set(rows[0]):
        raise GpfmError(f"{path}: --mpp-csv needs columns slide,mpp; has {list(rows[0])}")
    table = {}
    for r in rows:
        table[r["slide"]] = table[Path(r["slide"]).stem] = _mpp_cell(path, r["mpp"])
    return table


def _mpp_cell(path: Path, value: str | None) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError:
        raise GpfmError(f"{path}: mpp value {value!r} is not a number of µm per pixel") from None


def tile_batch(source: str | Path, out: str | Path, params: TilingParams = TilingParams(), workers: int = 4,
               mpp: float | None = None, mpp_csv: str | Path | None = None, overwrite: bool = False,
               quiet: bool = False) -> BatchReport:
    """Tile every slide of `source` (file, folder or CSV) into `out`; finished slides are skipped.

    µm/px per slide: the CSV's `mpp` column, else `mpp_csv`, else `mpp`, else the slide's metadata.
    Writes out/tiling_summary.csv and returns the report (its exit_code is 1 when anything was skipped).
    """
    from gpfm.io import ensure_writable_dir

    report = BatchReport("tile")
    params.check()
    items = list_inputs(source)
    overrides = read_mpp_csv(mpp_csv) if mpp_csv else {}
    out = Path(out)
    for d in (out, out / "coords", out / "thumbnails"):
        ensure_writable_dir(d)
    rows: dict[int, dict] = {}
    todo, seen = [], set()
    for k, (path, slide_mpp) in enumerate(items):
        sid = path.stem
        slide_mpp = slide_mpp if slide_mpp is not None else overrides.get(path.name, overrides.get(sid, mpp))
        if sid in seen:
            rows[k] = {"slide": sid, "path": str(path), "status": "skipped",
                       "error": f"{path}: slide id '{sid}' is used by another input; rename one of them"}
            continue
        seen.add(sid)
        done = None if overwrite else _finished_row(out / "coords" / f"{sid}.h5", path, params)
        if done:
            rows[k] = done
        else:
            todo.append((k, path, slide_mpp))
    for k, row in _run(todo, out, params, workers, quiet):
        rows[k] = row
    for k in sorted(rows):
        row = rows[k]
        report.add(row["slide"], row["status"], **{c: v for c, v in row.items() if c != "status"})
        if row["status"] == "no_tissue":
            log.warning("tile: %s", row["error"])
    report.write(out / "tiling_summary.csv", SUMMARY_COLUMNS)
    return report


def tile_command(args: Any) -> int:
    """`gpfm tile INPUT --out DIR ...`: the batch, then one summary line; exit code 1 when anything was skipped."""
    params = TilingParams(target_mpp=args.target_mpp, patch_size=args.patch_size, overlap=args.overlap,
                          tissue_threshold=args.tissue_threshold,
                          tissue=TissueParams(min_tissue_area_um2=args.min_tissue_area,
                                              min_hole_area_um2=args.min_hole_area))
    report = tile_batch(args.input, args.out, params, workers=args.workers, mpp=args.mpp, mpp_csv=args.mpp_csv,
                        overwrite=args.overwrite, quiet=args.quiet)
    tiles = sum(int(r.get("tiles") or 0) for r in report.rows)
    print(f"{report.summary_line()}; {tiles} tiles; summary in {Path(args.out) / 'tiling_summary.csv'}")
    return report.exit_code


def _finished_row(coords_path: Path, path: Path, params: TilingParams) -> dict[str, Any] | None:
    """The summary row of a slide tiled by an earlier run, or None when it must be (re)done."""
    if not coords_path.is_file():
        return None
    try:
        c = read_coords(coords_path)
    except GpfmError:
        return None
    row = {"slide": path.stem, "path": str(path), "status": "exists", "tiles": len(c),
           "tissue_fraction": c.attrs.get("tissue_fraction", ""), "mpp": c.attrs.get("level0_mpp", ""),
           "seconds": 0.0}
    was = (c.target_mpp, c.patch_size, int(c.attrs.get("overlap", 0)), c.attrs.get("tissue_threshold"))
    now = (params.target_mpp, params.patch_size, params.overlap, params.tissue_threshold)
    if was != now:
        row.update(status="skipped", error=f"{coords_path}: tiled before with (target_mpp, patch_size, overlap, "
                                           f"tissue_threshold) = {was}, not {now}; use --overwrite or another --out")
    return row


class _NoBar:
    def update(self) -> None:
        pass

    def close(self) -> None:
        pass


def _run(todo: list, out: Path, params: TilingParams, workers: int, quiet: bool):
    """Yield (index, row) as slides finish: inline for one worker, else in a process pool."""
    from gpfm.io import progress

    # No bar (nor its import) for a single slide: `gpfm tile one.svs` should start fast.
    bar = progress(total=len(todo), desc="tile", quiet=quiet, unit="slide") if len(todo) > 1 else _NoBar()
    try:
        if min(workers, len(todo)) <= 1:
            for k, path, mpp in todo:
                yield k, tile_one(path, out, params, mpp)
                bar.update()
            return
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from concurrent.futures.process import BrokenProcessPool

        import scipy.ndimage  # noqa: F401  (imported once here, inherited by every forked worker)

        # fork: workers inherit the imports (fast) and do not re-run the entry point.
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx)
        try:
            futures = {pool.submit(tile_one, path, out, params, mpp): (k, path) for k, path, mpp in todo}
            for fut in as_completed(futures):
                k, path = futures[fut]
                try:
                    yield k, fut.result()
                except BrokenProcessPool:
                    yield k, {"slide": path.stem, "path": str(path), "status": "failed",
                              "error": f"{path}: a worker process died (out of memory or a reader crash); "
                                       "re-run, or use --workers 1"}
                bar.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
