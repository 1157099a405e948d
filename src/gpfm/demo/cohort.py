"""The demo cohort: a small synthetic H&E cohort with hidden variables that every later stage must learn.

`make_cohort(out_dir, seed)` writes (contracts.md, "Demo cohort"):

    slides/<slide_id>.tiff|.svs   pyramidal tiled JPEG TIFFs, level 0 at 0.5 µm/px, downsamples 1, 4, 16
    labels/wsi_classification.csv  slide_id, case_id, label          (benign | ductal | lobular)
    labels/survival.csv            slide_id, case_id, time, event    (months; event 1 = observed, 0 = censored)
    labels/reports.csv             slide_id, case_id, report
    labels/wsi_vqa.csv             slide_id, case_id, question, answer, choices ("a|b|c")
    roi/images/<class>/<name>.png  tiles (normal | ductal | lobular) + roi/roi.csv (path, label, split, grade)
    roi/vqa.csv                    path, question, answer            (PathVQA-style)
    roi/captions.csv               path, caption                     (PatchGastric-style)
    cohort.json                    seed, parameters and every hidden variable per patient and slide

Hidden variables are per patient (a patient's two slides share them): label (visible only in tumour regions,
so a multiple-instance problem), grade (visible in the stroma everywhere, see render.py), survival time and
event (exponential hazard rising with grade; administrative censoring of a fixed share at the end of follow-up).
The folder is built under `<out_dir>.partial` and renamed into place, so a cohort folder that exists is complete;
calling again with the same parameters returns at once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from itertools import repeat
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from gpfm.demo import text
from gpfm.demo.render import GRADES, LABELS, MASK_DS, render_slide
from gpfm.io import GpfmError, atomic_path, progress, read_json, write_csv, write_json

GENERATOR_VERSION = 2  # bump when the rendering changes, so cached cohorts are rebuilt
MPP = 0.5
DOWNSAMPLES = (1, 4, 16)
ROI_CLASSES = ("normal", "ductal", "lobular")
_PARTIAL_MARK = ".gpfm-demo-partial"


@dataclass(frozen=True)
class CohortParams:
    """Everything that decides the cohort's content (the worker count does not)."""

    seed: int = 0
    n_patients: int = 40
    two_slide_fraction: float = 0.25  # share of patients with a second slide
    slide_size: tuple[int, int] = (2048, 3072)  # level-0 side range in px (rounded to 16)
    svs_every: int = 5  # every n-th slide is written Aperio SVS-style, the others generic TIFF
    jpeg_quality: int = 70
    roi_per_slide: int = 6  # tumour tiles per tumour slide (half as many normal ones); benign: normal tiles
    roi_fov: int = 224  # level-0 px per ROI tile side (112 µm) ...
    roi_size: int = 224  # ... saved at this size: 224 px at 0.5 µm/px, what tiny-vit reads from a slide tile
    roi_split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train/val/test share of patients, by label
    base_hazard: float = 1 / 60  # per month, grade 1
    log_hazard_ratio: float = 1.2  # per grade step
    censored_fraction: float = 0.3

    def check(self) -> CohortParams:
        """GpfmError naming every parameter out of range."""
        bad = [name for name, ok in (
            ("n_patients >= 3", self.n_patients >= 3),
            ("0 <= two_slide_fraction <= 1", 0 <= self.two_slide_fraction <= 1),
            ("512 <= slide_size[0] <= slide_size[1]", 512 <= self.slide_size[0] <= self.slide_size[1]),
            ("svs_every >= 1", self.svs_every >= 1),
            ("roi_fov a multiple of 8, >= 64", self.roi_fov >= 64 and self.roi_fov % MASK_DS == 0),
            ("0 < roi_size <= roi_fov", 0 < self.roi_size <= self.roi_fov),
            ("0 <= censored_fraction < 1", 0 <= self.censored_fraction < 1),
            ("base_hazard > 0", self.base_hazard > 0)) if not ok]
        if bad:
            raise GpfmError(f"make_cohort: parameters out of range, need {'; '.join(bad)}")
        return self


def make_cohort(out_dir: str | os.PathLike, seed: int = 0, n_patients: int = 40, *, workers: int = 2,
                overwrite: bool = False, quiet: bool = False, **params) -> dict:
    """Generate the demo cohort under `out_dir` (see the module docstring) and return its cohort.json content.

    Deterministic for a given seed and parameters (`CohortParams`), whatever `workers`. An existing cohort with
    the same parameters is reused; one with other parameters is an error unless `overwrite`.
    """
    try:
        p = CohortParams(seed=seed, n_patients=n_patients, **params)
    except TypeError as e:
        raise GpfmError(f"make_cohort: {e}; valid parameters: {', '.join(CohortParams.__annotations__)}") from e
    p.check()
    out = Path(out_dir)
    wanted = _params_json(p)
    if (out / "cohort.json").is_file():
        have = read_json(out / "cohort.json")
        if have.get("params") == wanted:
            return have
        if not overwrite:
            raise GpfmError(f"{out}: holds a demo cohort made with other parameters; pass overwrite=True "
                            "(--overwrite) or choose another folder")
    elif out.exists() and any(out.iterdir()):
        raise GpfmError(f"{out}: exists and is not a demo cohort; choose an empty or new folder")

    work = out.with_name(out.name + ".partial")
    if work.exists():
        if not (work / _PARTIAL_MARK).exists():
            raise GpfmError(f"{work}: exists and was not made by make_cohort; remove it or choose another folder")
        shutil.rmtree(work)
    for sub in ("slides", "labels", "roi/images"):
        (work / sub).mkdir(parents=True)
    (work / _PARTIAL_MARK).write_text("")

    patients, jobs = _plan(p)
    slides = _run_jobs(work, p, jobs, workers, quiet)
    cohort = dict(generator="gpfm.demo.cohort", version=GENERATOR_VERSION, seed=p.seed, params=wanted, mpp=MPP,
                  time_unit="months", event="1 = observed, 0 = censored",
                  classes=list(LABELS), roi_classes=list(ROI_CLASSES), grades=list(GRADES),
                  cues=dict(label="tumour regions only: ductal = cohesive nests of large dark nuclei, lobular = "
                                  "single-file chains of dark medium nuclei; benign has none",
                            grade="stroma everywhere: fibre order/size/contrast and lymphocyte density"),
                  patients=patients, slides=slides)
    _write_tables(work, p, cohort)
    write_json(work / "cohort.json", cohort)
    (work / _PARTIAL_MARK).unlink()
    if out.exists():
        shutil.rmtree(out) if (out / "cohort.json").exists() else out.rmdir()
    os.replace(work, out)
    return cohort


def _params_json(p: CohortParams) -> dict:
    d = asdict(p)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()} | {"version": GENERATOR_VERSION}


# ------------------------------------------------------------------------------------------ hidden variables
def _plan(p: CohortParams) -> tuple[list[dict], list[dict]]:
    """Patients with balanced labels and grades, survival, ROI split; and one job per slide."""
    rng = np.random.default_rng([p.seed, 0])
    n = p.n_patients
    labels = rng.permutation(np.resize(np.arange(len(LABELS)), n))
    grades = np.zeros(n, int)
    for c in range(len(LABELS)):  # grades balanced within every label: grade and label independent
        idx = np.nonzero(labels == c)[0]
        grades[idx] = rng.permutation(np.resize(np.roll(GRADES, -c), len(idx)))
    hazard = p.base_hazard * np.exp(p.log_hazard_ratio * (grades - 1))
    t_event = rng.exponential(1 / hazard)
    rng.permutation(n)  # (kept so every later draw, and so the rest of the cohort, stays as it was)
    # Administrative censoring, as in a real study: patient i's follow-up ends at spread_i * h, with h chosen so
    # that exactly the configured share of patients is still event-free then (the longest times are censored).
    spread = rng.uniform(0.5, 1.5, n)
    ratio = np.sort(t_event / spread)[::-1]
    k = round(p.censored_fraction * n)
    h = np.inf if k == 0 else (ratio[k - 1] + ratio[k]) / 2 if k < n else 0.0
    censored = t_event > spread * h
    time = np.minimum(t_event, spread * h)
    two = set(rng.permutation(n)[:round(p.two_slide_fraction * n)].tolist())
    split = _roi_split(rng, labels, grades, p.roi_split)
    patients, jobs = [], []
    for i in range(n):
        case = f"DEMO-{i + 1:03d}"
        ids = [f"{case}-S{k + 1}" for k in range(2 if i in two else 1)]
        patients.append(dict(case_id=case, label=LABELS[labels[i]], grade=int(grades[i]),
                             time=round(max(float(time[i]), 0.1), 2), event=int(not censored[i]),
                             hazard=float(hazard[i]), roi_split=str(split[i]), slides=ids))
        for sid in ids:
            k = len(jobs)
            jobs.append(dict(index=k, slide_id=sid, case_id=case, label=LABELS[labels[i]],
                             grade=int(grades[i]), svs=k % p.svs_every == 0, roi_split=str(split[i])))
    return patients, jobs


def _roi_split(rng: np.random.Generator, labels: np.ndarray, grades: np.ndarray,
               shares: tuple[float, float, float]) -> np.ndarray:
    """train/val/test per patient, stratified by label; within a label, test and val patients are drawn from
    the grades in turn and never take a grade's last patient, so train keeps every grade of every label."""
    _, f_val, f_test = np.array(shares) / sum(shares)
    split = np.full(len(labels), "train", dtype=object)
    for c in np.unique(labels):
        strata = [list(rng.permutation(np.nonzero((labels == c) & (grades == g))[0])) for g in GRADES]
        size = int((labels == c).sum())
        turn = int(c)
        for name, count in (("test", round(f_test * size) or int(size >= 2 and f_test > 0)),
                            ("val", round(f_val * size) or int(size >= 3 and f_val > 0))):
            for _ in range(count):
                spare = [k for k in range(len(GRADES)) if len(strata[k]) > 1] or \
                    [k for k in range(len(GRADES)) if strata[k]]
                if not spare or sum(map(len, strata)) <= 1:
                    break
                k = min(spare, key=lambda k: (k - turn) % len(GRADES))
                split[strata[k].pop()] = name
                turn = k + 1
    return split


# ----------------------------------------------------------------------------------------------- slides
def _run_jobs(work: Path, p: CohortParams, jobs: list[dict], workers: int, quiet: bool) -> list[dict]:
    """Each job's slide record, in job order, from one process or a spawned pool (same output either way)."""
    workers = max(1, min(workers, len(jobs), os.cpu_count() or 1))
    with progress(total=len(jobs), desc="demo cohort", unit="slide", quiet=quiet) as bar:
        def tick(record: dict) -> dict:
            bar.update()
            return record

        if workers == 1:
            with _one_thread():
                return [tick(_make_slide(work, p, j)) for j in jobs]
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init) as ex:
            return [tick(r) for r in ex.map(_make_slide, repeat(work), repeat(p), jobs)]


def _one_thread():
    """BLAS limited to one thread: the renderer's small matrix products only lose from threading."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(1)


def _worker_init() -> None:
    _one_thread()


def _make_slide(work: Path, p: CohortParams, job: dict) -> dict:
    """Render one slide, write it as a pyramid, cut its ROI tiles; return its cohort.json record."""
    rng = np.random.default_rng([p.seed, 1, job["index"]])
    lo, hi = p.slide_size
    width, height = (int(rng.integers(lo // 16, hi // 16 + 1)) * 16 for _ in range(2))
    r = render_slide(rng, job["label"], job["grade"], width, height)
    ext = "svs" if job["svs"] else "tiff"
    path = work / "slides" / f"{job['slide_id']}.{ext}"
    levels = write_pyramid(path, r.rgb, MPP, svs=job["svs"], quality=p.jpeg_quality, name=job["slide_id"])
    rois = _cut_rois(work, p, rng, job, r)
    return dict(slide_id=job["slide_id"], case_id=job["case_id"], file=f"slides/{path.name}", format=ext,
                width=width, height=height, mpp=MPP, levels=levels, label=job["label"], grade=job["grade"],
                tissue_fraction=round(r.tissue_fraction, 4), tumour_fraction=round(r.tumour_fraction, 4),
                tumour_discs=r.discs, stain={k: round(v, 4) for k, v in r.stain.items()}, roi=rois)


def write_pyramid(path: Path, rgb: np.ndarray, mpp: float, svs: bool = False, quality: int = 70,
                  tile: int = 512, name: str = "") -> list[list[int]]:
    """Write a tiled JPEG pyramid (downsamples DOWNSAMPLES) that OpenSlide and tiffslide read with its µm/px.

    Generic TIFF: resolution tags in pixels per centimetre, reduced levels flagged subfiletype=1.
    Aperio SVS: the "Aperio Image Library ... |AppMag = 20|MPP = ..." description; as in scanner files the second
    directory is a stripped thumbnail and every tiled level has subfiletype=0 (OpenSlide's aperio driver takes
    each tiled directory as a level, tifffile/tiffslide expect the thumbnail second). Returns the level sizes.
    """
    import tifffile

    levels = [rgb]
    img = Image.fromarray(rgb)
    for a, b in zip(DOWNSAMPLES, DOWNSAMPLES[1:]):
        img = img.reduce(b // a)
        levels.append(np.asarray(img))
    h0, w0 = rgb.shape[:2]
    jpeg = dict(photometric="rgb", compression="jpeg", compressionargs={"level": quality}, metadata=None,
                software=False)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tw:
        for i, (ds, lvl) in enumerate(zip(DOWNSAMPLES, levels)):
            h, w = lvl.shape[:2]
            if svs:
                head = f"Aperio Image Library v12.0.15 \r\n{w0}x{h0} "
                tail = f"|AppMag = 20|MPP = {mpp}|Filename = {name}"
                tiles = f"[0,0 {w0}x{h0}] ({tile}x{tile}) JPEG/RGB Q={quality}"
                tw.write(lvl, tile=(tile, tile), description=head + (tiles if ds == 1 else f"-> {w}x{h}") + tail,
                         subfiletype=0, **jpeg)
                if i == 0:
                    thumb = levels[-1]
                    tw.write(thumb, rowsperstrip=16, subfiletype=0, **jpeg,
                             description=f"{head}-> {thumb.shape[1]}x{thumb.shape[0]} - {tail}")
            else:
                ppcm = 1e4 / (mpp * ds)
                tw.write(lvl, tile=(tile, tile), resolution=(ppcm, ppcm), resolutionunit="CENTIMETER",
                         subfiletype=0 if ds == 1 else 1, **jpeg)
    return [[lvl.shape[1], lvl.shape[0]] for lvl in levels]


def _cut_rois(work: Path, p: CohortParams, rng: np.random.Generator, job: dict, r) -> list[dict]:
    """ROI tiles from tumour regions (the slide's class) and from tumour-free tissue ("normal")."""
    cells = p.roi_fov // MASK_DS
    tum = r.tumour >= 0.5
    tis = r.tissue >= 0.5
    want = [("normal", p.roi_per_slide)] if job["label"] == "benign" else \
        [(job["label"], p.roi_per_slide), ("normal", p.roi_per_slide // 2)]
    out = []
    tumour_free = _box_mean(r.tumour > 0, cells) == 0
    for cls, n in want:
        ok = _box_mean(tum, cells) >= 0.8 if cls != "normal" else (_box_mean(tis, cells) >= 0.9) & tumour_free
        ys, xs = np.nonzero(ok)
        taken: list[tuple[int, int]] = []
        for i in rng.permutation(len(xs)):
            y, x = int(ys[i]), int(xs[i])
            if all(abs(y - ty) >= cells * 0.75 or abs(x - tx) >= cells * 0.75 for ty, tx in taken):
                taken.append((y, x))
                if len(taken) == n:
                    break
        for y, x in taken:
            x0, y0 = x * MASK_DS, y * MASK_DS
            crop = Image.fromarray(r.rgb[y0:y0 + p.roi_fov, x0:x0 + p.roi_fov])
            name = f"{job['slide_id']}_{len(out):02d}.png"
            rel = f"images/{cls}/{name}"
            with atomic_path(work / "roi" / rel) as tmp:
                if p.roi_size != p.roi_fov:
                    crop = crop.resize((p.roi_size, p.roi_size), Image.BOX)
                crop.save(tmp, format="PNG")
            out.append(dict(path=rel, label=cls, grade=job["grade"], split=job["roi_split"], x=x0, y=y0,
                            size=p.roi_fov))
    return out


def _box_mean(mask: np.ndarray, k: int) -> np.ndarray:
    """Mean of `mask` over every k x k box, indexed by the box's top-left cell."""
    c = np.pad(np.cumsum(np.cumsum(mask.astype(np.float64), 0), 1), ((1, 0), (1, 0)))
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


# ----------------------------------------------------------------------------------------------- tables
def _write_tables(work: Path, p: CohortParams, cohort: dict) -> None:
    rng = np.random.default_rng([p.seed, 2])
    pat = {q["case_id"]: q for q in cohort["patients"]}
    cls, surv, reports, vqa = [], [], [], []
    for s in cohort["slides"]:
        q = pat[s["case_id"]]
        key = dict(slide_id=s["slide_id"], case_id=s["case_id"])
        cls.append(key | dict(label=s["label"]))
        surv.append(key | dict(time=q["time"], event=q["event"]))
        reports.append(key | dict(report=text.report(rng, s["label"], s["grade"], s["tumour_fraction"])))
        vqa += [key | qa for qa in text.wsi_questions(s["label"], s["grade"])]
    lab = work / "labels"
    write_csv(lab / "wsi_classification.csv", cls, ["slide_id", "case_id", "label"])
    write_csv(lab / "survival.csv", surv, ["slide_id", "case_id", "time", "event"])
    write_csv(lab / "reports.csv", reports, ["slide_id", "case_id", "report"])
    write_csv(lab / "wsi_vqa.csv", vqa, ["slide_id", "case_id", "question", "answer", "choices"])

    rois = [t for s in cohort["slides"] for t in s["roi"]]
    write_csv(work / "roi" / "roi.csv", rois, ["path", "label", "split", "grade"])
    write_csv(work / "roi" / "vqa.csv", [dict(path=t["path"]) | qa for t in rois
                                         for qa in text.roi_questions(t["label"], t["grade"])],
              ["path", "question", "answer"])
    write_csv(work / "roi" / "captions.csv",
              [dict(path=t["path"], caption=text.caption(rng, t["label"], t["grade"])) for t in rois],
              ["path", "caption"])
