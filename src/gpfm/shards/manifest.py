"""The packing plan (one global tile order, cut into fixed-size shards) and the manifest of a finished store.

The plan is a pure function of the inputs and settings, so any number of ranks can pack any subset of shards, a
rerun continues with exactly the shards that are missing, and a rerun at another world size still fits: shard i
always holds global tiles [i*S, (i+1)*S) and is packed by rank i % world_size.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gpfm.io import GpfmError, read_json, read_slide_ids, write_json

SHARD_PATTERN = "shard-{:06d}"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


@dataclass
class Entry:
    """One slide (tiles through its coords file) or one image (a single tile)."""

    slide_id: str
    path: str
    coords: str = ""
    n_tiles: int = 1
    source: str = "unknown"
    tissue: str = "unknown"


@dataclass
class Plan:
    entries: list[Entry]
    tiles_per_shard: int
    size: int
    target_mpp: float | None
    codec: str
    quality: int
    excluded: list[str] = field(default_factory=list)

    @property
    def total_tiles(self) -> int:
        return int(sum(e.n_tiles for e in self.entries))

    @property
    def n_shards(self) -> int:
        return math.ceil(self.total_tiles / self.tiles_per_shard)

    def shard_items(self, shard: int) -> list[tuple[int, int]]:
        """(entry index, tile index) of every tile in shard `shard`, in order."""
        starts = np.concatenate([[0], np.cumsum([e.n_tiles for e in self.entries])])
        lo, hi = shard * self.tiles_per_shard, min((shard + 1) * self.tiles_per_shard, self.total_tiles)
        g = np.arange(lo, hi)
        ent = np.searchsorted(starts, g, side="right") - 1
        return [(int(e), int(t)) for e, t in zip(ent, g - starts[ent])]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        d = dict(d)
        d["entries"] = [Entry(**e) for e in d["entries"]]
        return cls(**d)


def read_table(path: str | os.PathLike, columns: list[str], what: str) -> list[dict]:
    """Read a small CSV with required columns (the metadata table)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise GpfmError(f"{path}: {what} not found")
    df = pd.read_csv(path, dtype=str).fillna("")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise GpfmError(f"{path}: {what} needs column(s) {', '.join(missing)} (has: {', '.join(df.columns)})")
    return df.to_dict("records")


def build_plan(coords_dir: str | None, slides_dir: str | None, images_dir: str | None, *, tiles_per_shard: int,
               size: int, target_mpp: float | None, codec: str, quality: int, exclude: str | None = None,
               meta: str | None = None) -> tuple[Plan, list[dict]]:
    """List every tile to pack, in one deterministic order. Returns the plan and the slides that cannot be
    planned (coords without a slide), which the caller reports as skipped."""
    from gpfm.slides.tiling import read_coords

    excluded = read_slide_ids(exclude)
    info = {r["slide_id"]: r for r in read_table(meta, ["slide_id"], "metadata table")} if meta else {}
    entries: list[Entry] = []
    problems: list[dict] = []
    dropped: list[str] = []

    def keep(slide_id: str) -> bool:
        if slide_id in excluded:
            dropped.append(slide_id)
            return False
        return True

    if coords_dir:
        slides = _index_slides(slides_dir)
        for cpath in sorted(Path(coords_dir).glob("*.h5")):
            sid = cpath.stem
            if not keep(sid):
                continue
            if sid not in slides:
                problems.append({"item": sid, "status": "skipped",
                                 "error": f"{cpath}: no slide named {sid}.* in {slides_dir}; pass --slides"})
                continue
            n = len(read_coords(cpath).coords)
            if n:
                m = info.get(sid, {})
                entries.append(Entry(sid, str(slides[sid]), str(cpath), n, m.get("source") or "unknown",
                                     m.get("tissue") or "unknown"))
    if images_dir:
        root = Path(images_dir)
        for p in sorted(q for q in root.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES):
            sid = p.relative_to(root).with_suffix("").as_posix()
            if keep(sid):
                m = info.get(sid, {})
                entries.append(Entry(sid, str(p), "", 1, m.get("source") or "images", m.get("tissue") or "unknown"))
    plan = Plan(entries, tiles_per_shard, size, target_mpp, codec, quality, sorted(set(dropped)))
    return plan, problems


def _index_slides(slides_dir: str | None) -> dict[str, Path]:
    if not slides_dir:
        raise GpfmError("--coords needs --slides (the folder that holds the slide files)")
    out: dict[str, Path] = {}
    for p in sorted(Path(slides_dir).iterdir()):
        if p.is_file() and not p.name.endswith(".tmp"):
            out.setdefault(p.stem, p)
    return out


def check_plan(out: Path, plan: Plan) -> None:
    """A store folder belongs to one plan: refuse to mix shards of different inputs or settings."""
    path = out / "plan.json"
    if path.exists():
        old = read_json(path)
        if old != json.loads(json.dumps(plan.to_dict())):
            raise GpfmError(f"{path}: this folder holds shards packed from other inputs or settings; "
                            "use a new --out, or --overwrite to start again")
    else:
        write_json(path, plan.to_dict())


def shard_name(i: int) -> str:
    return SHARD_PATTERN.format(i)


def finished_shards(out: Path, plan: Plan) -> set[int]:
    """Shards whose tar file exists (it is renamed into place last, after its JSON record)."""
    return {i for i in range(plan.n_shards) if (out / f"{shard_name(i)}.tar").exists()}


def write_manifest(out: Path, plan: Plan) -> dict | None:
    """Gather the per-shard records into manifest.json once every shard is finished; else None."""
    if len(finished_shards(out, plan)) < plan.n_shards:
        return None
    shards, per_slide, per_source, per_tissue, skipped = [], Counter(), Counter(), Counter(), []
    for i in range(plan.n_shards):
        rec = read_json(out / f"{shard_name(i)}.json")
        shards.append({"name": f"{shard_name(i)}.tar", "tiles": rec["tiles"], "bytes": rec["bytes"]})
        per_slide.update(rec["per_slide"])
        per_source.update(rec["per_source"])
        per_tissue.update(rec["per_tissue"])
        skipped += rec["skipped"]
    manifest = {
        "format": "webdataset", "codec": plan.codec, "quality": plan.quality, "size": plan.size,
        "target_mpp": plan.target_mpp, "tiles": sum(s["tiles"] for s in shards), "shards": shards,
        "tiles_per_slide": dict(sorted(per_slide.items())), "tiles_per_source": dict(sorted(per_source.items())),
        "tiles_per_tissue": dict(sorted(per_tissue.items())), "excluded_slides": plan.excluded,
        "skipped": skipped,
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def load_manifest(root: str, check_files: bool = True) -> dict:
    """Read `<root>/manifest.json` (a folder or a URL prefix) and, for local stores, check that every shard it
    lists exists with the recorded size, so a stale manifest fails before training starts."""
    url = f"{root.rstrip('/')}/manifest.json"
    try:
        if _is_local(root):
            manifest = read_json(url)
        else:
            import webdataset as wds

            with wds.gopen(url) as f:
                manifest = json.loads(f.read())
    except FileNotFoundError as e:
        raise GpfmError(f"{url}: no manifest; pack the store first with `gpfm shards pack`") from e
    except (OSError, ValueError) as e:
        raise GpfmError(f"{url}: cannot read the manifest ({e})") from e
    if check_files and _is_local(root):
        for s in manifest["shards"]:
            p = Path(root) / s["name"]
            if not p.is_file():
                raise GpfmError(f"{p}: shard listed in the manifest is missing; re-run `gpfm shards pack`")
            if p.stat().st_size != s["bytes"]:
                raise GpfmError(f"{p}: {p.stat().st_size} bytes but the manifest records {s['bytes']}; "
                                "the shard was changed or truncated, re-pack it")
    return manifest


def _is_local(root: str) -> bool:
    return "://" not in root and not root.startswith("pipe:")
