"""Multi-crop augmentation: crop geometry, blur/solarise probabilities (R7), re-rendering for experts (R1)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpfm.io import GpfmError
from gpfm.pretrain.augment import CropsConfig, View, crop_box, hed_jitter, multi_crop, render, sample_view


def _rates(cfg: CropsConfig, kind: int, n: int = 3000) -> tuple[float, float]:
    rng = random.Random(0)
    views = [sample_view(rng, (512, 512), cfg, kind) for _ in range(n)]
    return (np.mean([v.blur_sigma is not None for v in views]), np.mean([v.solarize for v in views]))


def test_blur_probabilities_are_the_intended_ones_and_compat_inverts_them():
    cfg = CropsConfig()
    assert _rates(cfg, 0)[0] == 1.0
    assert _rates(cfg, 1)[0] == pytest.approx(0.1, abs=0.02)
    assert _rates(cfg, 2)[0] == pytest.approx(0.5, abs=0.03)
    compat = CropsConfig(compat_inverted_blur=True)  # upstream's effective 0.0 / 0.9 / 0.5
    assert _rates(compat, 0)[0] == 0.0
    assert _rates(compat, 1)[0] == pytest.approx(0.9, abs=0.02)
    assert _rates(compat, 2)[0] == pytest.approx(0.5, abs=0.03)


def test_solarise_only_on_the_second_global_crop():
    cfg = CropsConfig()
    assert _rates(cfg, 0)[1] == 0.0 and _rates(cfg, 2)[1] == 0.0
    assert _rates(cfg, 1)[1] == pytest.approx(0.2, abs=0.025)


def test_crop_box_scale_and_aspect():
    rng = random.Random(1)
    for scale in ([0.32, 1.0], [0.05, 0.32]):
        for _ in range(300):
            top, left, h, w = crop_box(rng, (512, 400), scale, [3 / 4, 4 / 3])
            assert 0 <= top and top + h <= 512 and 0 <= left and left + w <= 400
            assert scale[0] * 0.9 <= h * w / (512 * 400) <= scale[1] * 1.1
            assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_render_plain_view_is_a_bicubic_resize():
    tile = torch.rand(3, 80, 80)
    view = View(box=(0, 0, 80, 80))
    out = render(tile, view, 40, CropsConfig())
    ref = F.interpolate(tile[None], size=(40, 40), mode="bicubic", align_corners=False, antialias=True)[0]
    assert torch.allclose(out, ref.clamp(0, 1), atol=1e-5)
    rot = render(tile, View(box=(0, 0, 80, 80), rot90=1, hflip=True), 40, CropsConfig())
    assert torch.allclose(rot, torch.rot90(torch.flip(out, dims=(2,)), 1, dims=(1, 2)), atol=1e-5)


def test_expert_view_is_the_same_crop_at_its_own_size():
    """R1: the view re-rendered at 128 px, shrunk to 64, matches the 64-px view (colour ops and blur too)."""
    g = torch.Generator().manual_seed(0)
    tile = F.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(256, 256), mode="bilinear")[0]
    cfg = CropsConfig(hed_p=0.5, rot90=0.5)
    rng = random.Random(3)
    for kind in (0, 1):
        for _ in range(5):
            v = sample_view(rng, (256, 256), cfg, kind)
            small = render(tile, v, 64, cfg)
            big = render(tile, v, 128, cfg, ref_size=64)
            down = F.interpolate(big[None], size=(64, 64), mode="bilinear", antialias=True, align_corners=False)[0]
            assert (down - small).abs().mean() < 0.02
            geo = render(tile, v, 64, cfg, colour=False)  # geometry only
            assert geo.shape == small.shape


def test_hed_jitter_identity_and_effect():
    img = torch.rand(3, 16, 16) * 0.8 + 0.1
    assert torch.allclose(hed_jitter(img, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), img, atol=1e-4)
    more_h = hed_jitter(img, (1.5, 1.0, 1.0), (0.0, 0.0, 0.0))
    assert more_h.mean() < img.mean()  # more haematoxylin: darker


def test_multi_crop_shapes_and_determinism():
    tile = (np.random.default_rng(0).uniform(size=(100, 120, 3)) * 255).astype(np.uint8)
    cfg = CropsConfig(global_size=48, local_size=24, n_local=3)
    a = multi_crop(tile, random.Random(7), cfg, expert_sizes=(32, 64))
    b = multi_crop(tile, random.Random(7), cfg, expert_sizes=(32, 64))
    assert a["global"].shape == (2, 3, 48, 48) and a["local"].shape == (3, 3, 24, 24)
    assert a["experts"][64].shape == (2, 3, 64, 64) and a["experts"][32].shape == (2, 3, 32, 32)
    assert torch.equal(a["global"], b["global"]) and torch.equal(a["experts"][64], b["experts"][64])
    assert float(a["global"].min()) >= 0.0 and float(a["global"].max()) <= 1.0
    c = multi_crop(tile, random.Random(8), cfg)
    assert not torch.equal(a["global"], c["global"])
    with pytest.raises(GpfmError):
        CropsConfig(blur_p=[1.0, 0.5])
