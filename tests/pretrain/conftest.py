"""Fixtures for the pretraining tests: synthetic tiles, experts wrapped to the encoder contract, tiny configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpfm.io import GpfmError

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "pretrain" / "tiny.yaml"


# tiny.yaml shrunk further for tests (64 px global crops: a 4x4 grid; 2 blocks; 64 prototypes)
TEST_OVERRIDES = ["run.steps=6", "run.log_every=1", "run.ckpt_every=1000", "data.num_workers=0",
                  "data.batch_size=8", "crops.global_size=64", "crops.local_size=32", "model.model_args={depth: 2}",
                  "heads.prototypes=64", "heads.hidden_dim=64", "heads.bottleneck_dim=32",
                  "heads.projector_bottleneck=32", "run.export_at_end=false"]


def colour_tiles(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8: a random 2x2 colour layout per tile, blurred edges and noise (planted signal)."""
    rng = np.random.default_rng(seed)
    cells = rng.uniform(0.1, 0.9, size=(n, 3, 2, 2)).astype(np.float32)
    img = F.interpolate(torch.from_numpy(cells), size=(size, size), mode="bilinear", align_corners=False)
    img = img + 0.03 * torch.randn(img.shape, generator=torch.Generator().manual_seed(seed))
    return (img.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


class ArraySource:
    """In-memory TileSource; `bad` indices raise like an unreadable tile."""

    def __init__(self, tiles: np.ndarray, groups: int = 4, bad: set[int] | None = None):
        self.tiles, self.bad = tiles, bad or set()
        n = len(tiles)
        self.group_sizes = [n // groups + (1 if g < n % groups else 0) for g in range(groups)]

    def __len__(self) -> int:
        return len(self.tiles)

    def read(self, index: int) -> np.ndarray:
        if index in self.bad:
            raise OSError("corrupt JPEG data")
        return self.tiles[index]

    def describe(self, index: int) -> str:
        return f"array tile {index}"


class Transform:
    """The EncoderTransform contract: input_size, mean/std, prepare (resize + normalise), normalize."""

    def __init__(self, size: int, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)):
        self.input_size, self.resize_size, self.mean, self.std = size, size, mean, std
        self.crop, self.interpolation = "none", "bicubic"

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - m) / s

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x.float(), size=(self.input_size,) * 2, mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
        return self.normalize(x.float())


class ViTExpert(nn.Module):
    """A tiny timm ViT wrapped to the encoder contract (final-norm CLS and patch tokens)."""

    def __init__(self, size: int = 64, dim: int = 48, seed: int = 0):
        super().__init__()
        import timm

        torch.manual_seed(seed)
        self.model = timm.create_model("vit_tiny_patch16_224", img_size=size, embed_dim=dim, depth=1, num_heads=3,
                                       num_classes=0)
        self.name, self.dim, self.transform = "test-vit", dim, Transform(size)
        self.patch_grid = (size // 16, size // 16)
        self.weights_sha256 = "0" * 64

    def forward_cls_and_tokens(self, x):
        t = self.model.forward_features(x)
        return t[:, 0], t[:, 1:]

    def forward(self, x):
        return self.forward_cls_and_tokens(x)[0]


class ColourExpert(nn.Module):
    """A fixed expert with a planted, learnable target: per-cell colours through fixed random maps.

    Tokens (4x4 grid) = tanh(W (cell colour - 0.5)); CLS = tanh(V (mean colour - 0.5)): about zero-mean over
    the data, so a constant prediction scores a low cosine."""

    def __init__(self, size: int = 64, dim: int = 32, tokens: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.register_buffer("w", torch.randn(dim, 3, generator=g))
        self.register_buffer("v", torch.randn(dim, 3, generator=g))
        self.name, self.dim, self.transform = "colour", dim, Transform(size, (0.5,) * 3, (1.0,) * 3)
        self.patch_grid = (4, 4) if tokens else None
        self.weights_sha256 = "c" * 64
        self._p = nn.Parameter(torch.zeros(1))  # so `parameters()` has a device

    def forward_cls_and_tokens(self, x):
        cells = F.adaptive_avg_pool2d(x, 4).flatten(2).transpose(1, 2)  # (B, 16, 3), centred colours
        tok = torch.tanh(2 * cells @ self.w.t())
        cls = torch.tanh(2 * cells.mean(1) @ self.v.t())
        return cls, (tok if self.patch_grid else None)

    def forward(self, x):
        return self.forward_cls_and_tokens(x)[0]


def expert_factory(name: str, weights: str | None, device: str | None) -> nn.Module:
    """Stands in for gpfm.encoders.create_encoder: names test-vit, colour, colour-notokens."""
    if name == "colour":
        return ColourExpert()
    if name == "colour-notokens":
        return ColourExpert(tokens=False)
    if name != "test-vit":
        raise GpfmError(f"unknown encoder '{name}'")
    enc = ViTExpert()
    if weights is not None:
        if not Path(weights).is_file():
            raise GpfmError(f"{weights}: weights file not found")
        from safetensors.torch import load_file

        enc.model.load_state_dict(load_file(weights), strict=True)  # RuntimeError for a wrong model
    else:
        enc.weights_sha256 = "random"
    return enc


@pytest.fixture
def tiles() -> np.ndarray:
    return colour_tiles(96, 64, seed=0)


@pytest.fixture
def tiny_cfg():
    """tiny.yaml with test-speed overrides; pass more dotted overrides as arguments."""
    from gpfm.config import load_config
    from gpfm.pretrain.trainer import PretrainConfig

    def make(*overrides: str):
        return load_config(PretrainConfig, TINY, TEST_OVERRIDES + list(overrides))

    return make


@pytest.fixture
def h():
    """The helpers above, for tests (conftest modules are not importable under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(ArraySource=ArraySource, ViTExpert=ViTExpert, ColourExpert=ColourExpert,
                           expert_factory=expert_factory, colour_tiles=colour_tiles, Transform=Transform,
                           TINY=TINY, TEST_OVERRIDES=list(TEST_OVERRIDES))


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors on 2 shared cores: one intra-op thread is several times faster than two."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
