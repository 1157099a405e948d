import numpy as np
import pytest

from gpfm import dist
from gpfm.io import BatchReport, GpfmError, atomic_path, ensure_writable_dir, read_h5, tmp_path, write_h5


def test_h5_roundtrip_with_strings_and_attrs(tmp_path):
    p = tmp_path / "a.h5"
    write_h5(p, {"x": np.arange(6).reshape(3, 2), "names": np.array(["a", "bé", "c"])},
             {"x": {"patch_size": 256, "name": "slide"}})
    data, attrs = read_h5(p)
    assert data["x"].tolist() == [[0, 1], [2, 3], [4, 5]]
    assert list(data["names"]) == ["a", "bé", "c"]
    assert attrs["x"] == {"patch_size": 256, "name": "slide"}
    assert not tmp_path_exists(p)


def tmp_path_exists(p):
    return tmp_path(p).exists()


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.h5"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists() and not tmp_path_exists(target)


def test_unreadable_h5_is_clear_error(tmp_path):
    p = tmp_path / "bad.h5"
    p.write_text("not hdf5")
    with pytest.raises(GpfmError, match="bad.h5"):
        read_h5(p)


def test_unwritable_dir(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(GpfmError, match="not writable"):
        ensure_writable_dir(f / "sub")


def test_batch_report(tmp_path):
    r = BatchReport("tile")
    r.add("a", "ok", tiles=3)
    r.add("b", "skipped", error="no mpp")
    assert r.exit_code == 1 and r.counts == {"ok": 1, "skipped": 1}
    r.write(tmp_path / "s.csv")
    assert "no mpp" in (tmp_path / "s.csv").read_text()


def test_shard_covers_each_item_once(monkeypatch):
    items = list(range(11))
    shares = [dist.shard(items, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == items
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert dist.env().rank == 1 and dist.env().world_size == 4
