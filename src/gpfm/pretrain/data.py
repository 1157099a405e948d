"""Pretraining data: tiles from stage-1 coords + slides, or from image folders, as a deterministic stream of
augmented multi-crop batches (GPFM-METHOD.md §3, R6, R9).

Sample `i` of the run is the `i % B`-th image of step `i // B` (B = global batch). Which tile it is and how it
is augmented depend only on (seed, i), so the stream restarts exactly at any step, on any number of
processes and workers: the data position saved in a checkpoint is just the step.

Two plug-in kinds, registered by name with `register_source(name, factory)` (factory(DataConfig) -> source):
- `TileSource`: random access (`__len__`, `group_sizes`, `read(i)`, `describe(i)`); this module chooses the tiles
  (`SampleOrder`) and skips unreadable ones by a deterministic re-draw, never a fallback image.
- `TileStream`: sequential (tar shards: `data.source: shards`, gpfm.shards.stream): `worker_tiles(plan)` yields (sample index, tile, skipped) for
  exactly the samples of `plan.samples()`, in order.
"""

from __future__ import annotations

import csv
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from gpfm.io import GpfmError, read_slide_ids
from gpfm.pretrain.augment import CropsConfig, multi_crop
from gpfm.pretrain.masking import MaskingConfig, step_masks

log = logging.getLogger("gpfm.pretrain")

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
SLIDE_EXTS = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm"}


@dataclass
class DataConfig:
    source: str = "coords"  # coords | images | a registered source (e.g. shards)
    coords: list[str] = field(default_factory=list)  # coords .h5 files or folders (stage 1)
    slides: list[str] = field(default_factory=list)  # folders holding the slides, matched by slide_id
    mpp: float | None = None  # level-0 µm/px for slides that lack it
    images: list[str] = field(default_factory=list)  # image folders (one group per sub-folder) or CSVs (path col)
    shards: list[str] = field(default_factory=list)  # shard stores (folders or URL prefixes; `gpfm shards pack`)
    shuffle_buffer: int = 1000  # shards: tiles mixed across a worker's shards
    weights: dict[str, float] = field(default_factory=dict)  # shards: sampling weight per tissue (or source)
    weight_by: str = "tissue"  # shards: tissue | source
    exclude: str | None = None  # text/CSV file of slide ids to leave out (leakage control)
    sampling: str = "slide"  # slide: a random tile of a random slide | shuffle: every tile once per epoch
    batch_size: int = 64  # global batch, split evenly over processes
    num_workers: int = 4
    max_retries: int = 8  # unreadable tiles re-drawn per sample before the run stops

    def __post_init__(self) -> None:
        if self.sampling not in ("slide", "shuffle"):
            raise GpfmError(f"config key 'data.sampling': '{self.sampling}' is not one of slide, shuffle")


# ------------------------------------------------------------------------------------------ plug-in interfaces
@runtime_checkable
class TileSource(Protocol):
    """Random-access tiles, grouped (by slide) in index order: group g holds `group_sizes[g]` consecutive
    indices. `read` returns an (H, W, 3) uint8 RGB array and raises on an unreadable tile."""

    group_sizes: list[int]

    def __len__(self) -> int: ...

    def read(self, index: int) -> np.ndarray: ...

    def describe(self, index: int) -> str: ...


@dataclass(frozen=True)
class WorkerPlan:
    """The samples one DataLoader worker of one process serves: steps start+w, start+w+W, ... (W workers),
    and in each step this process's slice [rank*b, (rank+1)*b) of the global batch."""

    seed: int
    start_step: int
    end_step: int
    rank: int
    world_size: int
    worker: int
    num_workers: int
    global_batch: int

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world_size

    def steps(self) -> range:
        return range(self.start_step + self.worker, self.end_step, self.num_workers)

    def samples(self) -> Iterator[int]:
        b = self.local_batch
        for s in self.steps():
            base = s * self.global_batch + self.rank * b
            yield from range(base, base + b)


@runtime_checkable
class TileStream(Protocol):
    """Sequential tiles: yield (sample index, tile, [(tile description, reason) skipped]) for every sample of
    `plan.samples()`, in that order."""

    def worker_tiles(self, plan: WorkerPlan) -> Iterator[tuple[int, np.ndarray, list[tuple[str, str]]]]: ...


SOURCES: dict[str, Callable[[DataConfig], TileSource | TileStream]] = {}


def register_source(name: str, factory: Callable[[DataConfig], TileSource | TileStream]) -> None:
    SOURCES[name] = factory


def make_source(cfg: DataConfig) -> TileSource | TileStream:
    if cfg.source not in SOURCES:
        raise GpfmError(f"config key 'data.source': unknown '{cfg.source}' (known: {', '.join(sorted(SOURCES))})")
    return SOURCES[cfg.source](cfg)


# ------------------------------------------------------------------------------------------ sampling order
class SampleOrder:
    """Sample index -> tile index, a pure function of (seed, sample, attempt)."""

    def __init__(self, group_sizes: list[int], seed: int, mode: str = "slide"):
        sizes = np.asarray(group_sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.nonempty = np.flatnonzero(sizes > 0)
        self.sizes, self.seed, self.mode, self.total = sizes, seed, mode, int(sizes.sum())
        if self.total == 0:
            raise GpfmError("pretraining data has no tiles (all slides empty or excluded)")
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def tile(self, sample: int, attempt: int = 0) -> int:
        if self.mode == "shuffle" and attempt == 0:
            epoch, offset = divmod(sample, self.total)
            if epoch != self._perm_epoch:
                self._perm_epoch = epoch
                self._perm = np.random.default_rng([self.seed, 5, epoch]).permutation(self.total)
            return int(self._perm[offset])
        rng = np.random.default_rng([self.seed, 3, sample, attempt])
        if self.mode == "shuffle":
            return int(rng.integers(self.total))
        g = self.nonempty[rng.integers(len(self.nonempty))]
        return int(self.offsets[g] + rng.integers(self.sizes[g]))


class RandomAccessStream:
    """A TileStream over a TileSource: chooses tiles with SampleOrder, re-draws unreadable ones."""

    def __init__(self, source: TileSource, seed: int, mode: str, max_retries: int):
        self.source, self.max_retries = source, max_retries
        self.order = SampleOrder(list(source.group_sizes), seed, mode)

    def worker_tiles(self, plan: WorkerPlan) -> Iterator[tuple[int, np.ndarray, list[tuple[str, str]]]]:
        for sample in plan.samples():
            skipped: list[tuple[str, str]] = []
            for attempt in range(self.max_retries + 1):
                index = self.order.tile(sample, attempt)
                try:
                    tile = self.source.read(index)
                    if tile.ndim != 3 or tile.shape[2] != 3 or tile.dtype != np.uint8 or min(tile.shape[:2]) < 1:
                        raise ValueError(f"not an (H, W, 3) uint8 tile: {tile.shape} {tile.dtype}")
                except Exception as e:  # any reader failure: skip this tile, draw another (R9)
                    skipped.append((self.source.describe(index), f"{type(e).__name__}: {e}"[:300]))
                    continue
                yield sample, tile, skipped
                break
            else:
                last = skipped[-1]
                raise GpfmError(f"{len(skipped)} tiles in a row could not be read (last: {last[0]}: {last[1]}); "
                                "check the slides and coords files")


# ------------------------------------------------------------------------------------------ built-in sources
def _expand(paths: list[str], exts: set[str], what: str) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in exts and q.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise GpfmError(f"{p}: {what} not found")
    return out


class CoordsSource:
    """Tiles of stage-1 coords files, read from their slides with `gpfm.slides.tiling.read_tile`; one group
    per slide. Slides open lazily and stay open (a few per process)."""

    def __init__(self, cfg: DataConfig, max_open: int = 16):
        from gpfm.slides.tiling import read_coords

        excluded = read_slide_ids(cfg.exclude, "data.exclude")
        slides = {p.stem: p for p in _expand(cfg.slides, SLIDE_EXTS, "slide folder")}
        self.entries: list[tuple[Path, Any]] = []
        n_excluded, missing = 0, []
        for path in _expand(cfg.coords, {".h5"}, "coords file or folder"):
            coords = read_coords(path)
            sid = coords.slide_id or path.stem
            if sid in excluded:
                n_excluded += 1
                continue
            if sid not in slides:
                missing.append(sid)
                continue
            if len(coords.coords):
                self.entries.append((slides[sid], coords))
        for sid in missing:
            log.warning("pretrain data: no slide file for coords of '%s' in %s; skipped", sid, cfg.slides)
        if not self.entries:
            raise GpfmError(f"no usable coords in {cfg.coords} (slides {cfg.slides}; {len(missing)} without a "
                            f"slide file, {n_excluded} excluded)")
        self.group_sizes = [len(c.coords) for _, c in self.entries]
        self.offsets = np.concatenate([[0], np.cumsum(self.group_sizes)])
        self.mpp, self.max_open = cfg.mpp, max_open
        self._open: dict[int, Any] = {}
        log.info("pretrain data: %d tiles from %d slides (%d excluded, %d without slide file)",
                 self.offsets[-1], len(self.entries), n_excluded, len(missing))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        g = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return g, index - int(self.offsets[g])

    def read(self, index: int) -> np.ndarray:
        from gpfm.slides.reader import open_slide
        from gpfm.slides.tiling import read_tile

        g, i = self._locate(index)
        slide = self._open.get(g)
        if slide is None:
            if len(self._open) >= self.max_open:
                self._open.pop(next(iter(self._open))).close()
            slide = self._open[g] = open_slide(self.entries[g][0], mpp=self.mpp)
        return read_tile(slide, self.entries[g][1], i)

    def describe(self, index: int) -> str:
        g, i = self._locate(index)
        x, y = (int(v) for v in self.entries[g][1].coords[i])
        return f"{self.entries[g][0]} tile {i} at ({x}, {y})"

    def __getstate__(self) -> dict:  # open slide handles do not travel to workers
        return {**self.__dict__, "_open": {}}


class ImageSource:
    """Image files from folders (recursively; one group per parent folder, e.g. one per slide) or CSVs with a
    `path` column (relative to the CSV)."""

    def __init__(self, cfg: DataConfig):
        excluded = read_slide_ids(cfg.exclude, "data.exclude")
        files: list[Path] = []
        for raw in cfg.images:
            p = Path(raw)
            if p.is_file() and p.suffix.lower() == ".csv":
                with open(p, newline="") as f:
                    rows = list(csv.DictReader(f))
                if rows and "path" not in rows[0]:
                    raise GpfmError(f"{p}: needs a 'path' column")
                files.extend(p.parent / r["path"] for r in rows)
            else:
                files.extend(_expand([raw], IMAGE_EXTS, "image folder"))
        files = [f for f in files if f.parent.name not in excluded]
        if not files:
            raise GpfmError(f"no images found in {cfg.images}")
        groups: dict[Path, list[Path]] = {}
        for f in files:
            groups.setdefault(f.parent, []).append(f)
        self.files = [f for d in sorted(groups) for f in groups[d]]
        self.group_sizes = [len(groups[d]) for d in sorted(groups)]
        log.info("pretrain data: %d images in %d folders", len(self.files), len(groups))

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> np.ndarray:
        from PIL import Image

        with Image.open(self.files[index]) as im:
            return np.asarray(im.convert("RGB"))

    def describe(self, index: int) -> str:
        return str(self.files[index])


def _shard_source(cfg: DataConfig) -> TileStream:
    from gpfm.shards.stream import ShardTileStream

    return ShardTileStream(cfg)


register_source("coords", CoordsSource)
register_source("images", ImageSource)
register_source("shards", _shard_source)


# ------------------------------------------------------------------------------------------ batches
class _Stream(torch.utils.data.IterableDataset):
    """Augmented samples of this process, step by step, split over DataLoader workers by step."""

    def __init__(self, stream: TileStream, plan: WorkerPlan, crops: CropsConfig, expert_sizes: tuple[int, ...],
                 expert_colour: bool):
        super().__init__()
        self.stream, self.plan, self.crops = stream, plan, crops
        self.expert_sizes, self.expert_colour = expert_sizes, expert_colour

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        plan = self.plan
        if info is not None:
            plan = WorkerPlan(**{**plan.__dict__, "worker": info.id, "num_workers": info.num_workers})
        for sample, tile, skipped in self.stream.worker_tiles(plan):
            rng = random.Random((plan.seed << 40) + sample)
            views = multi_crop(tile, rng, self.crops, self.expert_sizes, self.expert_colour)
            yield {"sample": sample, **views, "skipped": skipped}


class Collate:
    """Stacks one step's samples crop-major ((crop 0: all images), (crop 1: ...)) and adds its iBOT masks."""

    def __init__(self, seed: int, global_batch: int, grid: tuple[int, int], masking: MaskingConfig | None):
        self.seed, self.global_batch, self.grid, self.masking = seed, global_batch, grid, masking

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        samples = [it["sample"] for it in items]
        step = samples[0] // self.global_batch
        if any(s // self.global_batch != step for s in samples):
            raise RuntimeError("a batch mixes samples of different steps")
        out: dict[str, Any] = {"step": step, "samples": samples,
                               "skipped": [s for it in items for s in it["skipped"]]}
        out["global"] = torch.stack([it["global"] for it in items], 1).flatten(0, 1)
        out["local"] = torch.stack([it["local"] for it in items], 1).flatten(0, 1)
        out["experts"] = {k: torch.stack([it["experts"][k] for it in items], 1).flatten(0, 1)
                          for k in items[0]["experts"]}
        if self.masking is not None:
            pos = np.asarray(samples) % self.global_batch
            ids = np.concatenate([c * self.global_batch + pos for c in (0, 1)])
            out["masks"] = torch.from_numpy(step_masks(self.seed, step, 2 * self.global_batch, ids, self.grid,
                                                       self.masking))
        return out


def make_loader(stream: TileSource | TileStream, cfg: DataConfig, crops: CropsConfig, seed: int,
                start_step: int, end_step: int, rank: int, world_size: int, grid: tuple[int, int],
                masking: MaskingConfig | None, expert_sizes: tuple[int, ...] = (),
                expert_colour: bool = True, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Batches of steps start_step .. end_step - 1 for this process (see module docstring)."""
    if cfg.batch_size % world_size:
        raise GpfmError(f"data.batch_size {cfg.batch_size} is not divisible by the {world_size} processes")
    if isinstance(stream, TileSource):
        stream = RandomAccessStream(stream, seed, cfg.sampling, cfg.max_retries)
    plan = WorkerPlan(seed, start_step, end_step, rank, world_size, 0, 1, cfg.batch_size)
    ds = _Stream(stream, plan, crops, tuple(expert_sizes), expert_colour)
    workers = max(0, min(cfg.num_workers, end_step - start_step))
    return torch.utils.data.DataLoader(
        ds, batch_size=plan.local_batch, collate_fn=Collate(seed, cfg.batch_size, grid, masking),
        num_workers=workers, prefetch_factor=2 if workers else None, pin_memory=pin_memory)
