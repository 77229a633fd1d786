"""Per-image host fallback: PNG through imagecodecs (libpng) when installed, anything else
(and CMYK JPEGs) through PIL. Always full size; output is RGB, or one channel for grey sources."""

from __future__ import annotations

import contextlib
import io

import numpy as np

from gpuload.errors import DecodeError

from .header import ImageHeader, output_channels

__all__ = ["decode_other_into", "decode_other", "pil_to_array"]

_imagecodecs = None
_imagecodecs_checked = False


def _get_imagecodecs():
    global _imagecodecs, _imagecodecs_checked
    if not _imagecodecs_checked:
        try:
            import imagecodecs

            _imagecodecs = imagecodecs if hasattr(imagecodecs, "png_decode") else None
        except ImportError:
            _imagecodecs = None
        _imagecodecs_checked = True
    return _imagecodecs


def _fit_channels(arr: np.ndarray, c: int) -> np.ndarray:
    """Bring a decoded (H, W[, k]) array to (H, W, c) uint8: drop alpha, widen 16-bit."""
    if arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    k = arr.shape[2]
    if k == c:
        return arr
    if c == 1:  # grey + alpha
        return arr[:, :, :1]
    if k == 1:
        return np.repeat(arr, 3, axis=2)
    if k == 2:
        return np.repeat(arr[:, :, :1], 3, axis=2)
    return arr[:, :, :3]


def pil_to_array(im, c: int) -> np.ndarray:
    """A loaded PIL image as (H, W, c) uint8 (c = 1 or 3)."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im)
        if mode.startswith("I;16"):
            arr = (arr.astype(np.uint16) >> 8).astype(np.uint8)
        return _fit_channels(arr, c)
    if c == 1:
        if mode != "L":
            im = im.convert("L")
    elif mode != "RGB":
        im = im.convert("RGB")
    return _fit_channels(np.asarray(im), c)


def _decode_png(data, c: int, out: np.ndarray | None):
    ic = _get_imagecodecs()
    if ic is None:
        return None
    try:
        if out is not None:
            # libpng writes straight into the staging view when the layouts match.
            # decode straight into the staging view where imagecodecs accepts it (same shape and
            # dtype); otherwise it refuses with ValueError/TypeError and we decode then copy
            with contextlib.suppress(ValueError, TypeError):
                target = out if c == 3 else out.reshape(out.shape[0], out.shape[1])
                if ic.png_decode(data, out=target) is not None:
                    return out
        arr = ic.png_decode(data)
    except Exception as e:  # imagecodecs raises its own PngError
        raise DecodeError(f"corrupt PNG data: {e}") from e
    return _fit_channels(np.asarray(arr), c)


def decode_other(data, header: ImageHeader) -> np.ndarray:
    """Decode a non-JPEG (or CMYK JPEG) image at full size to a fresh (H, W, C) uint8 array."""
    c = output_channels(header)
    if header.codec == "png":
        arr = _decode_png(bytes(data) if not isinstance(data, bytes) else data, c, None)
        if arr is not None:
            return arr
    return _decode_pil(data, header, c)


def _decode_pil(data, header: ImageHeader, c: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im.load()
            arr = pil_to_array(im, c)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(f"corrupt {header.codec.upper()} data: {e}") from e
    if arr.shape != (header.height, header.width, c):
        raise DecodeError(
            f"{header.codec} decoded to {arr.shape}, header says {(header.height, header.width, c)}"
        )
    return arr


def decode_other_into(data, header: ImageHeader, out: np.ndarray) -> None:
    """Decode a non-JPEG (or CMYK JPEG) image at full size into ``out`` (H, W, C) uint8."""
    c = out.shape[2]
    if header.codec == "png":
        arr = _decode_png(data if isinstance(data, bytes) else bytes(data), c, out)
        if arr is out:
            return
        if arr is not None:
            np.copyto(out, arr)
            return
    np.copyto(out, _decode_pil(data, header, c))
