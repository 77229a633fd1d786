"""Synthetic test and benchmark images from scikit-image's bundled photographs (no network).

Used by tests/decode/test_decode.py; needs scikit-image (the ``demo``
or ``bench`` extra).
"""

from __future__ import annotations

import io

import numpy as np

__all__ = ["photos", "photo_rgb", "photo_jpegs", "smooth_texture", "encode_jpeg", "encode_png"]

_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
_cache: list[np.ndarray] = []


def photos() -> list[np.ndarray]:
    """The RGB sample photographs bundled with scikit-image."""
    if not _cache:
        import skimage.data

        for name in _PHOTOS:
            a = getattr(skimage.data, name)()
            if a.ndim == 3 and a.shape[2] == 3:
                _cache.append(np.ascontiguousarray(a))
    return _cache


def photo_rgb(size=(480, 640), seed: int = 0) -> np.ndarray:
    """A random crop of a sample photo (aspect of ``size``), resized to ``size``, maybe flipped."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ps = photos()
    a = ps[int(rng.integers(len(ps)))]
    h, w = size
    H, W = a.shape[:2]
    scale = min(H / h, W / w) * rng.uniform(0.6, 1.0)
    ch, cw = max(8, int(h * scale)), max(8, int(w * scale))
    y = int(rng.integers(0, H - ch + 1))
    x = int(rng.integers(0, W - cw + 1))
    im = Image.fromarray(a[y : y + ch, x : x + cw]).resize((w, h), Image.BILINEAR)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(im)


def encode_jpeg(
    arr: np.ndarray, quality: int = 85, progressive: bool = False, subsampling: int = 2, **kw
) -> bytes:
    """JPEG-encode an (H, W[, 1|3]) uint8 array with PIL (subsampling 2 = 4:2:0)."""
    from PIL import Image

    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    b = io.BytesIO()
    Image.fromarray(arr).save(
        b, format="JPEG", quality=quality, progressive=progressive, subsampling=subsampling, **kw
    )
    return b.getvalue()


def encode_png(arr: np.ndarray) -> bytes:
    from PIL import Image

    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


def photo_jpegs(
    n: int, size=(480, 640), target_bytes=(20_000, 30_000), seed: int = 0
) -> list[bytes]:
    """``n`` JPEGs (4:2:0) of sample-photo crops; the quality is searched per image for the
    largest file not above the middle of ``target_bytes`` (so sizes land inside the range for
    ordinary photos)."""
    lo_b, hi_b = target_bytes
    mid = (lo_b + hi_b) // 2
    out = []
    for k in range(n):
        arr = photo_rgb(size, seed * 100_003 + k)
        lo, hi, best = 5, 95, None
        while lo <= hi:
            q = (lo + hi) // 2
            b = encode_jpeg(arr, q)
            if len(b) > mid:
                hi = q - 1
            else:
                best = b
                lo = q + 1
        out.append(best if best is not None else encode_jpeg(arr, 5))
    return out


def smooth_texture(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A random smooth colour texture (sum of low-frequency sinusoids plus mild noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((h, w, channels), np.float32)
    for c in range(channels):
        acc = np.zeros((h, w), np.float32)
        for _ in range(4):
            fy, fx = rng.uniform(0.5, 4.0, size=2) * 2 * np.pi / np.array([h, w])
            ph = rng.uniform(0, 2 * np.pi)
            acc += np.sin(yy * fy + xx * fx + ph)
        out[:, :, c] = 128 + 28 * acc + rng.normal(0, 4, size=(h, w))
    return np.clip(out, 0, 255).astype(np.uint8)
