"""Task specs and suites: defaults, path resolution, variables, overrides and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gpfm.arena.tasks import DEFAULT_SPLIT, load_suite, load_task, task_from_dict
from gpfm.io import GpfmError

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_spec_defaults_and_paths(tmp_path):
    (tmp_path / "specs").mkdir()
    (tmp_path / "labels.csv").write_text("slide_id,case_id,label\n")
    spec = _write(tmp_path / "specs" / "t.yaml", {"name": "t1", "category": "survival", "labels": "../labels.csv"})
    t = load_task(spec)
    assert t.labels == (tmp_path / "labels.csv").resolve()
    assert t.split == DEFAULT_SPLIT["survival"] and t.primary_metric == "c_index"
    assert t.features_dir("/feat", "uni") == Path("/feat/uni")
    t2 = task_from_dict({"name": "t2", "category": "wsi_classification", "labels": "labels.csv",
                         "split": {"protocol": "monte_carlo", "k": 3}, "external": {"labels": "labels.csv"}},
                        tmp_path)
    assert t2.split == {"protocol": "monte_carlo", "k": 3, "ratios": [0.8, 0.1, 0.1]}  # protocol defaults filled
    assert t2.external_features_dir("/feat", "uni") == Path("/feat/uni")
    t3 = task_from_dict({"name": "t3", "category": "wsi_classification", "labels": "labels.csv",
                         "external": {"labels": "labels.csv", "features": "{features}/ext/{encoder}"}}, tmp_path)
    assert t3.split["protocol"] == "external" and t3.external_features_dir("/f", "e") == Path("/f/ext/e")
    assert t2.fingerprint() != t3.fingerprint()


@pytest.mark.parametrize("data, msg", [
    ({"category": "survival", "labels": "l.csv"}, "missing 'name'"),
    ({"name": "x", "category": "segmentation", "labels": "l.csv"}, "unknown category"),
    ({"name": "x y", "category": "survival", "labels": "l.csv"}, "letters, digits"),
    ({"name": "x", "category": "survival", "labels": "nope.csv"}, "not found"),
    ({"name": "x", "category": "survival", "labels": "l.csv", "lables": 1}, "unknown key 'lables'"),
    ({"name": "x", "category": "survival", "labels": "l.csv", "split": {"protocol": "kfold", "folds": 3}},
     "unknown split setting 'folds'"),
    ({"name": "x", "category": "survival", "labels": "{cohort}/l.csv"}, r"\{cohort\} is not set"),
])
def test_spec_errors(tmp_path, data, msg):
    (tmp_path / "l.csv").write_text("slide_id\n")
    with pytest.raises(GpfmError, match=msg):
        task_from_dict(data, tmp_path, "spec.yaml")


def test_suite_vars_overrides_and_select(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "l.csv").write_text("slide_id\n")
    _write(tmp_path / "conf" / "a.yaml", {"name": "a", "category": "survival", "labels": "{cohort}/l.csv"})
    suite = _write(tmp_path / "conf" / "suite.yaml", {
        "name": "s", "vars": {"cohort": "../data"},
        "tasks": ["a.yaml", {"name": "b", "category": "wsi_classification", "labels": "{cohort}/l.csv",
                             "settings": {"epochs": 100}}]})
    s = load_suite(suite, overrides=["settings.epochs=3"])
    assert [t.name for t in s.tasks] == ["a", "b"] and s.tasks[0].labels == (data / "l.csv").resolve()
    assert all(t.settings["epochs"] == 3 for t in s.tasks)
    assert [t.name for t in s.select(["b"])] == ["b"]
    with pytest.raises(GpfmError, match="unknown task"):
        s.select(["zz"])
    other = tmp_path / "other"
    other.mkdir()
    (other / "l.csv").write_text("slide_id\n")
    assert load_suite(suite, {"cohort": str(other)}).tasks[0].labels == (other / "l.csv").resolve()
    _write(tmp_path / "conf" / "dup.yaml", {"name": "d", "tasks": ["a.yaml", "a.yaml"], "vars": {"cohort": "../data"}})
    with pytest.raises(GpfmError, match="used twice"):
        load_suite(tmp_path / "conf" / "dup.yaml")


def test_demo_suite_loads(tmp_path):
    """The shipped demo suite is valid against a cohort laid out as the demo writes it."""
    for d in ("labels", "roi"):
        (tmp_path / d).mkdir()
    for f in ("labels/wsi_classification.csv", "labels/survival.csv", "labels/reports.csv", "labels/wsi_vqa.csv",
              "roi/roi.csv", "roi/vqa.csv", "roi/captions.csv"):
        (tmp_path / f).write_text("slide_id,case_id\n")
    s = load_suite(REPO / "configs" / "arena" / "demo" / "suite.yaml", {"cohort": str(tmp_path)})
    assert {t.category for t in s.tasks} == {"wsi_classification", "survival", "roi_classification", "retrieval",
                                             "vqa", "report_generation"}
