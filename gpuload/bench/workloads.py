"""What the end-to-end and training suites run, written the way a user of each library would.

* ``OPS``: gpuload's declarative RandomResizedCrop(224) + RandomHorizontalFlip + Normalize
  (ImageNet mean/std) -> float32 NCHW.
* :class:`PilTransform`: the same augmentations with PIL + numpy + torch, following
  torchvision's rules (torchvision has no CPU build that works with CPU torch here):
  ``RandomResizedCrop.get_params`` (torch RNG, 10 attempts then the centre-crop fallback), crop
  then ``PIL.Image.resize((224, 224), BILINEAR, reducing_gap=None)``, flip with p=0.5
  (``torch.rand(1) < 0.5``), ToTensor (CHW float in [0, 1]) and Normalize.
* :class:`JpegFolder`: the plain baseline, a map-style Dataset over JPEG files (one per row,
  ImageFolder style) that decodes with PIL and applies :class:`PilTransform`.
* :func:`small_cnn`: the training suite's model (a few conv layers).

Module-level classes so that DataLoader workers can unpickle them under any start method.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np

__all__ = [
    "MEAN",
    "STD",
    "OUT_SIZE",
    "ops_list",
    "kernel_ops",
    "kernel_sources",
    "PilTransform",
    "GpuloadRowTransform",
    "DeeplakeRowTransform",
    "JpegFolder",
    "small_cnn",
]

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
OUT_SIZE = 224
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def ops_list():
    """gpuload's image ops for the end-to-end suite."""
    from gpuload import ops

    return [
        ops.RandomResizedCrop(OUT_SIZE, scale=SCALE, ratio=RATIO),
        ops.RandomHorizontalFlip(),
        ops.Normalize(mean=MEAN, std=STD),
    ]


KERNEL_PRESETS = (
    "rrc_flip_norm",
    "rrc_jitter_norm",
    "rrc_flip_norm_bf16",
    "rrc_flip_u8_nhwc",
    "eval_resize_crop",
)


def kernel_ops(preset: str):
    """The kernel suite's op lists, by preset name (``KERNEL_PRESETS``)."""
    from gpuload import ops

    norm = ops.Normalize(mean=MEAN, std=STD)
    train = [ops.RandomResizedCrop(OUT_SIZE), ops.RandomHorizontalFlip()]
    return {
        "rrc_flip_norm": [*train, norm],
        "rrc_jitter_norm": [*train, ops.ColorJitter(0.4, 0.4, 0.4), norm],
        "rrc_flip_norm_bf16": [*train, norm, ops.ToDtype("bfloat16")],
        "rrc_flip_u8_nhwc": [*train, ops.ToDtype("uint8"), ops.ToLayout("NHWC")],
        "eval_resize_crop": [ops.Resize(256), ops.CenterCrop(OUT_SIZE), norm],
    }[preset]


def kernel_sources(batch: int, h: int = 480, w: int = 640) -> tuple[np.ndarray, np.ndarray]:
    """(staging, meta) of ``batch`` decoded h x w x 3 uint8 images, packed as a decoder leaves
    them: smooth random colour fields plus noise, so values are neither constant nor uniform."""
    rng = np.random.default_rng(0)
    yy, xx = np.meshgrid(
        np.linspace(0, 1, h, dtype=np.float32),
        np.linspace(0, 1, w, dtype=np.float32),
        indexing="ij",
    )
    base = np.stack([np.sin(6 * yy + 2 * c) * np.cos(9 * xx - c) for c in range(3)], axis=-1)
    n = h * w * 3
    src = np.empty(batch * n, np.uint8)
    for b in range(batch):
        img = 128 + 100 * base * rng.uniform(0.5, 1.0) + rng.normal(0, 12, base.shape)
        src[b * n : (b + 1) * n] = np.clip(img, 0, 255).astype(np.uint8).reshape(-1)
    meta = np.zeros((batch, 4), np.int64)
    meta[:, 0] = np.arange(batch) * n
    meta[:, 1], meta[:, 2], meta[:, 3] = h, w, 3
    return src, meta


def rrc_params(width: int, height: int, scale=SCALE, ratio=RATIO) -> tuple[int, int, int, int]:
    """torchvision.transforms.RandomResizedCrop.get_params: (top, left, h, w), torch RNG."""
    import torch

    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PilTransform:
    """PIL image (or encoded bytes) -> normalised float32 CHW torch tensor, torchvision's way."""

    def __init__(self, size: int = OUT_SIZE, mean=MEAN, std=STD) -> None:
        self.size = size
        self.mean = mean
        self.std = std
        self._mean_t = None
        self._std_t = None

    def _stats(self):
        import torch

        if self._mean_t is None:
            self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
            self._std_t = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return self._mean_t, self._std_t

    def __call__(self, img: Any):
        import torch
        from PIL import Image

        if isinstance(img, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(img)).convert("RGB")
        elif isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        top, left, h, w = rrc_params(img.width, img.height)
        img = img.crop((left, top, left + w, top + h))
        img = img.resize((self.size, self.size), Image.BILINEAR, reducing_gap=None)
        if torch.rand(1) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, np.uint8, copy=True))
        x = x.permute(2, 0, 1).contiguous().to(torch.float32).div_(255)
        mean, std = self._stats()
        return x.sub_(mean).div_(std)


class GpuloadRowTransform:
    """``gpuload.pytorch(t, transform=...)``: a Row -> {"image": tensor, "label": int}."""

    def __init__(self, image: str = "image", label: str | None = "label") -> None:
        self.image, self.label = image, label
        self.tf = PilTransform()

    def __call__(self, row):
        out = {"image": self.tf(row[self.image])}
        if self.label is not None:
            out["label"] = int(row[self.label])
        return out


class DeeplakeRowTransform:
    """``ds.pytorch(transform=...)`` on a Deeplake copy whose image column is a JPEG Image
    column: Deeplake hands over the decoded HWC uint8 array; then the same augmentations."""

    def __init__(self, image: str = "image", label: str | None = "label") -> None:
        self.image, self.label = image, label
        self.tf = PilTransform()

    def __call__(self, row):
        d = row.to_dict() if hasattr(row, "to_dict") else dict(row)
        out = {"image": self.tf(np.asarray(d[self.image]))}
        if self.label is not None:
            out["label"] = int(d[self.label])
        return out


class JpegFolder:
    """Map-style Dataset over ``<root>/<index>.jpg`` and ``<root>/labels.npy`` (ImageFolder
    style): PIL decode + :class:`PilTransform` per item."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.labels = np.load(os.path.join(root, "labels.npy"))
        self.tf = PilTransform()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        with open(os.path.join(self.root, f"{i:08d}.jpg"), "rb") as f:
            img = Image.open(f).convert("RGB")
        return self.tf(img), int(self.labels[i])


def small_cnn(classes: int = 10):
    """A small CNN for 3x224x224 inputs: four convolutions (stride 4, 2, 2, 2), batch norm,
    global average pooling and a linear head (about 0.1 M parameters)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 16, 5, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.Conv2d(64, 128, 3, stride=2, padding=1),
        nn.BatchNorm2d(128),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, classes),
    )
