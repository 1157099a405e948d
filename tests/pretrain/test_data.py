"""Pretraining data: deterministic, world-size-free sampling; skip-and-log of unreadable tiles; sources."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from gpfm.io import GpfmError
from gpfm.pretrain.augment import CropsConfig
from gpfm.pretrain.data import (
    CoordsSource,
    DataConfig,
    ImageSource,
    RandomAccessStream,
    SampleOrder,
    WorkerPlan,
    make_loader,
    make_source,
)
from gpfm.pretrain.masking import MaskingConfig

CROPS = CropsConfig(global_size=32, local_size=16, n_local=2)


def test_sample_order_balances_slides_and_shuffles_epochs():
    order = SampleOrder([1, 99], seed=0, mode="slide")  # "a random tile of a random slide"
    picks = np.array([order.tile(i) for i in range(2000)])
    assert abs(np.mean(picks == 0) - 0.5) < 0.05  # the 1-tile slide is drawn as often as the big one
    assert picks.min() >= 0 and picks.max() < 100
    assert [SampleOrder([1, 99], 0).tile(i) for i in range(50)] == list(picks[:50])  # pure function
    shuf = SampleOrder([3, 4, 5], seed=1, mode="shuffle")
    first = [shuf.tile(i) for i in range(12)]
    second = [shuf.tile(i) for i in range(12, 24)]
    assert sorted(first) == list(range(12)) and sorted(second) == list(range(12)) and first != second


def test_worker_plans_cover_every_sample_exactly_once():
    def samples(world, workers):
        return [s for r in range(world) for w in range(workers)
                for s in WorkerPlan(0, 3, 9, r, world, w, workers, 8).samples()]

    ref = samples(1, 1)
    assert ref == list(range(3 * 8, 9 * 8))
    for world, workers in ((2, 1), (2, 2), (4, 3)):
        got = samples(world, workers)
        assert sorted(got) == ref and len(set(got)) == len(got)


def _batches(src, world, rank, workers=0, steps=(2, 4), bs=8):
    cfg = DataConfig(batch_size=bs, num_workers=workers)
    loader = make_loader(src, cfg, CROPS, 0, steps[0], steps[1], rank, world, (8, 8), MaskingConfig(),
                         expert_sizes=(48,))
    return list(loader)


def test_loader_is_the_same_stream_at_any_world_size_and_worker_count(h):
    src = h.ArraySource(h.colour_tiles(40, 48))
    one = _batches(src, 1, 0)
    two = [_batches(src, 2, r) for r in range(2)]
    assert [b["step"] for b in one] == [2, 3]
    for k, b in enumerate(one):
        r0, r1 = two[0][k], two[1][k]
        for key in ("global", "masks"):  # crop-major: (crop 0: images...), (crop 1: images...)
            a = b[key].reshape(2, 8, *b[key].shape[1:])
            c = torch.cat([r0[key].reshape(2, 4, *r0[key].shape[1:]), r1[key].reshape(2, 4, *r1[key].shape[1:])], 1)
            assert torch.equal(a, c), key
        assert torch.equal(b["local"].reshape(2, 8, -1)[:, 4:], r1["local"].reshape(2, 4, -1))
        assert b["experts"][48].shape == (16, 3, 48, 48)
        assert int(b["masks"].any(1).sum()) == 8  # half of the step's 16 global-crop images
    workers = _batches(src, 1, 0, workers=2)
    assert all(torch.equal(a["global"], b["global"]) for a, b in zip(one, workers))
    resumed = _batches(src, 1, 0, steps=(3, 4))  # restart at step 3: the same batch
    assert torch.equal(resumed[0]["global"], one[1]["global"]) and torch.equal(resumed[0]["masks"], one[1]["masks"])


def test_unreadable_tiles_are_skipped_and_logged_never_replaced_by_a_fixed_image(h):
    tiles = h.colour_tiles(20, 48)
    src = h.ArraySource(tiles, bad=set(range(0, 20, 2)))  # every other tile is corrupt
    stream = RandomAccessStream(src, seed=0, mode="slide", max_retries=8)
    plan = WorkerPlan(0, 0, 4, 0, 1, 0, 1, 8)
    out = list(stream.worker_tiles(plan))
    assert [s for s, _, _ in out] == list(range(32))
    skipped = [d for _, _, sk in out for d, _ in sk]
    assert skipped and all(int(d.split()[-1]) % 2 == 0 for d in skipped)
    assert all(any(np.array_equal(t, tiles[i]) for i in range(1, 20, 2)) for _, t, _ in out)
    assert len({t.tobytes() for _, t, _ in out}) > 5  # re-drawn tiles vary: no fixed fallback image
    dead = RandomAccessStream(h.ArraySource(tiles, bad=set(range(20))), 0, "slide", 3)
    with pytest.raises(GpfmError, match="could not be read"):
        next(dead.worker_tiles(plan))


def _png(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 24, 3), colour, np.uint8)).save(path)


def test_image_source_folders_csv_and_exclusions(tmp_path):
    for sid, n in (("slideA", 3), ("slideB", 1), ("slideC", 2)):
        for i in range(n):
            _png(tmp_path / "tiles" / sid / f"{i}.png", 40 * i)
    (tmp_path / "exclude.csv").write_text("slide_id,split\nslideC,test\n")
    src = make_source(DataConfig(source="images", images=[str(tmp_path / "tiles")],
                                 exclude=str(tmp_path / "exclude.csv")))
    assert isinstance(src, ImageSource) and len(src) == 4 and src.group_sizes == [3, 1]
    assert src.read(1).shape == (24, 24, 3) and "slideA" in src.describe(0)
    (tmp_path / "list.csv").write_text("path\ntiles/slideB/0.png\ntiles/slideA/2.png\n")
    csv_src = ImageSource(DataConfig(source="images", images=[str(tmp_path / "list.csv")]))
    assert len(csv_src) == 2
    with pytest.raises(GpfmError, match="unknown"):
        make_source(DataConfig(source="lmdb"))
    with pytest.raises(GpfmError, match="not found"):
        ImageSource(DataConfig(images=[str(tmp_path / "missing")]))


def test_coords_source_reads_real_slide_tiles_and_skips_missing_slides(shared_data, tmp_path):
    from gpfm.slides.tiling import write_coords

    attrs = {"patch_size": 64, "patch_size_level0": 128, "read_level": 0, "target_mpp": 1.0, "name": "cmu_small_region"}
    write_coords(tmp_path / "coords" / "cmu_small_region.h5", np.array([[0, 0], [1000, 1200], [1500, 2000]]), attrs)
    write_coords(tmp_path / "coords" / "absent.h5", np.array([[0, 0]]), {**attrs, "name": "absent"})
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(shared_data / "cmu_small_region.svs", slides)
    src = CoordsSource(DataConfig(coords=[str(tmp_path / "coords")], slides=[str(slides)]))
    assert len(src) == 3 and src.group_sizes == [3]
    tile = src.read(1)
    assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8 and tile.std() > 5  # real tissue pixels
    assert "tile 1 at (1000, 1200)" in src.describe(1)
    batch = _batches(src, 1, 0, steps=(0, 1), bs=4)[0]
    assert batch["global"].shape == (8, 3, 32, 32) and not batch["skipped"]
    (tmp_path / "ex.txt").write_text("cmu_small_region\n")
    with pytest.raises(GpfmError, match="1 excluded"):
        CoordsSource(DataConfig(coords=[str(tmp_path / "coords")], slides=[str(slides)], exclude=str(tmp_path / "ex.txt")))
