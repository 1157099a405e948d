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


# ---- verb: tile -----------------------------------------------------------------------------------------------
# ---- end verb: tile -------------------------------------------------------------------------------------------

# ---- verb: encoders / extract ---------------------------------------------------------------------------------
# ---- end verb: encoders / extract -----------------------------------------------------------------------------

# ---- verb: pretrain -------------------------------------------------------------------------------------------
# ---- end verb: pretrain ---------------------------------------------------------------------------------------

# ---- verb: shards ---------------------------------------------------------------------------------------------
# ---- end verb: shards -----------------------------------------------------------------------------------------

# ---- verb: arena ----------------------------------------------------------------------------------------------
# ---- end verb: arena ------------------------------------------------------------------------------------------

# ---- verb: demo -----------------------------------------------------------------------------------------------
# ---- end verb: demo -------------------------------------------------------------------------------------------

# Each entry adds one verb's sub-parser and sets `func` (called with the parsed namespace, returns an exit code).
VERBS: list = []


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
