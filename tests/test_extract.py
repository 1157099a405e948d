"""`gpfm extract` on real H&E/IHC pixels in pyramidal TIFFs tiled by `gpfm tile`'s own code."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from gpfm.cli import main
from gpfm.encoders import create_encoder
from gpfm.extract import extract_slides
from gpfm.io import GpfmError, read_h5
from gpfm.slides.reader import open_slide
from gpfm.slides.tiling import TilingParams, read_coords, read_tile, tile_one, write_coords

ENCODERS = ["tiny-vit", "tiny-cnn"]


def write_pyramid(path: Path, rgb: np.ndarray, mpp: float, levels: int) -> Path:
    img = Image.fromarray(rgb)
    with tifffile.TiffWriter(path) as tw:
        for k in range(levels):
            tw.write(np.asarray(img), tile=(128, 128), compression="zlib", photometric="rgb",
                     subfiletype=1 if k else 0, resolution=(1e4 / (mpp * 2**k),) * 2, resolutionunit="CENTIMETER")
            img = img.reduce(2)
    return path


@pytest.fixture(scope="module")
def cohort(shared_data, tmp_path_factory) -> Path:
    """slides/{he,he_flip,ihc}.tiff + coords/ from the tiler (0.75 µm/px, 112 px tiles: a few per slide)."""
    root = tmp_path_factory.mktemp("cohort")
    (root / "slides").mkdir()
    he = np.asarray(Image.open(shared_data / "he_target_tile.png").convert("RGB"))
    ihc = np.asarray(Image.open(shared_data / "ihc.png").convert("RGB"))
    canvas = np.full((1100, 1300, 3), 244, np.uint8)
    canvas[50:1050, 250:1250] = he
    write_pyramid(root / "slides" / "he.tiff", canvas, mpp=0.25, levels=2)  # read at level 1
    write_pyramid(root / "slides" / "he_flip.tiff", np.ascontiguousarray(canvas[::-1, ::-1]), mpp=0.25, levels=2)
    write_pyramid(root / "slides" / "ihc.tiff", ihc, mpp=0.5, levels=1)
    params = TilingParams(target_mpp=0.75, patch_size=112, tissue_threshold=0.5)
    for p in sorted((root / "slides").iterdir()):
        assert tile_one(p, root, params)["status"] == "ok"
    return root


@pytest.fixture(scope="module")
def baseline(cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features")
    assert main(["extract", "--coords", str(cohort), "--slides", str(cohort / "slides"), "--encoder",
                 ",".join(ENCODERS), "--out", str(out), "--batch-size", "3", "--workers", "1", "--quiet"]) == 0
    return out


def _files(out: Path) -> dict[str, dict]:
    res = {}
    for f in sorted(out.glob("*/*.h5")):
        data, attrs = read_h5(f)
        res[f"{f.parent.name}/{f.name}"] = {**data, "attrs": attrs["features"]}
    return res


def test_features_equal_the_encoder_on_each_tile(cohort, baseline):
    for sid in ("he", "ihc"):
        coords = read_coords(cohort / "coords" / f"{sid}.h5")
        with open_slide(cohort / "slides" / f"{sid}.tiff") as s:
            tiles = torch.from_numpy(np.stack([read_tile(s, coords, i) for i in range(len(coords))]))
        for name in ENCODERS:
            enc = create_encoder(name)
            data, attrs = read_h5(baseline / name / f"{sid}.h5")
            with torch.inference_mode():
                want = enc(enc.transform.prepare_uint8(tiles)).numpy()
            assert data["features"].shape == (len(coords), enc.dim) and data["features"].dtype == np.float32
            assert np.array_equal(data["coords"], coords.coords)
            np.testing.assert_allclose(data["features"], want, atol=1e-5)
            a = attrs["features"]
            assert (a["encoder"], a["dim"], a["weights_sha256"]) == (name, enc.dim, "random")
            assert (a["patch_size_level0"], a["target_mpp"]) == (coords.patch_size_level0, 0.75)
            assert len(coords) > 4  # several batches
    rows = list(csv.DictReader(open(baseline / "extract_summary.csv")))
    assert sorted(r["item"] for r in rows) == ["he", "he_flip", "ihc"] and {r["status"] for r in rows} == {"ok"}


def test_resume_skips_finished_outputs_and_redoes_missing(cohort, baseline, tmp_path):
    out = tmp_path / "f"
    shutil.copytree(baseline, out)
    (out / "tiny-cnn" / "ihc.h5").unlink()
    mtime = (out / "tiny-vit" / "ihc.h5").stat().st_mtime_ns
    report = extract_slides(cohort, cohort / "slides", ENCODERS, out, batch_size=8, workers=0, quiet=True)
    status = {r["item"]: (r["status"], r.get("encoders")) for r in report.rows}
    assert status == {"he": ("exists", "tiny-vit;tiny-cnn"), "he_flip": ("exists", "tiny-vit;tiny-cnn"),
                      "ihc": ("ok", "tiny-cnn")}
    assert (out / "tiny-vit" / "ihc.h5").stat().st_mtime_ns == mtime
    a, b = _files(out), _files(baseline)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k]["features"], b[k]["features"], atol=1e-6)


def test_killed_run_loses_only_the_slide_in_flight(cohort, baseline, tmp_path, monkeypatch):
    import gpfm.extract as ex

    out = tmp_path / "f"
    real, calls = ex._write_slide, []

    def dying(job, feats, models, out_dir):
        if calls:
            raise KeyboardInterrupt  # killed while the second slide is being written
        calls.append(job.slide_id)
        real(job, feats, models, out_dir)

    monkeypatch.setattr(ex, "_write_slide", dying)
    with pytest.raises(KeyboardInterrupt):
        extract_slides(cohort, cohort / "slides", ENCODERS, out, batch_size=4, workers=0, quiet=True)
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [f"{calls[0]}.h5"] * 2  # no .tmp left over
    monkeypatch.setattr(ex, "_write_slide", real)
    report = extract_slides(cohort, cohort / "slides", ENCODERS, out, batch_size=4, workers=0, quiet=True)
    assert sorted(r["status"] for r in report.rows) == ["exists", "ok", "ok"]
    a, b = _files(out), _files(baseline)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k]["features"], b[k]["features"], atol=1e-6)


def test_bad_inputs_are_reported_and_the_rest_done(cohort, shared_data, tmp_path, capsys):
    coords = tmp_path / "coords"
    slides = tmp_path / "slides"
    coords.mkdir()
    slides.mkdir()
    shutil.copy(cohort / "coords" / "ihc.h5", coords / "ihc.h5")
    shutil.copy(cohort / "slides" / "ihc.tiff", slides / "ihc.tiff")
    shutil.copy(cohort / "coords" / "ihc.h5", coords / "lost.h5")  # no slide file
    c = read_coords(cohort / "coords" / "ihc.h5")
    write_coords(coords / "empty.h5", np.zeros((0, 2), np.int64), {**c.attrs, "name": "empty"})
    shutil.copy(cohort / "slides" / "ihc.tiff", slides / "empty.tiff")
    shutil.copy(cohort / "coords" / "ihc.h5", coords / "broken.h5")
    shutil.copy(shared_data / "fixtures" / "unopenable.tiff", slides / "broken.tiff")
    out = tmp_path / "out"
    code = main(["extract", "--coords", str(coords), "--slides", str(slides), "--encoder", "tiny-vit",
                 "--out", str(out), "--workers", "1", "--quiet"])
    assert code == 1
    rows = {r["item"]: r for r in csv.DictReader(open(out / "extract_summary.csv"))}
    assert rows["ihc"]["status"] == rows["empty"]["status"] == "ok"
    assert rows["lost"]["status"] == "skipped" and "no slide file named lost" in rows["lost"]["error"]
    assert rows["broken"]["status"] == "skipped" and "broken.tiff" in rows["broken"]["error"]
    with h5py.File(out / "tiny-vit" / "empty.h5") as f:
        assert f["features"].shape == (0, 96) and f["coords"].shape == (0, 2)
    assert not (out / "tiny-vit" / "broken.h5").exists() and not (out / "tiny-vit" / "lost.h5").exists()


def test_cli_errors_are_one_line(cohort, tmp_path, capsys):
    base = ["extract", "--coords", str(cohort), "--slides", str(cohort / "slides"), "--out", str(tmp_path / "o")]
    assert main([*base, "--encoder", "tiny-vitt"]) == 2
    assert "did you mean tiny-vit" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*base, "--encoder", "tiny-vit", "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    create = create_encoder("tiny-vit")
    from gpfm.encoders.weights import save_weights

    save_weights(create, tmp_path / "vit.safetensors")
    assert main([*base, "--encoder", "tiny-cnn", "--weights", str(tmp_path / "vit.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "weights do not fit tiny-cnn" in err and "missing" in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--encoder", "tiny-vit,tiny-cnn", "--weights", str(tmp_path / "vit.safetensors")]) == 2
    assert "give name=PATH for each" in capsys.readouterr().err
    assert main([*base, "--encoder", "tiny-vit", "--weights", f"tiny-vit={tmp_path / 'vit.safetensors'}",
                 "--quiet"]) == 0
    _, attrs = read_h5(tmp_path / "o" / "tiny-vit" / "he.h5")
    assert attrs["features"]["weights_sha256"] == create_encoder(
        "tiny-vit", weights=tmp_path / "vit.safetensors").weights_sha256 != "random"


def test_bf16_autocast_stays_close_to_fp32(cohort, baseline, tmp_path):
    out = tmp_path / "bf16"
    extract_slides(cohort / "coords", cohort / "slides", ["tiny-vit"], out, batch_size=16, workers=0,
                   precision="bf16", quiet=True)
    a = read_h5(out / "tiny-vit" / "ihc.h5")[0]["features"]
    b = read_h5(baseline / "tiny-vit" / "ihc.h5")[0]["features"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99 and not np.array_equal(a, b)


def test_image_sets_folder_and_csv(shared_data, tmp_path):
    he = Image.open(shared_data / "he_target_tile.png").convert("RGB")
    ihc = Image.open(shared_data / "ihc.png").convert("RGB")
    root = tmp_path / "roi"
    for split, n in (("train", 3), ("test", 2)):
        for cls, src in (("he", he), ("ihc", ihc)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                src.crop((40 * i, 30 * i, 40 * i + 150 + 10 * i, 30 * i + 130)).save(root / split / cls / f"{i}.png")
    (root / "train" / "he" / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "feat"
    assert main(["extract", "--images", str(root), "--encoder", "tiny-vit,tiny-cnn", "--out", str(out),
                 "--batch-size", "4", "--workers", "1", "--quiet"]) == 1  # the bad image is skipped, reported
    enc = create_encoder("tiny-cnn")
    data, _ = read_h5(out / "tiny-cnn" / "train.h5")
    assert sorted(data["labels"]) == ["he"] * 3 + ["ihc"] * 3 and "train/he/0.png" in data["paths"]
    k = list(data["paths"]).index("train/ihc/2.png")
    x = torch.from_numpy(np.array(Image.open(root / "train/ihc/2.png")))[None]
    with torch.inference_mode():
        np.testing.assert_allclose(data["features"][k], enc(enc.transform.prepare_uint8(x))[0].numpy(), atol=1e-5)
    assert read_h5(out / "tiny-vit" / "test.h5")[0]["features"].shape == (4, 96)
    rows = list(csv.DictReader(open(out / "extract_summary.csv")))
    assert any(r["status"] == "skipped" and "bad.png" in r["error"] for r in rows)
    # the same set as a CSV without a split column -> one "all" split, paths as given
    with open(tmp_path / "set.csv", "w") as f:
        f.write("path,label\nroi/train/he/0.png,a\nroi/test/ihc/1.png,b\n")
    assert main(["extract", "--images", str(tmp_path / "set.csv"), "--encoder", "tiny-cnn", "--out",
                 str(tmp_path / "c"), "--workers", "0", "--quiet"]) == 0
    data, _ = read_h5(tmp_path / "c" / "tiny-cnn" / "all.h5")
    assert list(data["paths"]) == ["roi/train/he/0.png", "roi/test/ihc/1.png"] and list(data["labels"]) == ["a", "b"]


def test_torchrun_two_ranks_equal_one_process(cohort, baseline, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29533", "-m", "gpfm", "extract",
           "--coords", str(cohort), "--slides", str(cohort / "slides"), "--encoder", ",".join(ENCODERS),
           "--out", str(out), "--batch-size", "4", "--workers", "0", "--quiet"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    parts = [list(csv.DictReader(open(out / f"extract_summary.rank{r}-of-2.csv"))) for r in range(2)]
    done = [r["item"] for p in parts for r in p if r["status"] == "ok"]
    assert sorted(done) == ["he", "he_flip", "ihc"]  # every slide once, by exactly one rank
    assert all(p for p in parts)  # both ranks worked
    merged = list(csv.DictReader(open(out / "extract_summary.csv")))
    assert sorted(r["item"] for r in merged) == sorted(done)
    a, b = _files(out), _files(baseline)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k]["features"], b[k]["features"], atol=1e-5)
        assert np.array_equal(a[k]["coords"], b[k]["coords"])


def test_labels_name_output_folders_for_one_architecture_with_two_weights(tmp_path):
    """`--encoder a=tiny-vit,b=tiny-vit` loads each label's weights and writes OUT/a, OUT/b."""
    from gpfm.encoders.weights import save_weights
    from gpfm.extract import load_encoders, parse_encoders

    save_weights(create_encoder("tiny-vit", seed=1), tmp_path / "w1.safetensors")
    assert parse_encoders(["a=tiny-vit", "tiny-cnn"]) == {"a": "tiny-vit", "tiny-cnn": "tiny-cnn"}
    models = load_encoders(["a=tiny-vit", "b=tiny-vit"], f"a={tmp_path / 'w1.safetensors'}", "cpu")
    x = torch.rand(2, 3, 224, 224)
    assert not torch.allclose(models["a"](x), models["b"](x))
    assert torch.allclose(models["a"](x), create_encoder("tiny-vit", seed=1)(x))
    with pytest.raises(GpfmError, match="given twice"):
        parse_encoders(["tiny-vit", "tiny-vit"])
