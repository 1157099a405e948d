"""Sharded tile store: packing, manifest, streaming, resume, exclusion, bad input."""

from __future__ import annotations

import errno
import functools
import http.server
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch.utils.data import DataLoader

from gpfm.io import GpfmError, read_json
from gpfm.shards import pack as pack_mod
from gpfm.shards.pack import PackOptions, pack
from gpfm.shards.stream import ShardStream
from gpfm.slides.reader import open_slide
from gpfm.slides.tiling import write_coords

TILE = 32


def _slide(path: Path, seed: int, size: int = 256) -> None:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    res = (1e4 / 0.5, 1e4 / 0.5)  # 0.5 µm/px in pixels per centimetre
    with tifffile.TiffWriter(path) as w:
        w.write(img, tile=(64, 64), photometric="rgb", resolution=res, resolutionunit="CENTIMETER")
        w.write(img[::2, ::2].copy(), tile=(64, 64), photometric="rgb", subfiletype=1,
                resolution=(res[0] / 2, res[1] / 2), resolutionunit="CENTIMETER")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    (root / "slides").mkdir()
    (root / "coords").mkdir()
    for i, n in enumerate([12, 7, 9]):  # 28 tiles
        sid = f"s{i}"
        _slide(root / "slides" / f"{sid}.tiff", i)
        xy = np.array([[(k % 6) * 40, (k // 6) * 40] for k in range(n)], dtype=np.int64)
        write_coords(root / "coords" / f"{sid}.h5", xy, {
            "patch_size": TILE, "patch_size_level0": TILE, "level0_magnification": 20, "target_magnification": 20,
            "overlap": 0, "level0_width": 256, "level0_height": 256, "name": sid, "target_mpp": 0.5,
            "level0_mpp": 0.5, "read_level": 0, "tissue_threshold": 0.5})
    (root / "meta.csv").write_text("slide_id,source,tissue\ns0,tcga,lung\ns1,tcga,breast\ns2,cptac,lung\n")
    return root


def _pack(cohort, out, **kw) -> pack_mod.BatchReport:
    opts = dict(out=str(out), coords=str(cohort / "coords"), slides=str(cohort / "slides"), size=TILE,
                codec="png", tiles_per_shard=5, meta=str(cohort / "meta.csv"), quiet=True)
    opts.update(kw)
    return pack(PackOptions(**opts))


@pytest.fixture(scope="module")
def store(cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store")
    assert _pack(cohort, out).exit_code == 0
    return out


def _keys(stream_or_loader) -> list[tuple[str, int]]:
    out = []
    for _, meta in stream_or_loader:
        ids, tiles = meta["slide_id"], meta["tile"]
        if isinstance(ids, str):
            out.append((ids, int(tiles)))
        else:
            out += [(s, int(t)) for s, t in zip(ids, tiles)]
    return out


def test_lossless_roundtrip_and_manifest(cohort, store):
    manifest = read_json(store / "manifest.json")
    assert manifest["tiles"] == 28 and len(manifest["shards"]) == 6
    assert manifest["tiles_per_slide"] == {"s0": 12, "s1": 7, "s2": 9}
    assert manifest["tiles_per_source"] == {"cptac": 9, "tcga": 19}
    assert manifest["tiles_per_tissue"] == {"breast": 7, "lung": 21}
    stream = ShardStream(str(store), infinite=False, shuffle_buffer=1)
    n = 0
    slides = {f"s{i}": open_slide(cohort / "slides" / f"s{i}.tiff") for i in range(3)}
    for img, meta in stream:
        ref = slides[meta["slide_id"]].read_region((meta["x"], meta["y"]), 0, (TILE, TILE))
        assert np.array_equal(img.numpy(), ref)
        assert meta["level0_mpp"] == pytest.approx(0.5) and meta["size"] == TILE
        assert meta["tissue"] == {"s0": "lung", "s1": "breast", "s2": "lung"}[meta["slide_id"]]
        n += 1
    assert n == 28


def test_two_ranks_two_workers_each_tile_once_per_epoch(store):
    seen = []
    for rank in range(2):
        ds = ShardStream(str(store), infinite=False, rank=rank, world_size=2, seed=3, shuffle_buffer=4)
        seen += _keys(DataLoader(ds, batch_size=None, num_workers=2))
    assert len(seen) == 28 and len(set(seen)) == 28


def test_resumed_stream_continues_where_it_stopped(store):
    def loader(ds):
        ds.set_loader(batch_size=3, num_workers=2)
        return DataLoader(ds, batch_size=3, num_workers=2)

    full = ShardStream(str(store), seed=5, shuffle_buffer=6, rank=0, world_size=1)
    it = iter(loader(full))
    batches = [_keys([next(it)]) for _ in range(14)]  # > one epoch (28 tiles): crosses the epoch boundary
    state = full.state(consumed=8 * 3)

    resumed = ShardStream(str(store), seed=5, shuffle_buffer=6, rank=0, world_size=1)
    resumed.set_loader(batch_size=3, num_workers=2)
    resumed.load_state(state)
    it2 = iter(DataLoader(resumed, batch_size=3, num_workers=2))
    assert [_keys([next(it2)]) for _ in range(6)] == batches[8:]


def test_world_size_change_restarts_at_next_epoch(store, caplog):
    a = ShardStream(str(store), seed=1, rank=0, world_size=2)
    a.set_loader(4, 0)
    b = ShardStream(str(store), seed=1, rank=0, world_size=1)
    b.set_loader(4, 0)
    b.load_state(a.state(consumed=20))  # 2 ranks x 20 = 40 tiles seen: inside epoch 1
    assert b.start_epoch == 2 and b.consumed == 0
    assert "resuming at the start of epoch 2" in caplog.text


def test_sampling_weights_balance_groups(store):
    ds = ShardStream(str(store), infinite=False, weights={"lung": 1.0, "breast": 0.0}, shuffle_buffer=1)
    assert {s for s, _ in _keys(ds)} == {"s0", "s2"}


def test_exclusion_list_keeps_slides_out(cohort, tmp_path):
    (tmp_path / "exclude.csv").write_text("slide_id\ns1\n")
    _pack(cohort, tmp_path / "st", exclude=str(tmp_path / "exclude.csv"))
    m = read_json(tmp_path / "st" / "manifest.json")
    assert m["tiles"] == 21 and "s1" not in m["tiles_per_slide"] and m["excluded_slides"] == ["s1"]


def test_pack_resumes_across_ranks_and_never_rewrites(cohort, tmp_path, monkeypatch):
    out = tmp_path / "st"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    _pack(cohort, out)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000001.tar", "shard-000003.tar",
                                                          "shard-000005.tar"]
    assert not (out / "manifest.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    report = _pack(cohort, out)  # world size 1 now: packs only the 3 missing shards
    assert report.counts == {"ok": 3}
    assert all((out / n).stat().st_mtime_ns == t for n, t in before.items())
    assert read_json(out / "manifest.json")["tiles"] == 28


def test_other_inputs_refused_in_same_store(cohort, store):
    with pytest.raises(GpfmError, match="other inputs or settings"):
        _pack(cohort, store, tiles_per_shard=7)


def test_unreadable_slide_is_skipped_and_listed(cohort, tmp_path):
    bad = tmp_path / "cohort"
    shutil.copytree(cohort, bad)
    (bad / "slides" / "s1.tiff").write_bytes(b"not a tiff")
    report = _pack(bad, tmp_path / "st")
    assert report.exit_code == 1
    assert any("s1" in r["item"] for r in report.problems)
    m = read_json(tmp_path / "st" / "manifest.json")
    assert m["tiles"] == 21 and m["skipped"][0]["slide_id"] == "s1"
    assert "s1" in (tmp_path / "st" / "pack_summary.csv").read_text()


def test_full_disk_keeps_finished_shards(cohort, tmp_path, monkeypatch):
    real, calls = pack_mod.encode, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) > 7:  # fail inside the second shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(pack_mod, "encode", flaky)
    with pytest.raises(GpfmError, match="disk full"):
        _pack(cohort, tmp_path / "st")
    names = sorted(p.name for p in (tmp_path / "st").iterdir())
    assert "shard-000000.tar" in names and not any(n.endswith(".tmp") for n in names)
    assert "shard-000001.tar" not in names
    monkeypatch.setattr(pack_mod, "encode", real)
    assert _pack(cohort, tmp_path / "st").exit_code == 0  # a rerun finishes the store


def test_unwritable_output_is_clear_error(cohort, tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(GpfmError, match="not writable"):
        _pack(cohort, tmp_path / "f" / "st")


def test_manifest_mismatch_names_the_shard(store, tmp_path):
    copy = tmp_path / "st"
    shutil.copytree(store, copy)
    with open(copy / "shard-000002.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(GpfmError, match="shard-000002.tar"):
        ShardStream(str(copy))
    shutil.copy(store / "shard-000002.tar", copy / "shard-000002.tar")
    (copy / "shard-000004.tar").unlink()
    with pytest.raises(GpfmError, match="shard-000004.tar: shard listed in the manifest is missing"):
        ShardStream(str(copy))


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http URLs through curl")
def test_remote_url_reads_the_same(store):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(store))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        remote = _keys(ShardStream(url, infinite=False, seed=2))
        local = _keys(ShardStream(str(store), infinite=False, seed=2))
        assert remote == local and len(remote) == 28
    finally:
        server.shutdown()


def test_stream_feeds_a_transform(store):
    ds = ShardStream(str(store), infinite=False, transform=lambda a: torch.from_numpy(a).float().mean())
    assert all(isinstance(x, torch.Tensor) and x.ndim == 0 for x, _ in ds)
