"""Small shared helpers: user-facing errors, atomic writes, HDF5 read/write, batch reports, progress, logging.

Every stage writes through these so that "a file that exists is complete" holds everywhere (DESIGN.md).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("gpfm")


class GpfmError(Exception):
    """An error caused by the user's input: the CLI prints its one-line message (file, reason, fix) and exits 2."""


# ----------------------------------------------------------------------------------------------- atomic writes
def tmp_path(path: str | os.PathLike) -> Path:
    """The temporary name a file is written under before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; on success rename it to `path`, on failure remove it.

    Readers therefore never see a half-written file: a file that exists is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON line (metrics logs). Lines are small, so a crash loses at most the last line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(dict(record), default=_json_default) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_csv(path: str | os.PathLike, rows: list[Mapping[str, Any]], columns: list[str] | None = None) -> None:
    """Write a list of dicts as CSV, atomically. `columns` fixes the order (default: keys in first-seen order)."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k, "")) for k in columns})


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------------------------------- HDF5
def write_h5(
    path: str | os.PathLike,
    datasets: Mapping[str, np.ndarray],
    attrs: Mapping[str, Mapping[str, Any]] | None = None,
    compression: str | None = None,
) -> None:
    """Write datasets (and per-dataset attributes) to an HDF5 file atomically.

    String arrays (dtype object or unicode) are stored as variable-length UTF-8.
    """
    import h5py

    attrs = attrs or {}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name, arr in datasets.items():
            arr = np.asarray(arr)
            if arr.dtype.kind in "UO":
                ds = f.create_dataset(name, data=arr.astype(object), dtype=h5py.string_dtype("utf-8"))
            else:
                ds = f.create_dataset(name, data=arr, compression=compression if arr.size else None)
            for k, v in attrs.get(name, {}).items():
                ds.attrs[k] = _h5_attr(v)


def _h5_attr(v: Any) -> Any:
    if v is None:
        return "none"
    if isinstance(v, Path):
        return str(v)
    return v


def read_h5(path: str | os.PathLike, names: Iterable[str] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Read datasets (all, or `names`) and their attributes: ({name: array}, {name: {attr: value}}).

    Strings come back as Python str arrays (dtype object).
    """
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except (OSError, FileNotFoundError) as e:
        raise GpfmError(f"{path}: cannot open as HDF5 ({e}); delete it and re-run the stage that writes it") from e
    with f:
        names = list(f.keys()) if names is None else list(names)
        data, attrs = {}, {}
        for name in names:
            if name not in f:
                raise GpfmError(f"{path}: no dataset '{name}' (has: {', '.join(f.keys())})")
            ds = f[name]
            arr = ds[()]
            if h5py.check_string_dtype(ds.dtype) is not None:
                arr = np.array([s.decode() if isinstance(s, bytes) else s for s in np.atleast_1d(arr)], dtype=object)
            data[name] = arr
            attrs[name] = {k: _py_attr(v) for k, v in ds.attrs.items()}
    return data, attrs


def _py_attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


# ------------------------------------------------------------------------------------------ id lists
def read_slide_ids(path: str | os.PathLike | None, what: str = "exclusion list") -> set[str]:
    """Slide ids from a text file (one per line, # comments) or a CSV with a `slide_id` column (else its first
    column): the exclusion lists that keep downstream test slides out of pretraining data."""
    if not path:
        return set()
    p = Path(path)
    if not p.is_file():
        raise GpfmError(f"{p}: {what} file not found")
    if p.suffix.lower() == ".csv":
        with open(p, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return set()
        col = rows[0].index("slide_id") if "slide_id" in rows[0] else 0
        body = rows[1:] if "slide_id" in rows[0] else rows
        return {r[col].strip() for r in body if r and r[col].strip()}
    return {line.strip() for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")}


# ------------------------------------------------------------------------------------------ folders and logs
def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed and prove it is writable, before any work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".gpfm-write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise GpfmError(f"{path}: output folder is not writable ({e.strerror}); choose another --out") from e
    return path


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", force=True)


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", quiet: bool = False,
             unit: str = "it"):
    """A tqdm progress bar on stderr, silenced by --quiet (and when stderr is not a terminal in CI)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=quiet or None, dynamic_ncols=True,
                leave=False)


# ------------------------------------------------------------------------------------------- batch reports
@dataclass
class BatchReport:
    """Collects one row per item of a batch job (ok / skipped / failed) and writes the summary CSV.

    Skipped items are the user's problem (bad input, with a reason and a fix); the batch goes on.
    `exit_code` is 0 when all went well and 1 when anything was skipped or failed.
    """

    what: str
    rows: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def add(self, item: str, status: str, **fields: Any) -> None:
        self.rows.append({"item": item, "status": status, **fields})
        if status in ("skipped", "failed"):
            log.warning("%s: %s: %s", self.what, item, fields.get("error", status))

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out

    @property
    def problems(self) -> list[dict]:
        return [r for r in self.rows if r["status"] in ("skipped", "failed")]

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0

    def summary_line(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items())) or "nothing to do"
        return f"{self.what}: {counts} in {time.perf_counter() - self.started:.1f} s"

    def write(self, path: str | os.PathLike, columns: list[str] | None = None) -> None:
        write_csv(path, self.rows, columns)
