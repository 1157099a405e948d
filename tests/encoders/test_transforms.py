"""EncoderTransform equals torchvision's eval pipeline (Resize(int) + CenterCrop + Normalize)."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2 as T

from gpfm.encoders import get_record
from gpfm.encoders.transforms import CLIP_MEAN, CLIP_STD, EncoderTransform


def _torchvision(t: EncoderTransform, x):
    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[t.interpolation]
    x = T.Resize(t.resize_size, interpolation=mode, antialias=True)(x)
    if x.dtype != torch.uint8 and t.interpolation == "bicubic":
        x = x.clamp(0, 1)  # as the uint8 path saturates
    x = T.CenterCrop(t.input_size)(x)
    return T.Normalize(t.mean, t.std)(T.ToDtype(torch.float32, scale=True)(x))


@pytest.mark.parametrize("name", ["prov-gigapath", "conch", "resnet50-trunc"])
def test_prepare_matches_torchvision(name):
    t = get_record(name).transform
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 300, 370), dtype=torch.uint8, generator=g)  # non-square, larger and smaller
    ours = t.prepare_uint8(img[None])[0]
    assert ours.shape == (3, t.input_size, t.input_size)
    assert torch.allclose(ours, _torchvision(t, img.float() / 255), atol=1e-5)
    # torchvision's uint8 kernels round between passes: same picture, within a grey level on average
    assert (ours - _torchvision(t, img)).abs().mean() < 1.0 / 255 / min(t.std)


def test_gigapath_resizes_to_256_then_crops_224():
    t = get_record("prov-gigapath").transform
    assert (t.resize_size, t.input_size, t.crop) == (256, 224, "center")
    x = torch.zeros(1, 3, 256, 256)
    x[..., 16:240, 16:240] = 1.0  # the centre 224 box is white, the 16 px border black
    out = t.resize(x)
    assert out.shape[-2:] == (224, 224) and out.min() == 1.0


def test_uint8_layouts_agree_and_crop_none_squashes():
    t = EncoderTransform(input_size=112, resize_size=112, crop="none", interpolation="bilinear", mean=CLIP_MEAN,
                         std=CLIP_STD)
    hwc = torch.randint(0, 256, (2, 200, 150, 3), dtype=torch.uint8)
    a = t.prepare_uint8(hwc)
    b = t.prepare_uint8(hwc.permute(0, 3, 1, 2))
    assert a.shape == (2, 3, 112, 112) and torch.equal(a, b)
    flat = torch.full((1, 3, 224, 224), 0.5)
    norm = t.prepare(flat)
    assert torch.allclose(norm[0, :, 0, 0], (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))


def test_every_encoder_gets_its_own_size_and_statistics():
    conch, uni = get_record("conch").transform, get_record("uni").transform
    assert (conch.input_size, conch.mean) == (448, CLIP_MEAN)
    assert (uni.input_size, uni.mean) == (224, (0.485, 0.456, 0.406))
    hopt = get_record("h-optimus-0").transform
    assert hopt.mean == (0.707223, 0.578729, 0.703617) and hopt.std == (0.211883, 0.230117, 0.177517)
    with pytest.raises(ValueError):
        EncoderTransform(input_size=224, resize_size=200)
