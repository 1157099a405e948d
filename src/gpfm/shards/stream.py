"""`ShardStream`: stream a packed tile store into a training loop, at any scale, resumably.

- Every epoch the shard list is permuted with (seed, epoch); rank r takes every world_size-th shard of it and
  DataLoader worker w every num_workers-th of those, so ranks and workers read disjoint shards and, without
  sampling weights, every tile appears exactly once per epoch.
- A shuffle buffer (seeded per epoch, rank and worker) mixes tiles across the worker's shards; it is flushed at
  the end of each epoch.
- Optional sampling weights per source or tissue type: a tile is kept with probability w(group) / max(w), which
  evens out over-represented groups (down-sampling; nothing is duplicated).
- Infinite iteration (epoch after epoch) for step-based training, or one epoch.
- Resume: the stream is a pure function of (seed, rank, world size, workers), so the position is just the number
  of samples the rank consumed. On resume each worker skips its share without decoding images. If the world
  size, worker count or batch size changed, the exact position has no meaning in the new partition: the stream
  then starts at the beginning of the epoch after the one it stopped in (no tile of the new partition is
  repeated within an epoch) and logs a warning.
- Several stores can be streamed as one (a list of roots).
- Local folders and URL prefixes (http(s)://, pipe:, and the other schemes of webdataset's gopen) work alike.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from gpfm import dist
from gpfm.io import GpfmError
from gpfm.shards.manifest import load_manifest
from gpfm.shards.pack import CODECS, decode

log = logging.getLogger("gpfm.shards")
IMAGE_EXTS = tuple(ext for ext, _ in CODECS.values())


class ShardStream(IterableDataset):
    def __init__(self, root: str | list[str], *, seed: int = 0, shuffle_buffer: int = 1000,
                 weights: dict[str, float] | None = None, weight_by: str = "tissue",
                 transform: Callable | None = None, infinite: bool = True, rank: int | None = None,
                 world_size: int | None = None, check: bool = True) -> None:
        super().__init__()
        roots = [str(r).rstrip("/") for r in ([root] if isinstance(root, str | Path) else root)]
        manifests = [load_manifest(r, check_files=check) for r in roots]
        self.shards = [f"{r}/{s['name']}" for r, m in zip(roots, manifests) for s in m["shards"] if s["tiles"]]
        self.tiles_per_epoch = sum(int(m["tiles"]) for m in manifests)
        self.seed, self.shuffle_buffer, self.transform, self.infinite = seed, shuffle_buffer, transform, infinite
        if weight_by not in ("tissue", "source"):
            raise ValueError("weight_by must be 'tissue' or 'source'")
        self.weights, self.weight_by = weights, weight_by
        d = dist.env()
        self.rank = d.rank if rank is None else rank
        self.world_size = d.world_size if world_size is None else world_size
        self.start_epoch, self.consumed, self.batch_size, self.num_workers = 0, 0, 1, 0

    # ------------------------------------------------------------------------------------------ position
    def set_loader(self, batch_size: int, num_workers: int) -> None:
        """Tell the stream how the DataLoader batches it, so a position maps onto worker skips."""
        self.batch_size, self.num_workers = batch_size, num_workers

    def state(self, consumed: int) -> dict:
        """Checkpoint record after this rank consumed `consumed` samples."""
        return {"consumed": int(consumed), "start_epoch": self.start_epoch, "world_size": self.world_size,
                "num_workers": self.num_workers, "batch_size": self.batch_size, "seed": self.seed}

    def load_state(self, state: dict) -> None:
        same = all(state[k] == getattr(self, k) for k in ("world_size", "num_workers", "batch_size", "seed"))
        if same:
            self.start_epoch, self.consumed = state["start_epoch"], state["consumed"]
            return
        seen = state["consumed"] * state["world_size"]
        self.start_epoch = state["start_epoch"] + math.ceil(seen / max(self.tiles_per_epoch, 1))
        self.consumed = 0
        log.warning("shard stream: world size / workers / batch size changed (%s -> %s); resuming at the start "
                    "of epoch %d", {k: state[k] for k in ("world_size", "num_workers", "batch_size")},
                    {"world_size": self.world_size, "num_workers": self.num_workers,
                     "batch_size": self.batch_size}, self.start_epoch)

    def _skip(self, worker: int, n_workers: int) -> int:
        if n_workers <= 1:
            return self.consumed
        batches = self.consumed // self.batch_size
        return len(range(worker, batches, n_workers)) * self.batch_size

    # ------------------------------------------------------------------------------------------- stream
    def epoch_shards(self, epoch: int, worker: int = 0, n_workers: int = 1) -> list[str]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in perm[self.rank::self.world_size][worker::n_workers]]

    def _accept(self, rng: np.random.Generator, meta: dict) -> bool:
        if not self.weights:
            return True
        w = self.weights.get(meta.get(self.weight_by, "unknown"), 1.0)
        return bool(rng.random() < w / max(self.weights.values()))

    def raw(self, worker: int = 0, n_workers: int = 1) -> Iterator[dict]:
        """Undecoded samples (dicts with the image bytes and `meta`) in stream order."""
        import webdataset as wds

        epochs = itertools.count(self.start_epoch) if self.infinite else [self.start_epoch]
        for epoch in epochs:
            urls = [{"url": url} for url in self.epoch_shards(epoch, worker, n_workers)]
            if not urls:
                if self.infinite:
                    raise RuntimeError(f"rank {self.rank} worker {worker} has no shard: the store has "
                                       f"{len(self.shards)} shards for {self.world_size * n_workers} readers")
                return
            rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
            buf: list[dict] = []
            for s in wds.tarfile_samples(urls):
                s["meta"] = json.loads(s.pop("json"))
                if not self._accept(rng, s["meta"]):
                    continue
                if len(buf) < self.shuffle_buffer:
                    buf.append(s)
                    continue
                j = int(rng.integers(len(buf)))
                buf[j], s = s, buf[j]
                yield s
            for j in rng.permutation(len(buf)):
                yield buf[j]

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        skip = self._skip(worker, n_workers)
        for i, s in enumerate(self.raw(worker, n_workers)):
            if i < skip:
                continue
            img = decode(next(s[k] for k in IMAGE_EXTS if k in s))
            yield (self.transform(img) if self.transform else torch.from_numpy(img)), s["meta"]


class ShardTileStream:
    """The pretraining data plug-in (`data.source: shards`, see gpfm.pretrain.data.TileStream).

    The trainer's loader gives each DataLoader worker the steps s, s+W, s+2W, ... of its process. Step s is
    served from "virtual stream" s % W of this rank (its disjoint share of the shards), at position
    (s // W) * local_batch, so the tiles of a step depend only on (seed, step, rank, world size, W): a resumed
    run continues exactly, whichever worker serves which step. With another world size or worker count every
    stream continues at the same fraction of its epoch in the new partition (near that point a tile may be
    seen twice or not at all in that epoch).
    """

    def __init__(self, cfg) -> None:
        if not cfg.shards:
            raise GpfmError("data.source is 'shards' but data.shards lists no store (a folder or URL prefix)")
        self.cfg = cfg
        # the run's seed arrives with each worker plan
        self.stream = ShardStream(list(cfg.shards), shuffle_buffer=cfg.shuffle_buffer, weights=cfg.weights or None,
                                  weight_by=cfg.weight_by, infinite=True)

    def worker_tiles(self, plan) -> Iterator[tuple[int, np.ndarray, list[tuple[str, str]]]]:
        steps = plan.steps()
        if not len(steps):
            return
        self.stream.rank, self.stream.world_size = plan.rank, plan.world_size
        self.stream.seed = plan.seed
        virtual = steps[0] % plan.num_workers
        skip = (steps[0] // plan.num_workers) * plan.local_batch
        raw = self.stream.raw(virtual, plan.num_workers)
        for _ in range(skip):
            next(raw)
        for sample in plan.samples():
            s = next(raw)
            yield sample, decode(next(s[k] for k in IMAGE_EXTS if k in s)), []
