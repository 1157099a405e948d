"""UKD pretraining streams tiles from a packed shard store (`data.source: shards`) and resumes exactly."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from gpfm.pretrain.trainer import train
from gpfm.shards.pack import PackOptions, pack

COLOUR = "distill.experts=[{name: colour, patch_weight: 0.25}]"


@pytest.fixture
def store(h, tmp_path):
    folder = tmp_path / "tiles"
    for i, t in enumerate(h.colour_tiles(48, 64, seed=0)):
        (folder / f"g{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(t).save(folder / f"g{i % 4}" / f"{i:03d}.png")
    report = pack(PackOptions(out=str(tmp_path / "store"), images=str(folder), size=64, codec="png",
                              tiles_per_shard=6, quiet=True))
    assert report.manifest["tiles"] == 48 and len(report.manifest["shards"]) == 8
    return tmp_path / "store"


def test_ukd_trains_from_shards_and_resumes_exactly(h, tiny_cfg, store, tmp_path):
    src = ("data.source=shards", f"data.shards=['{store}']", "data.shuffle_buffer=8", "data.num_workers=2",
           "run.ckpt_every=2", COLOUR)
    full = train(tiny_cfg(*src), tmp_path / "a", expert_factory=h.expert_factory, quiet=True)
    rows = full["metrics"]
    assert full["step"] == 6 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["colour_cls"] < rows[0]["colour_cls"]  # the student moves towards the expert

    train(tiny_cfg(*src, "run.stop_after=3"), tmp_path / "b", expert_factory=h.expert_factory, quiet=True)
    rest = train(tiny_cfg(*src), tmp_path / "b", expert_factory=h.expert_factory, quiet=True)
    a = {r["step"]: r for r in rows}
    assert [r["step"] for r in rest["metrics"]] == [3, 4, 5]
    for r in rest["metrics"]:
        for k in ("loss", "dino_global", "ibot", "koleo", "colour_cls"):
            assert r[k] == pytest.approx(a[r["step"]][k], rel=1e-6, abs=1e-7), (r["step"], k)
