"""Pretraining data throughput: tiles from WebDataset shards against random reads through coords from slides.

Builds (once, cached in bench/.cache/shards) a cohort of JPEG-tiled pyramidal slides from the real H&E tile in
../shared/data, tiles it at level 0 in 512 px tiles (the paper's geometry), packs it into shards, then measures in
the same run:
  - packing throughput (tiles/s) and bytes per tile for JPEG q90 and for lossless PNG / WebP;
  - tiles/s delivered to the training loop by the pretraining loader (decoded and multi-crop augmented with the
    GPFM crop recipe: 2 x 224 + 8 x 98), with 1 and 2 workers, from shards vs from slides;
  - tiles/s of the bare readers (decoded, not augmented), which is where the two paths differ.
Slides are sampled as in pretraining (a random tile of a random slide), each reader keeping at most 16 slides
open, so most reads open a slide, as they do when a cluster reads tens of thousands of slides.

Usage: .venv/bin/python bench/shards.py [--slides 48] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache" / "shards"
DATA = ROOT.parent / "shared" / "data"
MPP = 0.25  # 40x, as most of GPFM's slides


def build_slides(n: int, side: int) -> Path:
    out = CACHE / f"slides_{n}_{side}"
    if out.exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src = np.asarray(Image.open(DATA / "he_target_tile.png").convert("RGB"))
    rng = np.random.default_rng(0)
    for i in range(n):
        reps = -(-side // src.shape[0])
        blocks = [[np.rot90(src, int(rng.integers(4))) for _ in range(reps)] for _ in range(reps)]
        img = np.concatenate([np.concatenate(r, 1) for r in blocks], 0)[:side, :side].copy()
        res = (1e4 / MPP, 1e4 / MPP)
        with tifffile.TiffWriter(tmp / f"slide{i:03d}.tiff", bigtiff=False) as w:
            for k, d in enumerate((1, 4, 16)):
                lvl = img[::d, ::d].copy() if d > 1 else img
                w.write(lvl, tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": 85},
                        subfiletype=0 if k == 0 else 1, resolution=(res[0] / d, res[1] / d),
                        resolutionunit="CENTIMETER")
    tmp.rename(out)
    return out


def tile(slides: Path) -> Path:
    from gpfm.slides.tiling import TilingParams, tile_batch

    out = slides.with_name(slides.name + "_tiles")
    tile_batch(slides, out, TilingParams(target_mpp=MPP, patch_size=512), workers=2, quiet=True)
    return out


def pack_store(tiles: Path, slides: Path, codec: str, quality: int = 90) -> tuple[Path, float]:
    from gpfm.shards.pack import PackOptions, pack

    out = CACHE / f"store_{codec}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    report = pack(PackOptions(out=str(out), coords=str(tiles / "coords"), slides=str(slides), size=512,
                              codec=codec, quality=quality, tiles_per_shard=256, workers=1, quiet=True))
    tiles_done = report.manifest["tiles"]
    return out, tiles_done / (time.perf_counter() - t0)


def store_bytes_per_tile(store: Path) -> float:
    m = json.loads((store / "manifest.json").read_text())
    return sum(s["bytes"] for s in m["shards"]) / m["tiles"]


def data_config(source: str, tiles: Path, slides: Path, store: Path, workers: int, batch: int):
    from gpfm.pretrain.data import DataConfig

    return DataConfig(source=source, coords=[str(tiles / "coords")], slides=[str(slides)],
                      shards=[str(store)], batch_size=batch, num_workers=workers)


def delivered(cfg, steps: int) -> float:
    """Tiles/s out of the pretraining loader (decoded + GPFM multi-crop augmentation)."""
    from gpfm.pretrain.augment import CropsConfig
    from gpfm.pretrain.data import make_loader, make_source

    source = make_source(cfg)
    loader = make_loader(source, cfg, CropsConfig(), seed=0, start_step=0, end_step=steps + 1, rank=0,
                         world_size=1, grid=(16, 16), masking=None)
    it = iter(loader)
    next(it)  # start-up (worker spawn, first slide opens) is not throughput
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def bare(cfg, n: int) -> float:
    """Tiles/s of the reader alone in one process (decoded tiles, no augmentation)."""
    from gpfm.pretrain.data import RandomAccessStream, TileSource, WorkerPlan, make_source

    source = make_source(cfg)
    stream = RandomAccessStream(source, 0, "slide", 8) if isinstance(source, TileSource) else source
    plan = WorkerPlan(0, 0, n // cfg.batch_size + 2, 0, 1, 0, 1, cfg.batch_size)
    it = stream.worker_tiles(plan)
    for _ in range(cfg.batch_size):
        next(it)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=48)
    ap.add_argument("--side", type=int, default=3072)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    if not (DATA / "he_target_tile.png").is_file():
        print(f"reference data not found in {DATA}")
        return 2
    torch.set_num_threads(1)
    slides = build_slides(a.slides, a.side)
    tiles = tile(slides)
    rows, res = [], {}
    stores = {}
    for codec in ("jpeg", "png", "webp"):
        store, rate = pack_store(tiles, slides, codec)
        stores[codec] = store
        res[f"pack_{codec}_tiles_per_s"] = rate
        res[f"{codec}_bytes_per_tile"] = store_bytes_per_tile(store)
        rows.append((f"pack {codec}{' q90' if codec == 'jpeg' else ' (lossless)'}", f"{rate:.1f} tiles/s",
                     f"{res[f'{codec}_bytes_per_tile'] / 1024:.1f} KiB/tile"))
    store = stores["jpeg"]
    for workers in (1, 2):
        s = delivered(data_config("coords", tiles, slides, store, workers, a.batch), a.steps)
        h = delivered(data_config("shards", tiles, slides, store, workers, a.batch), a.steps)
        res[f"delivered_w{workers}"] = {"slides": s, "shards": h, "ratio": h / s}
        rows.append((f"delivered, {workers} worker(s), augmented", f"slides {s:.1f} / shards {h:.1f} tiles/s",
                     f"ratio {h / s:.2f}x"))
    n = 8 * a.batch
    s = bare(data_config("coords", tiles, slides, store, 0, a.batch), n)
    h = bare(data_config("shards", tiles, slides, store, 0, a.batch), n)
    res["bare_reader"] = {"slides": s, "shards": h, "ratio": h / s}
    rows.append(("bare reader, decoded only", f"slides {s:.1f} / shards {h:.1f} tiles/s", f"ratio {h / s:.2f}x"))
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'throughput':<40} figure")
    for r in rows:
        print(f"{r[0]:<{width}}  {r[1]:<40} {r[2]}")
    print("target: shards / slides >= 3x for tiles delivered to the training loop")
    out = ROOT / "bench" / "results" / "shards.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
