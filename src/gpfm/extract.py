"""Stage 2: coords (or image folders) -> features for one or more encoders.

DataLoader workers read each tile once into uint8 batches (pinned on GPU runs) while the main process runs the
previous batch; each encoder prepares the batch on the device with its own transform and runs under
`inference_mode` + autocast. Outputs are written atomically per slide (`<out>/<encoder>/<slide_id>.h5`), finished
ones are skipped, so a killed run loses at most the slide in flight. Under torchrun/SLURM each rank takes its
strided share of the sorted coords files (`gpfm.dist.shard`) and its own GPU; no process group is needed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpfm import dist
from gpfm.io import BatchReport, GpfmError, ensure_writable_dir, progress, write_h5

log = logging.getLogger("gpfm")
SUMMARY_COLUMNS = ["item", "status", "tiles", "encoders", "seconds", "tiles_per_s", "error", "path"]
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class SlideJob:
    slide_id: str
    coords_path: Path
    slide_path: Path
    n: int
    todo: list[str]  # encoder names whose output is missing
    coords: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 2), np.int64))
    attrs: dict = field(repr=False, default_factory=dict)


class TileBatches(torch.utils.data.Dataset):
    """Item k = one batch of consecutive tiles of one slide, read in a worker.

    Gives uint8 'images' (B, P, P, 3) for the device to prepare (GPU runs), or, with `transforms` (CPU runs, where
    the main process is the bottleneck), 'views': {transform: prepared float batch} made in the worker.
    """

    def __init__(self, jobs: Sequence[SlideJob], batch_size: int, transforms: Sequence[Any] = ()):
        self.jobs = list(jobs)
        self.transforms = list(dict.fromkeys(transforms))
        self.items = [(j, s, min(s + batch_size, job.n)) for j, job in enumerate(self.jobs)
                      for s in range(0, job.n, batch_size)]
        self._cur: tuple[int, Any, Any] | None = None  # (job, slide, coords) open in this worker

    def __len__(self) -> int:
        return len(self.items)

    def _open(self, j: int):
        from gpfm.slides.reader import open_slide
        from gpfm.slides.tiling import Coords

        if self._cur is None or self._cur[0] != j:
            if self._cur is not None:
                self._cur[1].close()
            job = self.jobs[j]
            self._cur = (j, open_slide(job.slide_path), Coords(coords=job.coords, attrs=job.attrs))
        return self._cur[1], self._cur[2]

    def __getitem__(self, k: int) -> dict[str, Any]:
        from gpfm.slides.tiling import read_tile

        j, start, stop = self.items[k]
        try:
            slide, coords = self._open(j)
            p = coords.patch_size
            images = np.empty((stop - start, p, p, 3), np.uint8)
            for i in range(start, stop):
                images[i - start] = read_tile(slide, coords, i)
            out = {"job": j, "start": start, "stop": stop, "error": ""}
            if self.transforms:
                x = torch.from_numpy(images)
                out["views"] = {t: t.prepare_uint8(x) for t in self.transforms}
            else:
                out["images"] = torch.from_numpy(images)
            return out
        except GpfmError as e:  # bad input (unreadable slide): reported per slide, the run goes on
            return {"job": j, "start": start, "stop": stop, "status": "skipped", "error": str(e)}
        except Exception as e:
            msg = f"{self.jobs[j].slide_path}: {type(e).__name__}: {' '.join(str(e).split())}"
            return {"job": j, "start": start, "stop": stop, "status": "failed", "error": msg}


# ------------------------------------------------------------------------------------------- helpers
def parse_encoders(names: Sequence[str]) -> dict[str, str]:
    """`--encoder` items `NAME` or `LABEL=NAME` -> {label: canonical encoder name}. The label names the output
    folder, so one architecture with different weights (e.g. two trained tiny-vits) can be extracted at once."""
    from gpfm.encoders import get_record

    out: dict[str, str] = {}
    for item in names:
        label, _, name = item.strip().rpartition("=")
        canon = get_record(name).name
        label = label or canon
        if label in out:
            raise GpfmError(f"--encoder: '{label}' is given twice; give each a label, e.g. a={name},b={name}")
        out[label] = canon
    return out


def parse_weights(spec: str | None, names: Sequence[str]) -> dict[str, str | None]:
    """--weights PATH (one encoder) or name=PATH,name=PATH -> {label: path or None} (labels from --encoder)."""
    from gpfm.encoders import get_record

    out: dict[str, str | None] = {n: None for n in names}
    if not spec:
        return out
    if "=" not in spec:
        if len(names) != 1:
            raise GpfmError(f"--weights {spec}: with {len(names)} encoders give name=PATH for each "
                            f"(e.g. {names[0]}=/path/a.safetensors,{names[1]}=/path/b.bin)")
        return {names[0]: spec}
    for part in spec.split(","):
        name, _, path = part.partition("=")
        key = name if name in out else get_record(name).name
        if key not in out:
            raise GpfmError(f"--weights {part}: {key} is not among --encoder {','.join(names)}")
        out[key] = path
    return out


def resolve_device(device: str | None) -> str:
    """cpu / cuda -> this rank's device (cuda:LOCAL_RANK under torchrun)."""
    from gpfm.encoders.registry import check_device

    device = check_device(device or "cpu")
    if device == "cuda" and dist.env().is_distributed:
        device = f"cuda:{dist.env().local_rank % torch.cuda.device_count()}"
    return device


def autocast_for(device: str, precision: str | None):
    """Autocast context for the precision (default: bf16 on GPU, fp32 on CPU)."""
    precision = precision or ("bf16" if device.startswith("cuda") else "fp32")
    if precision not in PRECISIONS:
        raise GpfmError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and not device.startswith("cuda"):
        raise GpfmError("--precision fp16 needs a GPU; on CPU use bf16 or fp32")
    return torch.autocast(device_type=device.split(":")[0], dtype=PRECISIONS[precision])


def load_encoders(names: Sequence[str], weights: str | None, device: str,
                  only: set[str] | None = None) -> dict[str, Any]:
    """{label: encoder} for `--encoder` items NAME or LABEL=NAME (see parse_encoders); with `only`, just the
    labels that still have outputs to write (a finished run loads no model)."""
    from gpfm.encoders import create_encoder

    labels = parse_encoders(names)
    paths = parse_weights(weights, list(labels))
    return {lb: create_encoder(n, weights=paths[lb], device=device) for lb, n in labels.items()
            if only is None or lb in only}


def _loader(dataset, workers: int, device: str, collate=None):
    import multiprocessing as mp

    workers = max(0, min(workers, len(dataset)))
    ctx = "fork" if workers and "fork" in mp.get_all_start_methods() else None
    return torch.utils.data.DataLoader(
        dataset, batch_size=None if collate is None else dataset.batch_size, shuffle=False, num_workers=workers,
        collate_fn=collate, pin_memory=device.startswith("cuda"), multiprocessing_context=ctx,
        prefetch_factor=4 if workers else None)


def _features_attrs(enc: Any, **extra: Any) -> dict[str, Any]:
    return {"encoder": enc.name, "dim": int(enc.dim), "weights_sha256": enc.weights_sha256, **extra}


# --------------------------------------------------------------------------------------------- slides
def plan_slides(coords_dir: Path, slides_dir: Path, names: Sequence[str], out: Path, overwrite: bool,
                report: BatchReport) -> list[SlideJob]:
    """This rank's slides with missing outputs; bad inputs and finished slides go to `report`."""
    from gpfm.slides.reader import SLIDE_EXTENSIONS
    from gpfm.slides.tiling import read_coords

    cdir = coords_dir / "coords" if (coords_dir / "coords").is_dir() else coords_dir
    files = sorted(cdir.glob("*.h5"))
    if not files:
        raise GpfmError(f"{cdir}: no coords files (*.h5); run `gpfm tile` first")
    if not slides_dir.is_dir():
        raise GpfmError(f"{slides_dir}: no such slides folder")
    index: dict[str, list[Path]] = {}
    for p in sorted(slides_dir.rglob("*")):
        if p.suffix.lower() in SLIDE_EXTENSIONS and p.is_file():
            index.setdefault(p.stem, []).append(p)
    jobs = []
    for cpath in dist.shard(files):  # shard the full sorted list: every rank agrees, no slide twice
        sid = cpath.stem
        todo = [n for n in names if overwrite or not (out / n / f"{sid}.h5").is_file()]
        if not todo:
            report.add(sid, "exists", encoders=";".join(names), path=str(cpath))
            continue
        try:
            c = read_coords(cpath)
            c.patch_size  # noqa: B018  (validates the attribute)
        except (GpfmError, KeyError, ValueError) as e:
            report.add(sid, "skipped", error=f"{cpath}: unusable coords file ({e})", path=str(cpath))
            continue
        found = index.get(sid, [])
        if len(found) != 1 and len(c.coords):  # a slide without tiles needs no pixels
            why = f"no slide file named {sid}.* in {slides_dir}" if not found else \
                f"{len(found)} slide files named {sid}.* ({', '.join(map(str, found[:3]))})"
            report.add(sid, "skipped", error=f"{cpath}: {why}; fix --slides", path=str(cpath))
            continue
        jobs.append(SlideJob(sid, cpath, found[0] if found else cpath, len(c.coords), todo, c.coords, c.attrs))
    return jobs


def extract_slides(coords_dir: str | Path, slides_dir: str | Path, encoders: Sequence[str], out: str | Path, *,
                   weights: str | None = None, batch_size: int = 64, workers: int = 2, precision: str | None = None,
                   device: str | None = None, overwrite: bool = False, quiet: bool = False) -> BatchReport:
    """Features of every tile of every (this rank's) slide for each encoder; returns the batch report."""
    out = ensure_writable_dir(out)
    device = resolve_device(device)
    amp = autocast_for(device, precision)
    report = BatchReport("extract")
    jobs = plan_slides(Path(coords_dir), Path(slides_dir), list(parse_encoders(encoders)), out, overwrite, report)
    models = load_encoders(encoders, weights, device, only={n for job in jobs for n in job.todo})
    for job in jobs:  # slides without tissue: (0, dim) features, nothing to read
        if job.n == 0:
            _write_slide(job, {n: [] for n in job.todo}, models, out)
            report.add(job.slide_id, "ok", tiles=0, encoders=";".join(job.todo), seconds=0.0, path=str(job.slide_path))
    jobs = [job for job in jobs if job.n]
    feats: dict[int, dict[str, list[torch.Tensor]]] = {}
    failed: set[int] = set()
    started: dict[int, float] = {}
    bar = progress(total=sum(job.n for job in jobs), desc=f"extract 0/{len(jobs)} slides", quiet=quiet, unit="tile")
    done = 0
    on_cpu = device == "cpu"  # CPU: workers prepare (the model's process is busy); GPU: prepare on the device
    dataset = TileBatches(jobs, batch_size, [m.transform for m in models.values()] if on_cpu else ())
    wait, t_loop = 0.0, time.perf_counter()
    with torch.inference_mode():
        t_next = time.perf_counter()
        for batch in _loader(dataset, workers, device):
            wait += time.perf_counter() - t_next if started else 0.0  # the first batch is start-up, not a stall
            j = batch["job"]
            job = jobs[j]
            started.setdefault(j, time.perf_counter())
            bar.update(batch["stop"] - batch["start"])
            if j in failed:
                continue
            if batch["error"]:
                failed.add(j)
                feats.pop(j, None)
                report.add(job.slide_id, batch["status"], error=batch["error"], path=str(job.slide_path),
                           encoders=";".join(job.todo))
                continue
            x = None if on_cpu else batch["images"].to(device, non_blocking=True)
            slot = feats.setdefault(j, {n: [] for n in job.todo})
            for name in job.todo:
                enc = models[name]
                prepared = batch["views"][enc.transform] if on_cpu else enc.transform.prepare_uint8(x)
                with amp:
                    slot[name].append(enc(prepared).float())
            if batch["stop"] == job.n:
                _write_slide(job, feats.pop(j), models, out)
                secs = time.perf_counter() - started[j]
                done += 1
                bar.set_description(f"extract {done}/{len(jobs)} slides")
                report.add(job.slide_id, "ok", tiles=job.n, encoders=";".join(job.todo), seconds=round(secs, 3),
                           tiles_per_s=round(job.n / max(secs, 1e-9), 1), path=str(job.slide_path))
            t_next = time.perf_counter()
    bar.close()
    report.data_wait = wait / max(time.perf_counter() - t_loop, 1e-9)  # share of the loop the model sat idle
    if jobs and report.data_wait > 0.05:
        log.info("extract: the model waited for tiles %.0f%% of the time; more --workers would help",
                 100 * report.data_wait)
    return report


def _write_slide(job: SlideJob, feats: dict[str, list[torch.Tensor]], models: dict[str, Any], out: Path) -> None:
    for name, parts in feats.items():
        enc = models[name]
        f = torch.cat(parts).cpu().numpy() if parts else np.zeros((0, enc.dim), np.float32)
        attrs = _features_attrs(enc, patch_size_level0=int(job.attrs.get("patch_size_level0", 0)),
                                target_mpp=job.attrs.get("target_mpp"), patch_size=int(job.attrs["patch_size"]),
                                slide=str(job.slide_path.name))
        write_h5(out / name / f"{job.slide_id}.h5", {"features": f.astype(np.float32), "coords": job.coords},
                 {"features": attrs})


# --------------------------------------------------------------------------------------------- images
def list_images(source: str | Path) -> list[tuple[Path, str, str, str]]:
    """(file, path as given, label, split) from a CSV (path,label[,split]) or a class-per-folder tree."""
    import csv

    from gpfm.slides.reader import IMAGE_EXTENSIONS

    source = Path(source)
    exts = IMAGE_EXTENSIONS | {".tif", ".tiff", ".webp"}
    if source.is_file() and source.suffix.lower() == ".csv":
        with open(source, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"path", "label"} <= set(rows[0]):
            raise GpfmError(f"{source}: an image list needs columns path,label[,split]; "
                            f"has {', '.join(rows[0]) if rows else 'no rows'}")
        return [(source.parent / r["path"], r["path"], r["label"], r.get("split") or "all") for r in rows]
    if not source.is_dir():
        raise GpfmError(f"{source}: no such image folder or CSV")
    tops = sorted(d for d in source.iterdir() if d.is_dir())
    splits = [(d, d.name) for d in tops] if tops and {d.name for d in tops} <= {"train", "val", "test"} \
        else [(source, "all")]
    items = []
    for root, split in splits:
        for cls in sorted(d for d in root.iterdir() if d.is_dir()):
            for p in sorted(cls.rglob("*")):
                if p.is_file() and p.suffix.lower() in exts:
                    items.append((p, p.relative_to(source).as_posix(), cls.name, split))
    if not items:
        raise GpfmError(f"{source}: no images found (expected <class>/<image> or <split>/<class>/<image>)")
    return items


class ImageItems(torch.utils.data.Dataset):
    """Image k resized by each distinct encoder geometry: {'k', 'views': {geometry: float (3,S,S)}} or error."""

    def __init__(self, items: Sequence[tuple], transforms: dict[str, Any], batch_size: int):
        self.items, self.transforms, self.batch_size = list(items), transforms, batch_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict[str, Any]:
        from PIL import Image

        try:
            with Image.open(self.items[k][0]) as im:
                rgb = np.array(im.convert("RGB"))
            x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div_(255.0)
            return {"k": k, "views": {g: t.resize(x)[0] for g, t in self.transforms.items()}}
        except Exception as e:
            return {"k": k, "error": f"{self.items[k][0]}: unreadable image ({type(e).__name__}: {e})"}


def _collate_images(samples: list[dict]) -> dict[str, Any]:
    ok = [s for s in samples if "views" in s]
    views = {g: torch.stack([s["views"][g] for s in ok]) for g in (ok[0]["views"] if ok else {})}
    return {"k": [s["k"] for s in ok], "views": views, "errors": [s for s in samples if "error" in s]}


def extract_images(source: str | Path, encoders: Sequence[str], out: str | Path, *, weights: str | None = None,
                   batch_size: int = 64, workers: int = 2, precision: str | None = None, device: str | None = None,
                   overwrite: bool = False, quiet: bool = False) -> BatchReport:
    """Features of an image set (ROI tasks): OUT/<encoder>/<split>.h5 with features, labels and paths."""
    out = ensure_writable_dir(out)
    report = BatchReport("extract")
    if not dist.env().is_main:  # one image set = one job; the other ranks have nothing to do
        return report
    items = list_images(source)
    splits = sorted({it[3] for it in items})
    device = resolve_device(device)
    amp = autocast_for(device, precision)
    labels = list(parse_encoders(encoders))
    todo = [n for n in labels if overwrite or not all((out / n / f"{s}.h5").is_file() for s in splits)]
    for n in set(labels) - set(todo):
        report.add(n, "exists", encoders=n, path=str(source))
    if not todo:
        return report
    models = load_encoders(encoders, weights, device, only=set(todo))
    geo = {n: (t.input_size, t.resize_size, t.crop, t.interpolation) for n, t in
           ((n, models[n].transform) for n in todo)}
    transforms = {g: models[n].transform for n, g in geo.items()}
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in todo}
    kept: list[int] = []
    t0 = time.perf_counter()
    bar = progress(total=len(items), desc="extract images", quiet=quiet, unit="img")
    with torch.inference_mode():
        for batch in _loader(ImageItems(items, transforms, batch_size), workers, device, _collate_images):
            for e in batch["errors"]:
                report.add(items[e["k"]][1], "skipped", error=e["error"], path=str(items[e["k"]][0]))
            bar.update(len(batch["k"]) + len(batch["errors"]))
            if not batch["k"]:
                continue
            kept += batch["k"]
            for n in todo:
                x = batch["views"][geo[n]].to(device, non_blocking=True)
                with amp:
                    feats[n].append(models[n](models[n].transform.normalize(x)).float().cpu())
    bar.close()
    kept_arr = np.asarray(kept, dtype=np.int64)
    split_of = np.asarray([items[k][3] for k in kept] + [None], dtype=object)[:-1]
    for n in todo:
        f = torch.cat(feats[n]).numpy() if feats[n] else np.zeros((0, models[n].dim), np.float32)
        for s in splits:
            sel = split_of == s
            idx = kept_arr[sel]
            write_h5(out / n / f"{s}.h5", {"features": f[sel],
                                          "labels": np.asarray([items[k][2] for k in idx], dtype=object),
                                          "paths": np.asarray([items[k][1] for k in idx], dtype=object)},
                     {"features": _features_attrs(models[n], source=str(source), split=s)})
        report.add(n, "ok", tiles=len(kept), encoders=n, seconds=round(time.perf_counter() - t0, 3),
                   path=str(source))
    return report


# ------------------------------------------------------------------------------------------------ CLI
def extract_command(args: Any) -> int:
    """`gpfm extract`: slides (--coords + --slides) or an image set (--images); writes extract_summary.csv."""
    names = [n for n in (args.encoder or "").split(",") if n.strip()]
    if not names:
        raise GpfmError("--encoder: give one or more encoder names (see `gpfm encoders`)")
    common = dict(weights=args.weights, batch_size=args.batch_size, workers=args.workers, precision=args.precision,
                  device=args.device, overwrite=args.overwrite, quiet=args.quiet)
    if args.images:
        report = extract_images(args.images, names, args.out, **common)
    elif args.coords and args.slides:
        report = extract_slides(args.coords, args.slides, names, args.out, **common)
    else:
        raise GpfmError("give --coords DIR and --slides DIR (slides), or --images FOLDER_OR_CSV (image sets)")
    summary = write_summary(Path(args.out), report)
    tiles = sum(int(r.get("tiles") or 0) for r in report.rows if r["status"] == "ok")
    print(f"{report.summary_line()}; {tiles} tiles; summary in {summary}")
    return report.exit_code


def write_summary(out: Path, report: BatchReport) -> Path:
    """extract_summary.csv; under torchrun each rank writes its part, the last rank to finish merges them."""
    d = dist.env()
    if not d.is_distributed:
        report.write(out / "extract_summary.csv", SUMMARY_COLUMNS)
        return out / "extract_summary.csv"
    import csv

    from gpfm.io import write_csv

    report.write(out / f"extract_summary.rank{d.rank}-of-{d.world_size}.csv", SUMMARY_COLUMNS)
    parts = [out / f"extract_summary.rank{r}-of-{d.world_size}.csv" for r in range(d.world_size)]
    if all(p.is_file() for p in parts):
        rows = []
        for p in parts:
            with open(p, newline="") as f:
                rows += list(csv.DictReader(f))
        write_csv(out / "extract_summary.csv", sorted(rows, key=lambda r: r["item"]), SUMMARY_COLUMNS)
        return out / "extract_summary.csv"
    return parts[d.rank]

