"""`gpfm tile` end to end: outputs, every bad input of the issue, skip-and-report, resume after an interruption."""

from __future__ import annotations

import csv
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from gpfm import io as gio
from gpfm.cli import main
from gpfm.slides.tiling import read_coords

from .conftest import write_pyramid


def summary(out):
    with open(out / "tiling_summary.csv", newline="") as f:
        return {r["slide"]: r for r in csv.DictReader(f)}


def test_cmu_writes_coords_thumbnail_and_summary(shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["tile", str(shared_data / "cmu_small_region.svs"), "--out", str(out), "--target-mpp", "0.5",
               "--patch-size", "256", "--quiet"])
    assert rc == 0
    c = read_coords(out / "coords" / "cmu_small_region.h5")
    assert len(c) > 20 and c.patch_size == 256 and c.target_mpp == 0.5
    thumb = np.asarray(Image.open(out / "thumbnails" / "cmu_small_region.png"))
    assert max(thumb.shape[:2]) == 1024 and thumb.shape[2] == 3
    assert (np.abs(thumb.astype(int) - (0, 200, 0)).sum(-1) == 0).sum() > 500  # the tissue contour is drawn
    assert (np.abs(thumb.astype(int) - (30, 60, 255)).sum(-1) == 0).sum() > 500  # and the tiles
    row = summary(out)["cmu_small_region"]
    assert row["status"] == "ok" and int(row["tiles"]) == len(c) and float(row["mpp"]) == 0.499
    assert list(row) == ["slide", "status", "tiles", "tissue_fraction", "mpp", "seconds", "error", "path"]
    assert "tile: 1 ok" in capsys.readouterr().out
    assert not list(out.rglob("*.tmp"))


def test_bad_inputs_are_reported_and_the_batch_goes_on(shared_data, tmp_path, blank_slide, capsys):
    src = tmp_path / "slides"
    src.mkdir()
    shutil.copy(shared_data / "fixtures" / "unopenable.tiff", src)
    shutil.copy(shared_data / "fixtures" / "small.svs", src)
    shutil.copy(shared_data / "he_target_tile.png", src / "nompp.png")
    shutil.copy(blank_slide, src / "blank.tiff")
    out = tmp_path / "out"
    rc = main(["tile", str(src), "--out", str(out), "--patch-size", "64", "--workers", "1", "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    rows = summary(out)
    assert rows["unopenable"]["status"] == "skipped" and "unopenable.tiff" in rows["unopenable"]["error"]
    assert rows["nompp"]["status"] == "skipped" and "--mpp" in rows["nompp"]["error"]
    assert rows["blank"]["status"] == "no_tissue" and rows["blank"]["tiles"] == "0"
    assert read_coords(out / "coords" / "blank.h5").coords.shape == (0, 2)  # the empty file exists
    assert (out / "thumbnails" / "blank.png").exists()
    assert "blank.tiff: no tissue found; wrote a coords file with 0 tiles" in err  # a warning, not a crash
    assert not (out / "coords" / "unopenable.h5").exists()
    # Re-run with the missing µm/px given: only that slide is done, the finished ones are skipped.
    (tmp_path / "mpp.csv").write_text("slide,mpp\nnompp.png,0.5\n")
    before = (out / "coords" / "blank.h5").stat().st_mtime_ns
    rc = main(["tile", str(src), "--out", str(out), "--patch-size", "64", "--mpp-csv", str(tmp_path / "mpp.csv"),
               "--quiet"])
    rows = summary(out)
    assert rc == 1 and rows["nompp"]["status"] == "ok" and int(rows["nompp"]["tiles"]) > 100
    assert rows["blank"]["status"] == "exists" and rows["small"]["status"] in ("exists", "no_tissue")
    assert (out / "coords" / "blank.h5").stat().st_mtime_ns == before


def test_missing_mpp_single_slide_and_override(shared_data, tmp_path):
    png = shared_data / "he_target_tile.png"
    assert main(["tile", str(png), "--out", str(tmp_path / "a"), "--quiet"]) == 1
    assert "--mpp" in summary(tmp_path / "a")["he_target_tile"]["error"]
    assert main(["tile", str(png), "--out", str(tmp_path / "b"), "--mpp", "0.5", "--quiet"]) == 0
    c = read_coords(tmp_path / "b" / "coords" / "he_target_tile.h5")
    assert c.attrs["mpp_source"] == "override" and len(c) == 16  # 1000 px tissue: 4 x 4 tiles of 256


def test_unwritable_out_fails_before_any_work(shared_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = main(["tile", str(shared_data / "cmu_small_region.svs"), "--out", str(blocker / "out"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "not writable" in err and "--out" in err and len(err.strip().splitlines()) == 1
    assert main(["tile", str(tmp_path / "nothing_here"), "--out", str(tmp_path / "o")]) == 2
    assert main(["tile", str(shared_data / "cmu_small_region.svs"), "--out", str(tmp_path / "o"),
                 "--target-mpp", "0.1", "--quiet"]) == 1
    assert "finer than" in summary(tmp_path / "o")["cmu_small_region"]["error"]


@pytest.fixture
def three_slides(tmp_path, he_rgb):
    src = tmp_path / "three"
    src.mkdir()
    for k in range(3):
        canvas = np.full((768, 768, 3), 245, np.uint8)
        canvas[128 * k:128 * k + 512, 128:640] = he_rgb[:512, :512]
        write_pyramid(src / f"s{k}.tiff", canvas, mpp=0.5, levels=2)
    return src


def test_interrupted_batch_resumes_and_never_shows_half_files(three_slides, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    assert main(["tile", str(three_slides), "--out", str(ref), "--patch-size", "128", "--quiet"]) == 0
    out = tmp_path / "out"
    (out / "coords").mkdir(parents=True)
    (out / "coords" / "s2.h5.tmp").write_bytes(b"left by a killed run")  # a stale temporary file
    real_replace, renames = os.replace, []

    def killed_on_second_coords(src, dst):
        if str(dst).endswith(".h5"):
            renames.append(dst)
            if len(renames) == 2:  # the process dies with s1's coords fully written but not renamed
                raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(gio.os, "replace", killed_on_second_coords)
    rc = main(["tile", str(three_slides), "--out", str(out), "--patch-size", "128", "--workers", "1", "--quiet"])
    assert rc == 130
    assert sorted(p.name for p in (out / "coords").glob("*.h5")) == ["s0.h5"]  # complete files only
    monkeypatch.setattr(gio.os, "replace", real_replace)
    rc = main(["tile", str(three_slides), "--out", str(out), "--patch-size", "128", "--workers", "2", "--quiet"])
    assert rc == 0
    rows = summary(out)
    assert [rows[s]["status"] for s in ("s0", "s1", "s2")] == ["exists", "ok", "ok"]
    assert not list(out.rglob("*.tmp"))
    for k in range(3):  # identical to the uninterrupted run, whichever worker did it
        a, b = read_coords(ref / "coords" / f"s{k}.h5"), read_coords(out / "coords" / f"s{k}.h5")
        assert np.array_equal(a.coords, b.coords) and len(a) > 0
    assert [int(rows[f"s{k}"]["tiles"]) for k in range(3)] == [len(read_coords(ref / "coords" / f"s{k}.h5"))
                                                              for k in range(3)]


def test_csv_input_with_mpp_column_and_overwrite(shared_data, tmp_path):
    lst = tmp_path / "list.csv"
    lst.write_text(f"path,mpp\n{shared_data / 'he_target_tile.png'},1.0\n")
    out = tmp_path / "out"
    assert main(["tile", str(lst), "--out", str(out), "--target-mpp", "1.0", "--patch-size", "128",
                 "--quiet"]) == 0
    # 1000 px of tissue: 8 x 8 tiles of 128 px; the last row and column reach past the edge but are 81% tissue.
    assert len(read_coords(out / "coords" / "he_target_tile.h5")) == 64
    assert main(["tile", str(lst), "--out", str(out), "--target-mpp", "2.0", "--patch-size", "128",
                 "--overwrite", "--quiet"]) == 0
    assert read_coords(out / "coords" / "he_target_tile.h5").patch_size_level0 == 256
    rc = main(["tile", str(lst), "--out", str(out), "--target-mpp", "1.0", "--patch-size", "128", "--quiet"])
    assert rc == 1 and "--overwrite" in summary(out)["he_target_tile"]["error"]  # other geometry: not mixed
    (tmp_path / "bad.csv").write_text("slide\nx.svs\n")
    assert main(["tile", str(tmp_path / "bad.csv"), "--out", str(out)]) == 2
