"""Command line: parses arguments and calls one function per verb. No logic lives here.

Heavy modules (torch, timm) are imported inside each verb so that `gpfm tile` starts fast.
Exit codes: 0 all done, 1 some items skipped or failed (listed in the summary), 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import sys

from gpfm import __version__
from gpfm.io import GpfmError, setup_logging


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or info messages")
    p.add_argument("--verbose", action="store_true", help="debug messages")


# Each entry adds one verb's sub-parser and sets `func` (called with the parsed namespace, returns an exit code).
VERBS: list = []

# ---- verb: tile -----------------------------------------------------------------------------------------------
def _add_tile(sub) -> None:
    p = sub.add_parser("tile", help="find tissue and lay a tile grid at a target µm/px (stage 1)",
                       description="Writes OUT/coords/<slide>.h5, OUT/thumbnails/<slide>.png and "
                                   "OUT/tiling_summary.csv. Finished slides are skipped unless --overwrite.")
    p.add_argument("input", help="a slide, a folder of slides, or a CSV with a 'path' column (optional 'mpp')")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--target-mpp", type=float, default=0.5, help="µm per pixel of the tiles (default 0.5)")
    p.add_argument("--patch-size", type=int, default=256, help="tile side in px at --target-mpp (default 256)")
    p.add_argument("--overlap", type=int, default=0, help="px (at target) shared by neighbouring tiles")
    p.add_argument("--tissue-threshold", type=float, default=0.5,
                   help="keep tiles whose tissue fraction is at least this (default 0.5)")
    p.add_argument("--min-tissue-area", type=float, default=20_000.0,
                   help="drop tissue pieces smaller than this many µm² (default 20000)")
    p.add_argument("--min-hole-area", type=float, default=10_000.0,
                   help="fill holes in the tissue smaller than this many µm² (default 10000)")
    p.add_argument("--mpp", type=float, default=None, help="level-0 µm/px for slides whose metadata lacks it")
    p.add_argument("--mpp-csv", default=None, help="CSV slide,mpp overriding µm/px per slide (id or file name)")
    p.add_argument("--workers", type=int, default=4, help="slides processed in parallel (default 4)")
    p.add_argument("--overwrite", action="store_true", help="re-tile slides that already have coords")
    _common(p)
    p.set_defaults(func=lambda a: __import__("gpfm.slides.tiling", fromlist=["x"]).tile_command(a))


VERBS.append(_add_tile)
# ---- end verb: tile -------------------------------------------------------------------------------------------

# ---- verb: encoders / extract ---------------------------------------------------------------------------------
def _add_encoders(sub) -> None:
    p = sub.add_parser("encoders", help="list the encoder zoo (architecture, size, input, feature, weights)")
    p.add_argument("--no-tiny", action="store_true", help="hide the tiny random test encoders")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    _common(p)
    p.set_defaults(func=lambda a: __import__("gpfm.encoders.registry", fromlist=["x"]).encoders_command(a))


def _add_extract(sub) -> None:
    import os

    p = sub.add_parser("extract", help="features of every tile (or image) for one or more encoders (stage 2)",
                       description="Slides: writes OUT/<encoder>/<slide_id>.h5 (features, coords). Image sets: "
                                   "OUT/<encoder>/<split>.h5 (features, labels, paths). Finished outputs are "
                                   "skipped unless --overwrite; OUT/extract_summary.csv lists failures. Under "
                                   "torchrun each rank takes its share of the slides.")
    p.add_argument("--coords", help="folder of coords files (DIR/coords/*.h5 or DIR/*.h5 from `gpfm tile`)")
    p.add_argument("--slides", help="folder holding the slides (searched recursively by slide id)")
    p.add_argument("--images", help="image set: a class-per-folder tree ([split/]class/image) or a CSV "
                                    "path,label[,split]")
    p.add_argument("--encoder", required=True,
                   help="encoder name(s), comma-separated (see `gpfm encoders`); LABEL=NAME writes to OUT/LABEL")
    p.add_argument("--weights", help="weights file/folder (one encoder) or name=PATH,name=PATH; default: the "
                                     "Hugging Face cache/hub (tiny encoders: random)")
    p.add_argument("--out", required=True, help="features folder")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per batch (default 64)")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                   help="reader processes (default: CPU cores - 1, at most 8)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                   help="autocast precision (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (under torchrun: each rank its LOCAL_RANK GPU)")
    p.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")
    _common(p)
    p.set_defaults(func=lambda a: __import__("gpfm.extract", fromlist=["x"]).extract_command(a))


VERBS.append(_add_encoders)
VERBS.append(_add_extract)
# ---- end verb: encoders / extract -----------------------------------------------------------------------------

# ---- verb: pretrain -------------------------------------------------------------------------------------------
def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="UKD pretraining: self-distillation + expert distillation (stage 3)")
    verbs = p.add_subparsers(dest="pretrain_verb", metavar="ACTION", required=True)
    run = verbs.add_parser("run", help="train or resume a student (resumes from the latest checkpoint in --out)")
    run.add_argument("config", help="YAML config, e.g. configs/pretrain/tiny.yaml")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.steps=100 data.batch_size=32")
    run.add_argument("--out", required=True, help="run folder (checkpoints/, metrics.jsonl, export/)")
    _common(run)
    run.set_defaults(func=lambda a: __import__("gpfm.pretrain.trainer", fromlist=["x"]).run_command(a))
    exp = verbs.add_parser("export", help="write the EMA teacher as timm model.safetensors + config.json")
    exp.add_argument("run", help="run folder (its latest checkpoint) or a checkpoint file")
    exp.add_argument("--checkpoint", default=None, help="a specific checkpoints/step_*.pt")
    exp.add_argument("--out", default=None, help="output folder (default RUN/export)")
    _common(exp)
    exp.set_defaults(func=lambda a: __import__("gpfm.pretrain.export", fromlist=["x"]).export_command(a))


VERBS.append(_add_pretrain)
# ---- end verb: pretrain ---------------------------------------------------------------------------------------

# ---- verb: shards ---------------------------------------------------------------------------------------------
def _add_shards(sub) -> None:
    p = sub.add_parser("shards", help="pack tiles into WebDataset tar shards for pretraining at scale")
    verbs = p.add_subparsers(dest="shards_verb", metavar="VERB", required=True)
    k = verbs.add_parser("pack", help="read tiles through coords files (and/or image folders) into shards")
    k.add_argument("--out", required=True, help="store folder: shard-NNNNNN.tar, manifest.json")
    k.add_argument("--coords", help="folder of coords/*.h5 from `gpfm tile`")
    k.add_argument("--slides", help="folder holding the slides named by the coords files")
    k.add_argument("--images", help="folder of image tiles to pack as they are (resized to --size)")
    k.add_argument("--size", type=int, default=512, help="tile size in px (default: 512, the paper's)")
    k.add_argument("--target-mpp", type=float, default=None,
                   help="read at this µm/px (default: level 0 at native resolution, as GPFM)")
    k.add_argument("--codec", choices=["jpeg", "png", "webp"], default="jpeg", help="png/webp are lossless")
    k.add_argument("--quality", type=int, default=90, help="JPEG quality")
    k.add_argument("--tiles-per-shard", type=int, default=2000)
    k.add_argument("--exclude", help="slide ids that must never be packed (CSV with a slide_id column, or one id per line)")
    k.add_argument("--meta", help="CSV slide_id,source,tissue recorded with each tile")
    k.add_argument("--workers", type=int, default=1, help="processes packing shards in parallel")
    k.add_argument("--overwrite", action="store_true", help="delete the store's shards and start again")
    _common(k)
    k.set_defaults(func=lambda a: __import__("gpfm.shards.pack", fromlist=["x"]).pack_command(a))


VERBS.append(_add_shards)
# ---- end verb: shards -----------------------------------------------------------------------------------------

# ---- verb: arena ----------------------------------------------------------------------------------------------
# `gpfm arena <sub-verb>`: each ARENA_VERBS entry adds one sub-verb to the `arena` sub-parser (like VERBS).
ARENA_VERBS: list = []


def _add_arena(sub):
    p = sub.add_parser("arena", help="benchmark encoders on a suite of tasks (run, report, tasks)")
    arena_sub = p.add_subparsers(dest="arena_verb", metavar="SUBVERB")
    for add in ARENA_VERBS:
        add(arena_sub)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _add_arena_run(sub):
    p = sub.add_parser("run", help="run every (task, encoder, fold) job of a suite; resumable and shardable")
    p.add_argument("suite", help="suite YAML (name, tasks: spec files or inline specs)")
    p.add_argument("--features", required=True, help="features root; a task's features are {features}/{encoder}")
    p.add_argument("--encoders", required=True, help="comma-separated encoder names (folders under --features)")
    p.add_argument("--tasks", default="", help="comma-separated task names (default: all tasks of the suite)")
    p.add_argument("--out", required=True, help="results folder (re-run with the same --out to resume)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of splits, bootstrap and training (default 0)")
    p.add_argument("--var", action="append", metavar="NAME=VALUE", help="fill {NAME} in spec paths")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a spec key in every selected task, e.g. settings.epochs=5")
    p.add_argument("--overwrite", action="store_true", help="redo finished folds instead of skipping them")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    _common(p)
    p.set_defaults(func=lambda a: __import__("gpfm.arena.runner", fromlist=["x"]).run_command(a))


ARENA_VERBS.append(_add_arena_run)


def _add_arena_report(sub):
    p = sub.add_parser("report", help="leaderboard (md, csv, html, figures) with ranks and P-values of a run")
    p.add_argument("run_dir", help="results folder of `gpfm arena run` (its --out)")
    p.add_argument("--out", default=None, help="where to write the report (default: RUN_DIR)")
    p.add_argument("--alpha", type=float, default=0.05, help="Nemenyi significance level (default 0.05)")
    p.add_argument("--n-boot", type=int, default=1000,
                   help="paired bootstrap resamples per task for P-values (0: no P-values; default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--reference", default=None, help="encoder the others are tested against (default: best rank)")
    p.add_argument("--holm", action="store_true", help="Holm-adjust P-values within each family of tests")
    p.add_argument("--all-pairs", action="store_true",
                   help="pvalues.csv: every ordered encoder pair per task, not only each against the reference")
    _common(p)
    p.set_defaults(func=lambda a: __import__("gpfm.arena.leaderboard", fromlist=["x"]).report_command(a))


def _add_arena_tasks(sub):
    p = sub.add_parser("tasks", help="list the tasks of a suite (default: the paper's 72) and whether data exist")
    p.add_argument("--suite", default=None, help="suite YAML (default: configs/arena/gpfm72/gpfm72.yaml)")
    p.add_argument("--root", default=None, help="data root ({root} in the specs) to check for label tables")
    p.add_argument("--public", action="store_true", help="only tasks whose data are public")
    _common(p)
    p.set_defaults(func=lambda a: __import__("gpfm.arena.registry72", fromlist=["x"]).tasks_command(a))


ARENA_VERBS.append(_add_arena_report)
ARENA_VERBS.append(_add_arena_tasks)
VERBS.append(_add_arena)
# ---- end verb: arena ------------------------------------------------------------------------------------------

# ---- verb: demo -----------------------------------------------------------------------------------------------
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline end to end on the built-in synthetic cohort")
    p.add_argument("--out", default="demo_out", help="demo folder (reused: finished stages are skipped)")
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=lambda a: __import__("gpfm.demo.driver", fromlist=["x"]).demo_command(a))


VERBS.append(_add_demo)
# ---- end verb: demo -------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpfm", description="Pathology foundation models: tile, extract, pretrain (UKD), benchmark (arena).")
    parser.add_argument("--version", action="version", version=f"gpfm {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for add in VERBS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.verb is None else 2
    setup_logging(quiet=getattr(args, "quiet", False), verbose=getattr(args, "verbose", False))
    try:
        return int(args.func(args) or 0)
    except GpfmError as e:
        print(f"gpfm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpfm: interrupted; finished outputs are kept, re-run to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
