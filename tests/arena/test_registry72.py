"""The paper's 72 task specs: counts, names, every spec valid for the arena loader, the public suite, the CLI."""

from __future__ import annotations

import importlib
from collections import Counter

import pytest

from gpfm.arena import metrics
from gpfm.arena.registry72 import GPFM72, category_counts, list_tasks
from gpfm.arena.runner import HANDLERS
from gpfm.arena.tasks import load_suite
from gpfm.cli import main

# GPFM-METHOD.md §5.1, in the paper's order (task names made path-safe where they had spaces).
WSI_INTERNAL = ["TCGA-NSCLC", "CPTAC-NSCLC", "Center-1-LMD2", "Center-1-LMD6", "TCGA-RCC", "CAMELYON",
                "TCGA-BRCA_IDC_ILC", "BRACS-3", "BRACS-7", "PANDA", "TCGA-LUAD-TP53", "TCGA-GBMLGG-IDH1",
                "UBC-OCEAN", "TCGA-GBMLGG", "IMP-CRS", "GC-Primary-Site", "GC-T-Stage", "TCGA-STAD-Lauren",
                "Center-1-Vascular", "Center-1-Perineural"]
WSI_EXTERNAL = ["Center-1-NSCLC", "Center-2-LMD2", "Center-2-LMD6", "Center-3-RCC", "Center-3-LD", "Center-3-BRCA",
                "EBRAINS-IDH1", "Center-3-Ovary", "EBRAINS-Subtyping", "Center-3-Colon-WSI", "Center-4-Lauren",
                "Center-5-Lauren", "Center-4-Vascular", "Center-5-Vascular", "Center-4-Perineural",
                "Center-5-Perineural", "HANCOCK", "Center-3-TIL", "Center-3-Colon", "Center-3-GC"]
SURVIVAL = [f"TCGA-{c}-Survival" for c in ("BRCA", "BLCA", "KIRC", "KIRP", "STAD", "CESC", "LUAD", "LUSC",
                                           "COADREAD", "GBM", "LGG", "HNSC", "SKCM")] + ["CPTAC-LUAD-Survival"]
ROI = ["CRC100K", "CCRCC-TCGA-HEL", "BACH", "BreakHis", "UniToPatho", "CRC-MSI", "PanCancer-TCGA", "PanCancer-TIL",
       "ESCA", "PCAM", "WSSS4LUAD", "Chaoyang", "GasHisDB"]
OTHERS = ["CRC-Tissue-Retrieval", "PathVQA", "WSI-VQA", "TCGA-Report", "PatchGastricADC22"]


@pytest.fixture(scope="module")
def rows():
    return list_tasks()


def test_exactly_the_papers_72_tasks(rows):
    assert [r["name"] for r in rows] == WSI_INTERNAL + WSI_EXTERNAL + SURVIVAL + ROI + OTHERS
    assert category_counts(rows) == {"wsi_classification": 40, "wsi_external": 20, "survival": 14,
                                     "roi_classification": 13, "retrieval": 1, "vqa": 2, "report_generation": 2}
    for r in rows:
        assert r["cohort"] and r["primary_metric"], r["name"]
        if r["group"] == "external" and r["trained_on"]:
            assert r["trained_on"] in WSI_INTERNAL + SURVIVAL, r["name"]
    # "Center-k" cohorts are private, so are the external tests trained on them.
    assert not any(r["public"] for r in rows if r["name"].startswith("Center-"))


def test_every_spec_validates_with_the_arena_loader(tmp_path, rows):
    """Fake data root with every label table the specs expect: the whole suite loads, handlers accept it."""
    import yaml

    for r in rows:
        spec = yaml.safe_load(open(r["spec"]))
        for tmpl in (spec["labels"], (spec.get("external") or {}).get("labels")):
            if tmpl:
                p = tmp_path / tmpl.replace("{root}/", "")
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("slide_id,case_id,label\n")
        meta = spec["meta"]
        assert {"title", "group", "cohort", "label", "public", "source"} <= set(meta), r["name"]
    suite = load_suite(GPFM72, {"root": str(tmp_path)})
    assert len(suite.tasks) == 72 and len({t.name for t in suite.tasks}) == 72
    for t in suite.tasks:
        assert t.labels.is_relative_to(tmp_path) and "{" not in str(t.labels)
        assert t.features.startswith("{features}/") and t.features.endswith("/{encoder}")
        assert (t.external is not None) == (t.split.get("protocol") == "external"), t.name
    for cat, mod in HANDLERS.items():
        try:
            handler = importlib.import_module(mod)
        except ModuleNotFoundError:
            continue  # a category whose handler is not in this checkout yet
        for t in (t for t in suite.tasks if t.category == cat):
            if hasattr(handler, "validate"):
                handler.validate(t)
            metrics.get_metric(t.primary_metric)
    assert all(r["data"] == "yes" for r in list_tasks(root=tmp_path))


def test_public_suite_is_the_public_subset(rows):
    names = [r["name"] for r in list_tasks(GPFM72.with_name("gpfm72-public.yaml"))]
    assert names == [r["name"] for r in rows if r["public"]]
    assert Counter(r["category"] for r in rows if r["public"])["survival"] == 14
    assert 40 <= len(names) < 72


def test_arena_tasks_cli(tmp_path, capsys):
    (tmp_path / "TCGA-RCC").mkdir()
    (tmp_path / "TCGA-RCC" / "labels.csv").write_text("slide_id,case_id,label\n")
    assert main(["arena", "tasks", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + 72 + 2
    line = next(ln for ln in out if ln.startswith("TCGA-RCC "))
    assert line.split()[-1] == "yes" and next(ln for ln in out if ln.startswith("Center-3-RCC ")).split()[-1] == "no"
    assert "1 of 72 task(s) ready" in out[-1]
    assert main(["arena", "tasks", "--public"]) == 0
    assert "50 public" in capsys.readouterr().out
