"""PIL, the common baseline: decode-only rows and torch's DataLoader + PIL over JPEG files."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ..harness import device_epochs


def pil_decode(b: bytes):
    """The reference's "PIL single-thread": ``Image.open(BytesIO(b)).convert("RGB")``."""
    import io

    from PIL import Image

    return Image.open(io.BytesIO(b)).convert("RGB")


def decode_step(batches: list[list[bytes]], threads: int, a: dict):
    def step(batch):
        for b in batch:
            pil_decode(b)

    return step, None


def pool_decode_step(batches: list[list[bytes]], threads: int, a: dict):
    pool = ThreadPoolExecutor(threads)

    def step(batch):
        list(pool.map(pil_decode, batch))

    return step, None


def torch_pil_loader(a: dict, workers: int):
    """``DataLoader`` + PIL transforms over a folder of the same JPEG files."""
    from ..workloads import JpegFolder

    return device_epochs(JpegFolder(a["files"]), a, workers)
