"""Arena task specs and suites: YAML files validated into `TaskSpec` objects.

A task spec (one YAML mapping, or an inline entry of a suite)::

    name: demo-wsi-subtype            # folder name of its results: letters, digits, . _ -
    category: wsi_classification      # wsi_classification | survival | roi_classification | retrieval | vqa
                                      #   | report_generation
    labels: "{cohort}/labels/wsi_classification.csv"   # relative to the spec file unless absolute
    features: "{features}/{encoder}"  # default; {features} = --features root, {encoder} = encoder name
    split: {protocol: monte_carlo, k: 10, ratios: [0.8, 0.1, 0.1]}   # see gpfm.arena.splits; default
                                      #   DEFAULT_SPLIT[category]; missing settings get the protocol defaults
    primary_metric: auc               # default per category (DEFAULT_PRIMARY_METRIC)
    settings: {model: abmil, epochs: 100}   # category-specific, validated by the category's handler module
    external:                         # optional: train on this cohort, test on another one
      labels: ext_labels.csv
      features: "{features}/{encoder}"
    meta: {cohort: TCGA-NSCLC, classes: [LUAD, LUSC], public: true}   # free-form, copied into results

A suite: ``name: demo`` and ``tasks: [spec.yaml, other.yaml, {inline spec}]`` (paths relative to the suite file),
optionally ``vars: {cohort: ../data}``. Any ``{name}`` in labels/features/split paths other than {features} and
{encoder} is a variable from the suite's ``vars`` or ``gpfm arena run --var name=VALUE`` (the command line wins).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpfm.config import apply_overrides, load_yaml
from gpfm.io import GpfmError

CATEGORIES = ("wsi_classification", "survival", "roi_classification", "retrieval", "vqa", "report_generation")
DEFAULT_PRIMARY_METRIC = {
    "wsi_classification": "auc",
    "survival": "c_index",
    "roi_classification": "balanced_accuracy",
    "retrieval": "acc@1",
    "vqa": "vqa_accuracy",
    "report_generation": "bleu_4",
}
# Split protocol used when a spec has no `split:` (a spec with `external:` defaults to the external protocol).
DEFAULT_SPLIT = {
    "wsi_classification": {"protocol": "monte_carlo", "k": 10, "ratios": [0.8, 0.1, 0.1]},
    "survival": {"protocol": "kfold", "k": 5, "val_fraction": 0.1},
    "roi_classification": {"protocol": "official", "val_fraction": 0.1},
    "retrieval": {"protocol": "official", "val_fraction": 0.1},
    "vqa": {"protocol": "official", "val_fraction": 0.1},
    "report_generation": {"protocol": "official", "val_fraction": 0.1},
}
DEFAULT_FEATURES = "{features}/{encoder}"
_KEYS = {"name", "category", "labels", "features", "split", "primary_metric", "settings", "external", "meta"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class ExternalSpec:
    """An external test cohort: its label table and features template."""

    labels: Path
    features: str = DEFAULT_FEATURES


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task. `labels` is resolved (absolute); `features` is a template (see features_dir)."""

    name: str
    category: str
    labels: Path | None
    features: str = DEFAULT_FEATURES
    split: dict[str, Any] = field(default_factory=dict)
    primary_metric: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    external: ExternalSpec | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    base_dir: Path = Path(".")  # folder of the spec file; relative paths in `split` resolve against it
    source: str = ""  # where the spec came from (file path, or "suite.yaml#3" for an inline spec)

    def features_dir(self, features_root: str | Path, encoder: str) -> Path:
        """The folder holding this task's features for `encoder`."""
        return _fill_features(self.features, features_root, encoder, self.base_dir)

    def external_features_dir(self, features_root: str | Path, encoder: str) -> Path | None:
        if self.external is None:
            return None
        return _fill_features(self.external.features, features_root, encoder, self.base_dir)

    def resolve(self, path: str | Path) -> Path:
        """A path from this spec's settings/split, relative to the spec's folder unless absolute."""
        p = Path(path)
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = str(self.labels) if self.labels else None
        d["base_dir"] = str(self.base_dir)
        if self.external:
            d["external"] = {"labels": str(self.external.labels), "features": self.external.features}
        return d

    def fingerprint(self) -> str:
        """Hash of everything that changes results (not meta/source), stored with each fold's metrics."""
        d = self.to_dict()
        for k in ("meta", "source", "base_dir"):
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: list[TaskSpec]
    path: Path | None = None

    def select(self, names: list[str] | None) -> list[TaskSpec]:
        """Tasks named in `names` (all when None), in suite order; unknown names are an error."""
        if not names:
            return list(self.tasks)
        known = {t.name for t in self.tasks}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise GpfmError(f"--tasks: unknown task(s) {', '.join(unknown)} in suite '{self.name}' "
                            f"(has: {', '.join(sorted(known))})")
        return [t for t in self.tasks if t.name in names]


def _fill_features(template: str, root: str | Path, encoder: str, base_dir: Path) -> Path:
    p = Path(template.replace("{features}", str(root)).replace("{encoder}", encoder))
    return p if p.is_absolute() else (Path.cwd() / p if "{features}" in template else base_dir / p)


def _substitute(value: str, variables: Mapping[str, str], where: str) -> str:
    def repl(m: re.Match) -> str:
        key = m.group(1)
        if key in ("features", "encoder"):
            return m.group(0)
        if key not in variables:
            raise GpfmError(f"{where}: variable {{{key}}} is not set; pass --var {key}=PATH "
                            f"or add it under 'vars:' in the suite")
        return str(variables[key])

    return _VAR.sub(repl, value)


def task_from_dict(data: Mapping[str, Any], base_dir: Path, source: str = "",
                   variables: Mapping[str, str] | None = None, overrides: list[str] | None = None) -> TaskSpec:
    """Validate one spec mapping into a TaskSpec (clear one-line errors naming `source`)."""
    where = source or "task spec"
    if not isinstance(data, Mapping):
        raise GpfmError(f"{where}: a task spec must be a mapping, got {type(data).__name__}")
    data = json.loads(json.dumps(dict(data), default=str))  # deep copy, plain types
    apply_overrides(data, overrides or [])
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise GpfmError(f"{where}: unknown key '{unknown[0]}' (valid: {', '.join(sorted(_KEYS))})")
    for key in ("name", "category"):
        if not data.get(key):
            raise GpfmError(f"{where}: missing '{key}'")
    name, category = str(data["name"]), str(data["category"])
    if not _NAME.match(name):
        raise GpfmError(f"{where}: task name '{name}' must use letters, digits, '.', '_' or '-' only")
    if category not in CATEGORIES:
        raise GpfmError(f"{where}: unknown category '{category}' (valid: {', '.join(CATEGORIES)})")
    variables = dict(variables or {})
    base_dir = Path(base_dir).resolve()

    def path(value: Any, key: str) -> Path:
        p = Path(_substitute(str(value), variables, f"{where}: {key}"))
        return p if p.is_absolute() else (base_dir / p).resolve()

    labels = path(data["labels"], "labels") if data.get("labels") else None
    if labels is not None and not labels.is_file():
        raise GpfmError(f"{where}: label table {labels} not found; fix 'labels' (relative to {base_dir})")
    from gpfm.arena.splits import PROTOCOLS, validate_split_spec

    split = _mapping(data.get("split") or {}, where, "split")
    split = {k: _substitute(v, variables, f"{where}: split.{k}") if isinstance(v, str) else v
             for k, v in split.items()}
    if not split:
        split = {"protocol": "external"} if data.get("external") is not None else dict(DEFAULT_SPLIT[category])
    validate_split_spec(split, where)
    split = {"protocol": split["protocol"], **{k: v for k, v in PROTOCOLS[split["protocol"]].items()
                                               if v is not None}, **split}  # defaults filled in
    external = None
    if data.get("external") is not None:
        ext = _mapping(data["external"], where, "external")
        bad = sorted(set(ext) - {"labels", "features"})
        if bad or "labels" not in ext:
            raise GpfmError(f"{where}: 'external' needs 'labels' and optional 'features' (got {', '.join(ext)})")
        ext_labels = path(ext["labels"], "external.labels")
        if not ext_labels.is_file():
            raise GpfmError(f"{where}: external label table {ext_labels} not found; fix 'external.labels'")
        external = ExternalSpec(ext_labels, _substitute(str(ext.get("features", DEFAULT_FEATURES)), variables,
                                                        f"{where}: external.features"))
    return TaskSpec(
        name=name, category=category, labels=labels,
        features=_substitute(str(data.get("features") or DEFAULT_FEATURES), variables, f"{where}: features"),
        split=split, primary_metric=str(data.get("primary_metric") or DEFAULT_PRIMARY_METRIC[category]),
        settings=_mapping(data.get("settings") or {}, where, "settings"), external=external,
        meta=_mapping(data.get("meta") or {}, where, "meta"), base_dir=base_dir, source=where)


def _mapping(value: Any, where: str, key: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise GpfmError(f"{where}: '{key}' must be a mapping, got {value!r}")
    return dict(value)


def load_task(path: str | Path, variables: Mapping[str, str] | None = None,
              overrides: list[str] | None = None) -> TaskSpec:
    """Load one task spec YAML file."""
    path = Path(path).resolve()
    return task_from_dict(load_yaml(path), path.parent, str(path), variables, overrides)


def load_suite(path: str | Path, variables: Mapping[str, str] | None = None,
               overrides: list[str] | None = None) -> Suite:
    """Load a suite YAML (`name`, `tasks`, optional `vars`); `variables` override the suite's vars.

    `overrides` are dotted `key=value` strings applied to every task (e.g. settings.epochs=5).
    """
    path = Path(path).resolve()
    data = load_yaml(path)
    bad = sorted(set(data) - {"name", "tasks", "vars", "meta"})
    if bad:
        raise GpfmError(f"{path}: unknown suite key '{bad[0]}' (valid: name, tasks, vars, meta)")
    tasks_raw = data.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise GpfmError(f"{path}: a suite needs a non-empty 'tasks:' list (spec files or inline specs)")
    vars_ = {k: str(v) for k, v in _mapping(data.get("vars") or {}, str(path), "vars").items()}
    # suite vars that look like paths are relative to the suite file
    vars_ = {k: str((path.parent / v).resolve()) if _looks_like_path(v) else v for k, v in vars_.items()}
    vars_.update(variables or {})
    tasks: list[TaskSpec] = []
    for i, entry in enumerate(tasks_raw):
        if isinstance(entry, str):
            spec_path = Path(_substitute(entry, vars_, f"{path}: tasks[{i}]"))
            spec_path = spec_path if spec_path.is_absolute() else (path.parent / spec_path)
            tasks.append(load_task(spec_path, vars_, overrides))
        else:
            tasks.append(task_from_dict(entry, path.parent, f"{path}#tasks[{i}]", vars_, overrides))
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise GpfmError(f"{path}: task name(s) used twice: {', '.join(dup)}")
    return Suite(str(data.get("name") or path.stem), tasks, path)


def _looks_like_path(v: str) -> bool:
    return v.startswith((".", "/", "~")) or "/" in v
