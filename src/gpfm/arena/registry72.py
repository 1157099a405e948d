"""The paper's 72-task registry (configs/arena/gpfm72) and `gpfm arena tasks`: list a suite's tasks and check
which of them have their label tables under a data root.

Listing reads the spec YAML as it is (no data needed); a task whose label tables are all present is also loaded
with the arena's own TaskSpec loader, so a spec that would fail at `gpfm arena run` shows up here first.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from gpfm.config import load_yaml
from gpfm.io import GpfmError

GPFM72 = Path(__file__).resolve().parents[3] / "configs" / "arena" / "gpfm72" / "gpfm72.yaml"


def default_suite() -> Path:
    """The 72-task suite of this checkout (configs/ is not installed with a wheel: pass --suite then)."""
    if not GPFM72.is_file():
        raise GpfmError(f"{GPFM72}: the gpfm72 suite is not here (installed without the repository's configs/); "
                        "pass --suite PATH/TO/configs/arena/gpfm72/gpfm72.yaml")
    return GPFM72


def _fill(template: str, root: Path | None) -> Path | None:
    if root is None:
        return None
    p = Path(template.replace("{root}", str(root)))
    return p if p.is_absolute() else root / p


def list_tasks(suite: str | Path | None = None, root: str | Path | None = None) -> list[dict[str, Any]]:
    """One dict per task of `suite` (default gpfm72): name, title, category, group, cohort, public, primary
    metric, trained_on, and `data` = "yes" / "no" / "invalid" / "-" (no root given) with `missing` files or
    the loader's `error`."""
    from gpfm.arena.tasks import DEFAULT_PRIMARY_METRIC, load_task

    suite = Path(suite) if suite else default_suite()
    data = load_yaml(suite)
    root = Path(root).resolve() if root else None
    if root is not None and not root.is_dir():
        raise GpfmError(f"--root {root}: folder not found")
    rows = []
    for i, entry in enumerate(data.get("tasks") or []):
        if not isinstance(entry, str):
            raise GpfmError(f"{suite}: tasks[{i}] is inline; `arena tasks` lists suites of spec files")
        path = (suite.parent / entry).resolve()
        spec = load_yaml(path)
        meta = spec.get("meta") or {}
        row = {"name": spec.get("name", ""), "title": meta.get("title", spec.get("name", "")),
               "category": spec.get("category", ""), "group": meta.get("group", ""),
               "cohort": meta.get("cohort", ""), "public": bool(meta.get("public", False)),
               "primary_metric": spec.get("primary_metric") or DEFAULT_PRIMARY_METRIC.get(spec.get("category"), ""),
               "trained_on": meta.get("trained_on"), "spec": str(path), "data": "-", "missing": [], "error": ""}
        if root is not None:
            needed = [spec.get("labels")] + [(spec.get("external") or {}).get("labels")]
            files = [_fill(str(t), root) for t in needed if t]
            row["missing"] = [str(f) for f in files if not f.is_file()]
            row["data"] = "no" if row["missing"] else "yes"
            if not row["missing"]:
                try:
                    load_task(path, {"root": str(root)})
                except GpfmError as e:
                    row["data"], row["error"] = "invalid", str(e)
        rows.append(row)
    return rows


def category_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Tasks per category, plus `external` (WSI classification external validations) for the paper's 40/20 split."""
    c = Counter(r["category"] for r in rows)
    out = dict(c)
    out["wsi_external"] = sum(1 for r in rows if r["category"] == "wsi_classification" and r["group"] == "external")
    return out


def tasks_command(args: Any) -> int:
    """`gpfm arena tasks [--suite S] [--root DATA] [--public]`: print the table; exit 0."""
    rows = list_tasks(args.suite, args.root)
    if args.public:
        rows = [r for r in rows if r["public"]]
    cols = [("name", 26), ("category", 19), ("group", 9), ("cohort", 34), ("public", 6), ("primary_metric", 17),
            ("data", 7)]
    print("  ".join(f"{c:<{w}}" for c, w in cols).rstrip())
    for r in rows:
        vals = {**r, "public": "yes" if r["public"] else "no"}
        print("  ".join(f"{_cut(str(vals[c]), w):<{w}}" for c, w in cols).rstrip())
    counts = Counter(r["category"] for r in rows)
    line = ", ".join(f"{n} {c}" for c, n in counts.items())
    print(f"{len(rows)} task(s): {line}; {sum(r['public'] for r in rows)} public")
    if args.root:
        found = sum(r["data"] == "yes" for r in rows)
        print(f"data under {Path(args.root).resolve()}: {found} of {len(rows)} task(s) ready")
        for r in rows:
            if r["data"] == "invalid":
                print(f"  {r['name']}: {r['error']}")
    return 0


def _cut(s: str, w: int) -> str:
    return s if len(s) <= w else s[:w - 1] + "…"
