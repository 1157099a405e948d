"""`gpfm shards pack`: read every planned tile once, encode it, and write fixed-size WebDataset tar shards.

Each sample is `<key>.<jpg|png|webp>` + `<key>.json` (slide_id, source, tissue, x, y, tile index, level0_mpp,
mpp = the tile's µm/px, size; 0.0 where the µm/px is unknown, as for plain images). A shard is
written as `.tar.tmp`, its JSON record is written, then the tar is renamed into place: a finished shard is never
rewritten and a half-written one is never visible. Unreadable slides or tiles are skipped and listed (never a
fallback image: duplicates break KoLeo).
"""

from __future__ import annotations

import errno
import io
import json
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpfm import dist
from gpfm.io import BatchReport, GpfmError, ensure_writable_dir, progress, tmp_path, write_json
from gpfm.shards.manifest import Plan, build_plan, check_plan, finished_shards, shard_name, write_manifest

CODECS = {"jpeg": ("jpg", "JPEG"), "png": ("png", "PNG"), "webp": ("webp", "WEBP")}


@dataclass
class PackOptions:
    out: str
    coords: str | None = None
    slides: str | None = None
    images: str | None = None
    size: int = 512
    target_mpp: float | None = None
    codec: str = "jpeg"
    quality: int = 90
    tiles_per_shard: int = 2000
    exclude: str | None = None
    meta: str | None = None
    workers: int = 1
    overwrite: bool = False
    quiet: bool = False


def encode(tile: np.ndarray, codec: str, quality: int) -> bytes:
    """Encode an RGB uint8 tile; png and webp are lossless."""
    from PIL import Image

    if codec not in CODECS:
        raise GpfmError(f"unknown codec '{codec}' (choose {', '.join(CODECS)})")
    buf = io.BytesIO()
    kw = {"quality": quality} if codec == "jpeg" else ({"lossless": True} if codec == "webp" else {})
    Image.fromarray(tile).save(buf, format=CODECS[codec][1], **kw)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


def _read_tiles(entry, tile_ids: list[int], plan: Plan):
    """Yield (tile index, x, y, mpp, array or exception) for the planned tiles of one slide or image."""
    from PIL import Image

    if not entry.coords:  # a plain image: one tile, resized to the store's size
        try:
            with Image.open(entry.path) as im:
                arr = np.asarray(im.convert("RGB").resize((plan.size, plan.size), Image.BICUBIC))
            yield 0, 0, 0, None, arr
        except Exception as e:  # noqa: BLE001 - any decoder error means this image is skipped
            yield 0, 0, 0, None, e
        return
    from gpfm.slides.reader import open_slide
    from gpfm.slides.tiling import read_coords

    coords = read_coords(entry.coords).coords
    with open_slide(entry.path) as slide:
        mpp = slide.mpp_or_none
        if plan.target_mpp is not None and mpp is None:
            raise GpfmError(f"{entry.path}: no µm/px in the slide, needed for --target-mpp")
        if plan.target_mpp is None:
            level, box0 = 0, plan.size
        else:
            level = slide.best_level_for_mpp(plan.target_mpp)
            box0 = plan.size * plan.target_mpp / mpp
        down = slide.level_downsamples[level]
        box = max(1, round(box0 / down))
        for t in tile_ids:
            x, y = (int(v) for v in coords[t])
            try:
                arr = slide.read_region((x, y), level, (box, box))
                if box != plan.size:
                    arr = np.asarray(Image.fromarray(arr).resize((plan.size, plan.size), Image.BICUBIC))
                yield t, x, y, mpp, arr
            except Exception as e:  # noqa: BLE001 - a corrupt tile is skipped and listed
                yield t, x, y, mpp, e


def pack_shard(out: Path, plan: Plan, shard: int) -> dict:
    """Write one shard (tar + JSON record). Returns the record."""
    import webdataset as wds

    ext = CODECS[plan.codec][0]
    name = shard_name(shard)
    by_entry: dict[int, list[int]] = {}
    for e, t in plan.shard_items(shard):
        by_entry.setdefault(e, []).append(t)
    per_slide, per_source, per_tissue, skipped = Counter(), Counter(), Counter(), []
    tar = out / f"{name}.tar"
    tmp = tmp_path(tar)
    try:
        with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False) as w:
            for e, tiles in by_entry.items():
                entry = plan.entries[e]
                try:
                    for t, x, y, mpp, arr in _read_tiles(entry, tiles, plan):
                        if isinstance(arr, Exception):
                            skipped.append({"slide_id": entry.slide_id, "tile": t, "error": _why(arr)})
                            continue
                        meta = {"slide_id": entry.slide_id, "source": entry.source, "tissue": entry.tissue,
                                "x": x, "y": y, "tile": t, "level0_mpp": mpp or 0.0,
                                "mpp": plan.target_mpp or mpp or 0.0, "size": plan.size}
                        w.write({"__key__": f"{name}-{len(skipped) + sum(per_slide.values()):06d}",
                                 ext: encode(arr, plan.codec, plan.quality), "json": json.dumps(meta).encode()})
                        per_slide[entry.slide_id] += 1
                        per_source[entry.source] += 1
                        per_tissue[entry.tissue] += 1
                except (GpfmError, OSError) as err:
                    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                        raise
                    skipped.append({"slide_id": entry.slide_id, "tile": "all", "error": _why(err)})
        record = {"name": f"{name}.tar", "tiles": sum(per_slide.values()), "bytes": tmp.stat().st_size,
                  "per_slide": per_slide, "per_source": per_source, "per_tissue": per_tissue, "skipped": skipped}
        write_json(out / f"{name}.json", record)
        os.replace(tmp, tar)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise GpfmError(f"{tar}: disk full while writing; finished shards are intact, free space and re-run") \
                from err
        raise GpfmError(f"{tar}: cannot write ({err.strerror}); finished shards are intact") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return record


def _why(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def pack(opts: PackOptions) -> BatchReport:
    """Pack this rank's share of the missing shards; write the manifest when the store is complete."""
    if not (opts.coords or opts.images):
        raise GpfmError("nothing to pack: give --coords (with --slides) and/or --images")
    out = ensure_writable_dir(opts.out)
    plan, problems = build_plan(opts.coords, opts.slides, opts.images, tiles_per_shard=opts.tiles_per_shard,
                                size=opts.size, target_mpp=opts.target_mpp, codec=opts.codec,
                                quality=opts.quality, exclude=opts.exclude, meta=opts.meta)
    if opts.codec not in CODECS:
        raise GpfmError(f"unknown codec '{opts.codec}' (choose {', '.join(CODECS)})")
    if opts.overwrite and dist.env().is_main:
        for p in list(out.glob("shard-*")) + [out / "plan.json", out / "manifest.json"]:
            p.unlink(missing_ok=True)
    if opts.overwrite:
        dist.barrier()
    check_plan(out, plan)
    report = BatchReport("shards pack")
    for p in problems:
        report.add(**p)
    done = finished_shards(out, plan)
    todo = [i for i in dist.shard(range(plan.n_shards)) if i not in done]
    bar = progress(total=len(todo), desc="shards", quiet=opts.quiet, unit="shard")
    t0 = time.perf_counter()
    if opts.workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(opts.workers) as pool:
            for rec in pool.map(pack_shard, [out] * len(todo), [plan] * len(todo), todo):
                _record(report, rec)
                bar.update()
    else:
        for i in todo:
            _record(report, pack_shard(out, plan, i))
            bar.update()
    bar.close()
    tiles = sum(r.get("tiles", 0) for r in report.rows if r["status"] == "ok")
    report.rate = tiles / max(time.perf_counter() - t0, 1e-9)
    dist.barrier()
    report.manifest = write_manifest(out, plan) if dist.env().is_main or not dist.env().is_distributed else None
    report.write(out / "pack_summary.csv")
    return report


def _record(report: BatchReport, rec: dict) -> None:
    report.add(rec["name"], "ok", tiles=rec["tiles"], bytes=rec["bytes"])
    for s in rec["skipped"]:
        report.add(f"{s['slide_id']}#{s['tile']}", "skipped", error=s["error"], shard=rec["name"])


def pack_command(args) -> int:
    """CLI entry: pack, print the summary line, say where the manifest is."""
    opts = PackOptions(**{k: getattr(args, k) for k in PackOptions.__dataclass_fields__ if hasattr(args, k)})
    report = pack(opts)
    print(report.summary_line() + f" ({report.rate:.0f} tiles/s)")
    if report.manifest is not None:
        print(f"manifest: {Path(opts.out) / 'manifest.json'} ({report.manifest['tiles']} tiles in "
              f"{len(report.manifest['shards'])} shards)")
    else:
        print("store not complete yet (other ranks still packing); re-run to write the manifest")
    return report.exit_code
