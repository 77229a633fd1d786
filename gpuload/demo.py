"""A demo table shaped like the reference robot dataset, generated locally with no network.

Rows hold a 480x640 RGB JPEG of realistic content and size (about 20-30 KB), a float32[14] joint
state, an int label and a text instruction. Images are crops, flips and colour/noise variations of
the real photographs that scikit-image's wheel ships; without scikit-image, procedurally textured
scenes are used instead (never flat colours or pure noise, which decode unrealistically).
Deterministic for a seed; generated on all cores.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache

import numpy as np

__all__ = ["make_demo_table", "demo_rows", "DEMO_HEIGHT", "DEMO_WIDTH", "TASKS"]

DEMO_HEIGHT, DEMO_WIDTH = 480, 640
TARGET_BYTES = 25_000
TASKS = (
    "pick up the red cube",
    "place the cup on the plate",
    "open the drawer",
    "close the drawer",
    "stack the blocks",
    "push the button",
    "pour the beans",
    "wipe the table",
    "hand over the tool",
    "insert the peg",
)
_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "cat",
    "stereo_motorcycle",
)
_TEXTURES = ("brick", "grass", "gravel", "camera", "moon")


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def _procedural(seed: int) -> np.ndarray:
    """A synthetic scene: a table top with perspective stripes, blobs and soft shading."""
    rng = np.random.default_rng(seed)
    h, w = 600, 800
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(60, 200, 3)
    img = np.empty((h, w, 3), np.float32)
    stripes = 0.5 + 0.5 * np.sin((x - w / 2) / (y + 80) * rng.uniform(20, 60) + rng.uniform(0, 6))
    for c in range(3):
        img[..., c] = base[c] * (0.7 + 0.3 * stripes) * (0.6 + 0.4 * y / h)
    for _ in range(rng.integers(5, 12)):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(20, 120)
        m = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
        img += m[..., None] * rng.uniform(-90, 90, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@lru_cache(maxsize=1)
def _bases() -> tuple[np.ndarray, ...]:
    """Base scenes at 600x800 (1.25x the output), so each row can take a shifted 480x640 crop."""
    out: list[np.ndarray] = []
    try:
        import skimage.data as data
    except ImportError:
        data = None
    if data is not None:
        for name in _PHOTOS:
            try:
                img = getattr(data, name)()
            except (ImportError, ModuleNotFoundError, OSError, AttributeError):
                continue  # a sample needing pooch/network: skip it
            if isinstance(img, tuple):
                img = img[0]
            if img.ndim == 2:
                img = np.stack([img] * 3, -1)
            out.append(_resize(img[..., :3].astype(np.uint8), 600, 800))
        for k, name in enumerate(_TEXTURES):
            try:
                g = getattr(data, name)().astype(np.float32)
            except (ImportError, ModuleNotFoundError, OSError, AttributeError):
                continue
            tint = np.array(
                [
                    [1.0, 0.85, 0.7],
                    [0.75, 0.9, 1.0],
                    [0.9, 1.0, 0.8],
                    [1.0, 0.95, 0.9],
                    [0.8, 0.8, 1.0],
                ][k % 5]
            )
            out.append(_resize(np.clip(g[..., None] * tint, 0, 255).astype(np.uint8), 600, 800))
    if not out:
        out = [_procedural(s) for s in range(8)]
    return tuple(out)


@lru_cache(maxsize=1)
def _noisy_bases() -> tuple[np.ndarray, ...]:
    """Base scenes with sensor-like noise baked in once (per-row work then stays cheap)."""
    rng = np.random.default_rng(1234)
    return tuple(
        np.clip(b.astype(np.int16) + rng.normal(0, 3.0, b.shape).astype(np.int16), 0, 255).astype(
            np.uint8
        )
        for b in _bases()
    )


@lru_cache(maxsize=64)
def _quality_for(base_index: int) -> int:
    """The JPEG quality that lands this base scene near the target size (calibrated once)."""
    import simplejpeg

    img = np.ascontiguousarray(_noisy_bases()[base_index][:DEMO_HEIGHT, :DEMO_WIDTH])
    lo, hi = 20, 95
    while lo < hi:
        q = (lo + hi + 1) // 2
        if len(simplejpeg.encode_jpeg(img, quality=q)) <= TARGET_BYTES:
            lo = q
        else:
            hi = q - 1
    return lo


def _image(seed: int, i: int) -> bytes:
    import simplejpeg

    rng = np.random.default_rng([seed, i, 1])
    bases = _noisy_bases()
    b = int(rng.integers(len(bases)))
    src = bases[b]
    y0 = int(rng.integers(0, src.shape[0] - DEMO_HEIGHT + 1))
    x0 = int(rng.integers(0, src.shape[1] - DEMO_WIDTH + 1))
    crop = src[y0 : y0 + DEMO_HEIGHT, x0 : x0 + DEMO_WIDTH]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    # per-channel gain and offset through a lookup table: a colour/brightness variation per row
    lut = np.clip(
        np.arange(256)[None, :] * rng.uniform(0.8, 1.2, (3, 1)) + rng.uniform(-15, 15), 0, 255
    )
    lut = lut.astype(np.uint8)
    out = np.empty((DEMO_HEIGHT, DEMO_WIDTH, 3), np.uint8)
    for c in range(3):
        np.take(lut[c], crop[..., c], out=out[..., c])
    q = int(np.clip(_quality_for(b) + rng.integers(-3, 4), 15, 95))
    return simplejpeg.encode_jpeg(out, quality=q)


def _state(seed: int, i: int) -> np.ndarray:
    """A smooth 14-DOF joint trajectory: episodes of 400 steps."""
    ep, t = divmod(i, 400)
    rng = np.random.default_rng([seed, ep, 2])
    freq = rng.uniform(0.005, 0.03, 14)
    phase = rng.uniform(0, 2 * np.pi, 14)
    amp = rng.uniform(0.1, 1.2, 14)
    return (amp * np.sin(freq * t + phase)).astype(np.float32)


def _rows_block(args: tuple[int, int, int]) -> dict:
    seed, lo, hi = args
    labels = [(i // 400 + seed) % len(TASKS) for i in range(lo, hi)]
    return {
        "image": [_image(seed, i) for i in range(lo, hi)],
        "state": np.stack([_state(seed, i) for i in range(lo, hi)]),
        "label": np.array(labels, dtype=np.int64),
        "instruction": [TASKS[k] for k in labels],
    }


def demo_rows(
    rows: int, seed: int = 0, workers: int | None = None, block: int = 256
) -> Iterator[dict]:
    """Column batches of the demo table, generated in worker processes (all cores by default)."""
    blocks = [(seed, lo, min(rows, lo + block)) for lo in range(0, rows, block)]
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(blocks) <= 1:
        for b in blocks:
            yield _rows_block(b)
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        yield from pool.map(_rows_block, blocks)


class _Batches:
    """An iterable of row dicts fed from column batches (what ingest consumes), with a length."""

    def __init__(self, rows: int, seed: int, workers: int | None) -> None:
        self.rows, self.seed, self.workers = rows, seed, workers

    def __len__(self) -> int:
        return self.rows

    def __iter__(self):
        for b in demo_rows(self.rows, self.seed, self.workers):
            n = len(b["label"])
            for j in range(n):
                yield {
                    "image": b["image"][j],
                    "state": b["state"][j],
                    "label": b["label"][j],
                    "instruction": b["instruction"][j],
                }


def make_demo_table(
    dest: str | os.PathLike,
    rows: int = 10_000,
    seed: int = 0,
    mode: str = "create",
    workers: int | None = None,
    progress: bool | None = None,
    storage_options=None,
):
    """Generate the demo table at ``dest`` (a path or URL) and return it opened."""
    from .client import ingest

    schema = {
        "image": "image/jpeg",
        "state": "float32[14]",
        "label": "int64",
        "instruction": "text",
    }
    return ingest(
        os.fspath(dest),
        _Batches(rows, seed, workers),
        mode=mode,
        schema=schema,
        progress=progress,
        storage_options=storage_options,
    )
