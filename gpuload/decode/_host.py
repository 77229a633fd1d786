"""Per-image host fallback: PNG through imagecodecs (libpng) when installed, anything else
(and CMYK JPEGs) through PIL. Always full size; output is RGB, or one channel for grey sources.

PIL images are checked after ``Image.open`` (which reads only the header) and before
``load()``: their size must match the header gpuload checked and lie within the pixel limit,
so PIL never decodes more pixels than were planned. Any PIL failure is a DecodeError."""

from __future__ import annotations

import contextlib
import io

import numpy as np

from gpuload.errors import DecodeError

from .header import DEFAULT_MAX_PIXELS, ImageHeader, check_size, output_channels

__all__ = ["decode_other_into", "decode_other", "pil_to_array", "open_pil"]

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


def decode_other(
    data, header: ImageHeader, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode a non-JPEG (or CMYK JPEG) image at full size to a fresh (H, W, C) uint8 array."""
    check_size(header.height, header.width, max_pixels, header.codec.upper())
    c = output_channels(header)
    if header.codec == "png":
        arr = _decode_png(bytes(data) if not isinstance(data, bytes) else data, c, None)
        if arr is not None:
            return arr
    return _decode_pil(data, header, c, max_pixels)


def open_pil(data, header: ImageHeader, max_pixels: int | None):
    """``Image.open`` (header only) of an image whose size matches ``header`` and the limit,
    checked before any pixel is decoded; DecodeError otherwise."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data if isinstance(data, bytes) else bytes(data)))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"too many pixels: Pillow refuses the image: {e}") from e
    w, h = im.size
    try:
        check_size(h, w, max_pixels, header.codec.upper())
        if (h, w) != (header.height, header.width):
            raise DecodeError(
                f"PIL reads a {h}x{w} image, the header said {header.height}x{header.width}"
            )
    except DecodeError:
        im.close()
        raise
    return im


def _decode_pil(data, header: ImageHeader, c: int, max_pixels: int | None) -> np.ndarray:
    try:
        with open_pil(data, header, max_pixels) as im:
            im.load()
            arr = pil_to_array(im, c)
    except DecodeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(f"corrupt {header.codec.upper()} data: {e}") from e
    except Exception as e:  # noqa: BLE001 - MemoryError, bomb warnings as errors, PIL internals
        raise DecodeError(f"{header.codec.upper()} decode failed: {type(e).__name__}: {e}") from e
    if arr.shape != (header.height, header.width, c):
        raise DecodeError(
            f"{header.codec} decoded to {arr.shape}, header says {(header.height, header.width, c)}"
        )
    return arr


def decode_other_into(
    data, header: ImageHeader, out: np.ndarray, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> None:
    """Decode a non-JPEG (or CMYK JPEG) image at full size into ``out`` (H, W, C) uint8."""
    check_size(header.height, header.width, max_pixels, header.codec.upper())
    c = out.shape[2]
    if header.codec == "png":
        arr = _decode_png(data if isinstance(data, bytes) else bytes(data), c, out)
        if arr is out:
            return
        if arr is not None:
            np.copyto(out, arr)
            return
    np.copyto(out, _decode_pil(data, header, c, max_pixels))
