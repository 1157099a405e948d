"""Each encoder's own preprocessing (resize, crop, normalise), applied to batches on the model's device.

Built only from an encoder record, so a model can never be fed another model's input size or statistics
(the original GPFM code fed CONCH ImageNet-normalised 224 px crops; GPFM-METHOD R1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CROPS = ("center", "none")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class EncoderTransform:
    """Resize + crop + normalise, as the model was trained.

    crop "center": resize the shorter side to `resize_size` (torchvision `Resize(int)` rule), then centre-crop
    `input_size`; crop "none": resize straight to `input_size` x `input_size`.
    """

    input_size: int
    resize_size: int
    crop: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, not {self.crop!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, not {self.interpolation!r}")
        if self.crop == "center" and self.resize_size < self.input_size:
            raise ValueError(f"resize_size {self.resize_size} < input_size {self.input_size}")

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """Geometric part only: float (B, 3, H, W) in [0, 1] -> (B, 3, input_size, input_size) in [0, 1]."""
        h, w = x.shape[-2:]
        s = self.input_size
        if self.crop == "none":
            return x if (h, w) == (s, s) else self._interp(x, (s, s))
        short, long = min(h, w), max(h, w)
        if short != self.resize_size:
            new_long = int(self.resize_size * long / short)
            size = (self.resize_size, new_long) if h <= w else (new_long, self.resize_size)
            x = self._interp(x, size)
            h, w = size
        if (h, w) != (s, s):
            top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
            x = x[..., top:top + s, left:left + s]
        return x

    def _interp(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.interpolation == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        y = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)
        return y.clamp_(0.0, 1.0) if self.interpolation == "bicubic" else y

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) in [0, 1], any size -> model-ready float32 (B, 3, input_size, input_size)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
        return self.normalize(self.resize(x.float()))

    def prepare_uint8(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) or (B, 3, H, W) in 0..255 -> model-ready float32 (B, 3, input_size, input_size)."""
        if batch.ndim != 4 or batch.dtype != torch.uint8:
            raise ValueError(f"expected a 4-d uint8 batch, got {batch.dtype} {tuple(batch.shape)}")
        if batch.shape[-1] == 3 and batch.shape[1] != 3:
            batch = batch.permute(0, 3, 1, 2)
        x = batch.contiguous().float()  # a fresh tensor: the steps below work in place
        h, w = x.shape[-2:]
        if (h, w) != (self.input_size, self.input_size) or self.crop == "center" and min(h, w) != self.resize_size:
            return self.normalize(self.resize(x.div_(255.0)))
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x.mul_(1.0 / (255.0 * std)).sub_(mean / std)  # (x / 255 - mean) / std in two passes

    def describe(self) -> str:
        """Short text for tables: '224 (resize 256, center crop) bicubic'."""
        if self.crop == "center" and self.resize_size != self.input_size:
            geo = f"resize {self.resize_size}, crop {self.input_size}"
        else:
            geo = f"{self.input_size}"
        return f"{geo} {self.interpolation}"
