"""Slide-level inputs of the arena: label tables and per-slide feature bags, validated with one-line errors.

Shared by wsi_cls and survival. Feature files are `<features_dir>/<slide_id>.h5` (dataset `features` (N, D)).
Labelled slides without a features file, or with zero tiles, are excluded, counted and warned about; a file
with NaN/inf values, or a dimension that differs from the encoder's other files, is an error naming the file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from gpfm.io import GpfmError, read_h5

log = logging.getLogger("gpfm.arena")


def read_label_table(path: Path, required: Sequence[str], what: str) -> pd.DataFrame:
    """Read a label CSV with its id columns as strings; error when a required column is missing."""
    try:
        df = pd.read_csv(path, dtype={"slide_id": str, "case_id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise GpfmError(f"{path}: cannot read the label table ({e})") from e
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise GpfmError(f"{path}: missing column '{missing[0]}' (has: {', '.join(map(str, df.columns))}); "
                        f"a {what} label table needs columns {', '.join(required)}")
    df = df.dropna(subset=["slide_id"]).copy()
    df["slide_id"] = df["slide_id"].astype(str).str.strip()
    df["case_id"] = df["case_id"].astype(str).str.strip()
    dup = df["slide_id"].duplicated()
    if dup.any():
        raise GpfmError(f"{path}: slide_id {df.loc[dup, 'slide_id'].iloc[0]!r} appears twice; one row per slide")
    return df


def read_bag(path: Path, dim: int | None = None) -> np.ndarray:
    """The (N, D) features of one slide, checked for NaN/inf and for the expected dimension."""
    data, _ = read_h5(path, ["features"])
    x = data["features"]
    if x.ndim != 2:
        raise GpfmError(f"{path}: 'features' must be 2-d (tiles, dim), got shape {x.shape}; re-extract it")
    if x.size and not np.isfinite(x).all():
        raise GpfmError(f"{path}: features contain NaN or inf values; re-extract this slide "
                        "(gpfm extract --overwrite)")
    if dim is not None and x.shape[1] != dim:
        raise GpfmError(f"{path}: feature dim {x.shape[1]} differs from the {dim} of this encoder's other files; "
                        "mixed encoders in one folder? re-extract it")
    return x


class BagStore:
    """Feature bags of one encoder, read once into memory (as stored, float16 or float32)."""

    def __init__(self, features_dir: Path, slide_ids: Sequence[str]):
        self.dir = Path(features_dir)
        self.bags: dict[str, np.ndarray] = {}
        self.missing: list[str] = []
        self.empty: list[str] = []
        self.dim: int | None = None
        first: Path | None = None
        for sid in slide_ids:
            path = self.dir / f"{sid}.h5"
            if not path.is_file():
                self.missing.append(sid)
                continue
            try:
                x = read_bag(path, self.dim)
            except GpfmError as e:
                if self.dim is not None and "differs" in str(e):
                    raise GpfmError(f"{e} (first file {first} has dim {self.dim})") from None
                raise
            if self.dim is None and x.shape[0] > 0:
                self.dim, first = int(x.shape[1]), path
            if x.shape[0] == 0:
                self.empty.append(sid)
                continue
            self.bags[sid] = x

    def __getitem__(self, slide_id: str) -> np.ndarray:
        return self.bags[slide_id]

    def __contains__(self, slide_id: str) -> bool:
        return slide_id in self.bags

    def excluded(self) -> dict[str, list[str]]:
        return {k: v for k, v in (("no features file", self.missing), ("no tiles", self.empty)) if v}


def warn_excluded(excluded: dict[str, list[str]], task: str, where: Path, unit: str = "slide") -> None:
    """One warning per exclusion reason, with the count and the first ids."""
    for reason, ids in excluded.items():
        head = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
        log.warning("task %s: %d labelled %s(s) excluded (%s in %s): %s", task, len(ids), unit, reason, where,
                    head)


def require_dir(features_dir: Path, task: str) -> None:
    if not Path(features_dir).is_dir():
        raise GpfmError(f"task {task}: features folder {features_dir} not found; check --features and "
                        "--encoders (features live in <features>/<encoder>/<slide_id>.h5)")
