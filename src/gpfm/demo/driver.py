"""`gpfm demo` (what `make demo` runs): the whole pipeline on the built-in synthetic cohort, end to end.

  1. cohort      gpfm.demo.cohort.make_cohort            OUT/cohort (slides, label tables, ROI set, texts)
  2. tile        gpfm.slides.tiling.tile_batch           OUT/tiles/{coords,thumbnails}
  3. experts     gpfm.demo.experts.make_experts          OUT/experts/expert-{label,grade} (two specialists)
  4. shards      gpfm.shards.pack.pack                   OUT/shards (WebDataset tar shards + manifest)
  5. pretrain    gpfm.pretrain.trainer.train             OUT/pretrain/ukd-tiny (UKD from both experts, on shards)
  6. extract     gpfm.extract.extract_slides / _images   OUT/features/<encoder>, OUT/features/roi/<encoder>
  7. arena       gpfm.arena.runner.run_suite             OUT/arena (configs/arena/demo/suite.yaml: 6 task types)
  8. report      gpfm.arena.leaderboard.write_report     OUT/arena/leaderboard.html

Every stage skips what is already complete, so a second run reuses everything and takes seconds. The encoders
compared are the UKD student, the two experts it learned from, and the same tiny ViT with random weights.
"""

from __future__ import annotations

import time
from pathlib import Path

from gpfm.io import GpfmError, ensure_writable_dir, log

ROOT = Path(__file__).resolve().parents[3]
SUITE = ROOT / "configs" / "arena" / "demo" / "suite.yaml"
PRETRAIN = ROOT / "configs" / "pretrain" / "demo.yaml"
TILE_MPP, TILE_PX = 0.5, 224
STUDENT, RANDOM = "ukd-student", "random-vit"
EXPERTS = ("expert-label", "expert-grade")


def _stage(name: str):
    def wrap(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            print(f"[demo] {name} ...", flush=True)
            out = fn(*a, **k)
            print(f"[demo] {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
            return out
        return run
    return wrap


@_stage("1/8 cohort")
def cohort(out: Path, seed: int, quiet: bool) -> Path:
    from gpfm.demo.cohort import make_cohort

    make_cohort(out / "cohort", seed=seed, quiet=quiet)
    return out / "cohort"


@_stage("2/8 tile")
def tile(out: Path, cohort_dir: Path, quiet: bool) -> Path:
    from gpfm.slides.tiling import TilingParams, tile_batch

    report = tile_batch(cohort_dir / "slides", out / "tiles", TilingParams(target_mpp=TILE_MPP, patch_size=TILE_PX),
                        workers=2, quiet=quiet)
    print(f"[demo]   {report.summary_line()}")
    return out / "tiles"


@_stage("3/8 experts")
def experts(out: Path, cohort_dir: Path, quiet: bool) -> dict[str, Path]:
    from gpfm.demo.experts import make_experts

    made = make_experts(cohort_dir, out / "experts", quiet=quiet)
    return {f"expert-{t}": p for t, p in made.items()}


@_stage("4/8 shards")
def shards(out: Path, cohort_dir: Path, tiles: Path, quiet: bool) -> Path:
    from gpfm.shards.pack import PackOptions, pack

    report = pack(PackOptions(out=str(out / "shards"), coords=str(tiles / "coords"), slides=str(cohort_dir / "slides"),
                              size=TILE_PX, target_mpp=TILE_MPP, codec="jpeg", quality=90, tiles_per_shard=500,
                              quiet=quiet))
    print(f"[demo]   {report.summary_line()}")
    return out / "shards"


@_stage("5/8 pretrain (UKD)")
def pretrain(out: Path, store: Path, expert_dirs: dict[str, Path], seed: int, quiet: bool) -> Path:
    from gpfm.config import load_config
    from gpfm.pretrain.trainer import PretrainConfig, train

    run = out / "pretrain" / "ukd-tiny"
    experts = ",".join(f"{{name: tiny-vit, label: {k}, weights: '{p}', cls_weight: 1.0, patch_weight: 0.25}}"
                       for k, p in expert_dirs.items())
    cfg = load_config(PretrainConfig, PRETRAIN, [f"run.seed={seed}", "data.source=shards",
                                                 f"data.shards=['{store}']", f"distill.experts=[{experts}]"])
    train(cfg, run, quiet=quiet)
    if not (run / "export" / "model.safetensors").is_file():
        from gpfm.pretrain.export import export_run

        export_run(run)
    return run / "export"


@_stage("6/8 extract")
def extract(out: Path, cohort_dir: Path, tiles: Path, weights: dict[str, Path], quiet: bool) -> list[str]:
    from gpfm.extract import extract_images, extract_slides

    names = [STUDENT, *EXPERTS, RANDOM]
    encoders = [f"{STUDENT}=gpfm", *(f"{e}=tiny-vit" for e in EXPERTS), f"{RANDOM}=tiny-vit"]
    spec = ",".join(f"{k}={v}" for k, v in weights.items())
    for run in (lambda: extract_slides(tiles / "coords", cohort_dir / "slides", encoders, out / "features",
                                       weights=spec, workers=1, quiet=quiet),
                lambda: extract_images(cohort_dir / "roi" / "roi.csv", encoders, out / "features" / "roi",
                                       weights=spec, workers=1, quiet=quiet)):
        report = run()
        print(f"[demo]   {report.summary_line()}")
        if report.exit_code:
            raise GpfmError(f"demo: feature extraction skipped items; see {out / 'features'}")
    return names


@_stage("7/8 arena")
def arena(out: Path, cohort_dir: Path, encoders: list[str], seed: int, quiet: bool) -> Path:
    import torch

    from gpfm.arena.runner import run_suite

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny heads: one thread is several times faster than two here
    try:
        report = run_suite(SUITE, out / "features", encoders, out / "arena", seed=seed,
                           variables={"cohort": str(cohort_dir)}, quiet=quiet)
    finally:
        torch.set_num_threads(threads)
    print(f"[demo]   {report.summary_line()}")
    if report.exit_code:
        raise GpfmError(f"demo: some arena jobs failed; see {out / 'arena'}")
    return out / "arena"


@_stage("8/8 leaderboard")
def leaderboard(arena_dir: Path) -> Path:
    from gpfm.arena.leaderboard import write_report

    paths, analysis = write_report(arena_dir)
    return paths["leaderboard.html"]


def run_demo(out: str | Path = "demo_out", seed: int = 0, quiet: bool = False) -> Path:
    """Run (or resume) the whole demo under `out`; returns the leaderboard page."""
    out = ensure_writable_dir(out).resolve()
    t0 = time.perf_counter()
    cohort_dir = cohort(out, seed, quiet)
    tiles = tile(out, cohort_dir, quiet)
    expert_dirs = experts(out, cohort_dir, quiet)
    store = shards(out, cohort_dir, tiles, quiet)
    student = pretrain(out, store, expert_dirs, seed, quiet)
    encoders = extract(out, cohort_dir, tiles, {STUDENT: student, **expert_dirs}, quiet)
    page = leaderboard(arena(out, cohort_dir, encoders, seed, quiet))
    print(f"[demo] finished in {time.perf_counter() - t0:.0f} s; leaderboard: {page}")
    log.info("open %s in a browser", page)
    return page


def demo_command(args) -> int:
    run_demo(args.out, args.seed, args.quiet)
    return 0
