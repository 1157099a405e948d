"""The demo cohort: layout and tables, determinism, OpenSlide-readable slides, and real hidden signals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
import tiffslide
from PIL import Image
from scipy import ndimage as ndi
from skimage.measure import label as connected
from skimage.measure import regionprops

from gpfm.demo.cohort import make_cohort
from gpfm.io import GpfmError


@pytest.fixture
def cohort(demo_cohort) -> Path:
    return demo_cohort


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_tables(cohort):
    c = json.loads((cohort / "cohort.json").read_text())
    assert c["seed"] == c["params"]["seed"] == 3 and len(c["patients"]) == 18
    assert sorted(p.name for p in cohort.iterdir()) == ["cohort.json", "labels", "roi", "slides"]
    assert sorted(p.name for p in (cohort / "labels").iterdir()) == [
        "reports.csv", "survival.csv", "wsi_classification.csv", "wsi_vqa.csv"]
    assert sorted(p.name for p in (cohort / "roi").iterdir()) == ["captions.csv", "images", "roi.csv", "vqa.csv"]
    assert sorted(p.name for p in (cohort / "slides").iterdir()) == sorted(Path(s["file"]).name
                                                                           for s in c["slides"])
    assert {s["format"] for s in c["slides"]} == {"tiff", "svs"}
    cols = {"wsi_classification": ["slide_id", "case_id", "label"],
            "survival": ["slide_id", "case_id", "time", "event"], "reports": ["slide_id", "case_id", "report"],
            "wsi_vqa": ["slide_id", "case_id", "question", "answer", "choices"]}
    tables = {k: pd.read_csv(cohort / "labels" / f"{k}.csv") for k in cols}
    for k, want in cols.items():
        assert list(tables[k].columns) == want, k
    slide_ids = [s["slide_id"] for s in c["slides"]]
    for k in ("wsi_classification", "survival", "reports"):
        assert tables[k]["slide_id"].tolist() == slide_ids
    by_slide = {s["slide_id"]: s for s in c["slides"]}
    for r in tables["wsi_classification"].itertuples():
        assert r.label == by_slide[r.slide_id]["label"] and r.case_id == by_slide[r.slide_id]["case_id"]
    vqa = tables["wsi_vqa"]
    assert all(a in ch.split("|") for a, ch in zip(vqa.answer.astype(str), vqa.choices))

    roi = pd.read_csv(cohort / "roi" / "roi.csv")
    assert list(roi.columns) == ["path", "label", "split", "grade"]
    assert set(roi.label) == {"normal", "ductal", "lobular"} and set(roi.split) == {"train", "val", "test"}
    for p, lab in zip(roi.path, roi.label):
        assert p.startswith(f"images/{lab}/") and (cohort / "roi" / p).is_file()
    assert Image.open(cohort / "roi" / roi.path[0]).size == (224, 224)
    assert list(pd.read_csv(cohort / "roi" / "vqa.csv").columns) == ["path", "question", "answer"]
    cap = pd.read_csv(cohort / "roi" / "captions.csv")
    assert list(cap.columns) == ["path", "caption"] and set(cap.path) == set(roi.path)
    # the ROI split is by patient: no case in two splits
    case = roi.path.str.extract(r"/(DEMO-\d+)-S")[0]
    assert (roi.groupby(case)["split"].nunique() == 1).all()


def test_patients_share_hidden_variables_and_survival(cohort, demo_small):
    c = json.loads((cohort / "cohort.json").read_text())
    n = demo_small["n_patients"]
    two = [p for p in c["patients"] if len(p["slides"]) == 2]
    assert len(two) == round(demo_small["two_slide_fraction"] * n) > 0
    by_slide = {s["slide_id"]: s for s in c["slides"]}
    for p in c["patients"]:
        assert {(by_slide[s]["label"], by_slide[s]["grade"]) for s in p["slides"]} == {(p["label"], p["grade"])}
    surv = pd.read_csv(cohort / "labels" / "survival.csv")
    assert set(surv.event) <= {0, 1} and (surv.time > 0).all()
    per_case = surv.groupby("case_id").agg(time=("time", "nunique"), event=("event", "nunique"))
    assert (per_case == 1).all().all()
    events = [p["event"] for p in c["patients"]]
    assert events.count(0) == round(0.3 * n)  # censored share
    hazard = {p["grade"]: p["hazard"] for p in c["patients"]}
    assert hazard[1] < hazard[2] < hazard[3]


def test_deterministic_for_a_seed(tmp_path):
    tiny = dict(n_patients=4, two_slide_fraction=0.25, slide_size=(768, 896), roi_per_slide=2, quiet=True)
    make_cohort(tmp_path / "a", seed=7, workers=1, **tiny)
    make_cohort(tmp_path / "b", seed=7, workers=2, **tiny)  # the worker count must not matter
    make_cohort(tmp_path / "c", seed=8, workers=1, **tiny)
    a, b, c = (_digests(tmp_path / k) for k in "abc")
    assert a == b and len(a) > 10
    assert a["cohort.json"] != c["cohort.json"]
    slides_a = {v for k, v in a.items() if k.startswith("slides/")}
    assert len(slides_a) == 5 and not slides_a & {v for k, v in c.items() if k.startswith("slides/")}


def test_slides_open_with_levels_and_mpp(cohort):
    from gpfm.slides.reader import open_slide

    c = json.loads((cohort / "cohort.json").read_text())
    for s in c["slides"]:
        path = cohort / s["file"]
        with openslide.OpenSlide(str(path)) as sl:
            assert sl.properties["openslide.vendor"] == ("aperio" if s["format"] == "svs" else "generic-tiff")
            assert float(sl.properties["openslide.mpp-x"]) == pytest.approx(0.5)
            assert float(sl.properties["openslide.mpp-y"]) == pytest.approx(0.5)
            assert [list(d) for d in sl.level_dimensions] == s["levels"]
            assert sl.level_dimensions[0] == (s["width"], s["height"])
            assert sl.level_downsamples == pytest.approx((1, 4, 16))
            for x, y in ((0, 0), (s["width"] - 48, s["height"] - 48)):  # white glass all round the tissue
                assert np.asarray(sl.read_region((x, y), 0, (48, 48)).convert("RGB")).min() > 200
        with tiffslide.TiffSlide(path) as sl:  # the fallback reader sees the same pyramid
            assert [list(d) for d in sl.level_dimensions] == s["levels"]
            assert float(sl.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)
            assert ("thumbnail" in sl.associated_images) == (s["format"] == "svs")
        with open_slide(path) as sl:
            assert sl.mpp == pytest.approx(0.5) and sl.level_count == 3


def _nuclei(rgb: np.ndarray) -> tuple[float, float]:
    """Share of haematoxylin-dark pixels, and the typical nucleus radius: 90th percentile of the distance
    transform over those pixels (robust to touching nuclei)."""
    nuc = rgb[..., 0] < 150
    edt = ndi.distance_transform_edt(nuc)
    return float(nuc.mean()), float(np.percentile(edt[nuc], 90)) if nuc.any() else 0.0


def test_class_signal_lives_in_the_tumour_regions(cohort):
    roi = pd.read_csv(cohort / "roi" / "roi.csv")
    stats = {lab: np.array([_nuclei(np.asarray(Image.open(cohort / "roi" / p)))
                            for p in roi.path[roi.label == lab]]) for lab in ("normal", "ductal", "lobular")}
    assert min(len(v) for v in stats.values()) >= 5
    frac = {k: v[:, 0].mean() for k, v in stats.items()}
    radius = {k: np.median(v[:, 1]) for k, v in stats.items()}
    assert frac["ductal"] > 2.5 * frac["normal"] and frac["lobular"] > 2.5 * frac["normal"]  # denser, darker
    assert radius["ductal"] > 1.3 * radius["lobular"] > 1.3 * radius["normal"]  # larger nuclei
    # on the slides themselves: where the cohort says tumour is, the slide is denser in nuclei than elsewhere
    c = json.loads((cohort / "cohort.json").read_text())
    for s in c["slides"]:
        if s["label"] == "benign":
            assert s["tumour_discs"] == [] and s["tumour_fraction"] == 0
            continue
        assert 0.05 < s["tumour_fraction"] < 0.5
        with openslide.OpenSlide(str(cohort / s["file"])) as sl:
            dens = {lab: [_nuclei(np.asarray(sl.read_region((t["x"], t["y"]), 0, (t["size"],) * 2).convert("RGB")))[0]
                          for t in s["roi"] if t["label"] == lab] for lab in (s["label"], "normal")}
        if dens[s["label"]] and dens["normal"]:
            assert np.mean(dens[s["label"]]) > 1.5 * np.mean(dens["normal"])


def test_grade_signal_in_the_stroma(cohort):
    """With grade, lymphocytes (small round dark blobs) get denser and the collagen fibres lose contrast,
    in tumour-free tiles too."""
    roi = pd.read_csv(cohort / "roi" / "roi.csv")
    lymph, fibre = {}, {}
    for g in (1, 2, 3):
        n, sd = [], []
        for p in roi.path[(roi.grade == g) & (roi.label == "normal")]:
            a = np.asarray(Image.open(cohort / "roi" / p)).astype(int)
            blobs = regionprops(connected(a[..., 0] < 150))
            n.append(sum(1 for b in blobs if 20 <= b.area <= 70 and b.eccentricity < 0.75))
            stroma = (a[..., 0] >= 150) & (a.sum(-1) < 680)
            sd.append(a[..., 1][stroma].std())
        lymph[g], fibre[g] = np.mean(n), np.mean(sd)
    assert lymph[1] < lymph[2] < lymph[3] and lymph[3] > 4 * lymph[1]
    assert fibre[1] > fibre[2] > fibre[3]


def test_reuse_conflict_and_bad_folders(cohort, demo_small, tmp_path):
    before = (cohort / "cohort.json").stat().st_mtime_ns
    assert make_cohort(cohort, seed=3, workers=1, quiet=True, **demo_small)["params"]["seed"] == 3
    assert (cohort / "cohort.json").stat().st_mtime_ns == before  # reused, not rebuilt
    with pytest.raises(GpfmError, match="other parameters"):
        make_cohort(cohort, seed=5, quiet=True, **demo_small)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(GpfmError, match="not a demo cohort"):
        make_cohort(foreign, seed=0, quiet=True, **demo_small)
    assert (foreign / "mine.txt").read_text() == "keep me"
    with pytest.raises(GpfmError, match="valid parameters"):
        make_cohort(tmp_path / "x", seed=0, no_such_option=1)
    with pytest.raises(GpfmError, match=r"n_patients >= 3; svs_every >= 1"):
        make_cohort(tmp_path / "y", seed=0, n_patients=1, svs_every=0)
    assert not (tmp_path / "y").exists()


def test_overwrite_replaces_a_cohort(demo_small, tmp_path):
    out = tmp_path / "c"
    small = demo_small | dict(n_patients=3, two_slide_fraction=0.0, roi_per_slide=2, slide_size=(512, 512))
    make_cohort(out, seed=0, workers=1, quiet=True, **small)
    c = make_cohort(out, seed=1, workers=1, quiet=True, overwrite=True, **small)
    assert json.loads((out / "cohort.json").read_text())["params"]["seed"] == 1 == c["params"]["seed"]
    assert len(list((out / "slides").iterdir())) == 3 and not (tmp_path / "c.partial").exists()
