"""Image values as robot and vision datasets hand them over, turned into encoded image bytes.

An image (or bytes) column takes, per row:

- encoded bytes (``bytes``, ``bytearray``, ``memoryview``, a 1-D uint8 array): stored as given;
- a Hugging Face ``datasets`` image value ``{"bytes": b, "path": p}`` (also what a Parquet
  ``struct<bytes, path>`` becomes): ``b`` when it is not None, else the file at ``p`` if it
  exists on this machine (a relative path is relative to the working directory); a URL or a
  missing file is refused, nothing is fetched from the network;
- a ``PIL.Image.Image`` (image columns only): see ``ImageFormat``;
- a uint8 array of shape (H, W), (H, W, 1) or (H, W, 3) (image columns only; without a schema
  saying "image" such arrays stay array columns): encoded as PNG, or JPEG at quality 95 with
  ``image_format="jpeg"``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..errors import SchemaError
from ..schema import detect_codec

__all__ = ["IMAGE_FORMATS", "JPEG_QUALITY", "is_image_value", "image_value_bytes"]

IMAGE_FORMATS = ("png", "jpeg", "keep")
JPEG_QUALITY = 95
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG"}  # gpuload codec -> PIL's format name


def check_image_format(image_format: str) -> str:
    """``image_format`` if it is one gpuload knows, else a ValueError listing them."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    return image_format


def is_image_value(v: Any) -> bool:
    """Whether ``v`` is an image as a dataset library hands it over: a PIL image or a
    ``{"bytes", "path"}`` dict (how schema inference tells an image column)."""
    if isinstance(v, Mapping):
        return bool(v) and set(v) <= {"bytes", "path"}
    return _is_pil(v)


def _is_pil(v: Any) -> bool:
    mod = type(v).__module__ or ""
    if not mod.startswith("PIL"):
        return False
    from PIL import Image

    return isinstance(v, Image.Image)


def image_value_bytes(x: Any, image: bool, image_format: str, where: Callable[[], str]) -> bytes:
    """The bytes stored for one value of an image column (``image=True``) or a bytes column.
    ``where()`` names the table, row and column in the SchemaError raised for anything else."""
    if isinstance(x, bytes):
        return x
    if isinstance(x, (bytearray, memoryview)):
        return bytes(x)
    if isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 1:
        return x.tobytes()
    if isinstance(x, Mapping) and x and set(x) <= {"bytes", "path"}:
        return _dict_bytes(x, where)
    if image and _is_pil(x):
        return pil_bytes(x, image_format)
    if image and isinstance(x, np.ndarray) and x.ndim in (2, 3):
        return _array_bytes(x, image_format, where)
    kind = "image" if image else "bytes"
    raise SchemaError(
        f"{where()}: expected bytes ({kind}), got {type(x).__name__}"
        + (
            "; an image column also takes {'bytes', 'path'} dicts, PIL images and uint8 HxWxC "
            "arrays"
            if image
            else ""
        )
    )


def _dict_bytes(x: Mapping[str, Any], where: Callable[[], str]) -> bytes:
    """A ``{"bytes": b, "path": p}`` image value: ``b``, else the local file ``p``."""
    data, path = x.get("bytes"), x.get("path")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if data is not None:
        raise SchemaError(f"{where()}: 'bytes' of an image value is a {type(data).__name__}")
    if not isinstance(path, str) or not path:
        raise SchemaError(f"{where()}: an image value with neither bytes nor a path (null)")
    if "://" in path:
        raise SchemaError(
            f"{where()}: the image value has no bytes and its path {path!r} is a URL; gpuload "
            "does not fetch images from the network: download them and pass bytes or local paths"
        )
    local = os.path.expanduser(path)
    if not os.path.isfile(local):
        raise SchemaError(
            f"{where()}: the image value has no bytes and its path {path!r} is not a file on "
            f"this machine (relative paths are relative to {os.getcwd()!r})"
        )
    with open(local, "rb") as fh:
        return fh.read()


def pil_bytes(img: Any, image_format: str) -> bytes:
    """A PIL image's stored bytes. ``"png"`` (the default): encoded as PNG, lossless for the
    pixels the image holds. ``"keep"``: the image's original encoded bytes when PIL still has
    them (an image opened from a file or a buffer, ``img.format`` set) and they decode to
    exactly the image's pixels (so an image edited in place is not stored as its old bytes),
    else PNG. ``"jpeg"``: the original bytes of an unmodified JPEG, else a new JPEG at quality
    95 (lossy: only when asked for)."""
    check_image_format(image_format)
    if image_format != "png":
        orig = _original_bytes(img)
        if orig is not None and (image_format == "keep" or detect_codec(orig) == "jpeg"):
            return orig
    fmt = "JPEG" if image_format == "jpeg" else "PNG"
    if fmt == "JPEG" and img.mode not in ("RGB", "L", "CMYK"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _original_bytes(img: Any) -> bytes | None:
    """The bytes a PIL image was decoded from, if PIL still holds them (the buffer it was
    opened from, or the file it names) and they decode to the same pixels; else None."""
    from PIL import Image

    if not getattr(img, "format", None):
        return None
    data = None
    fp = getattr(img, "fp", None)
    if isinstance(fp, io.BytesIO):
        data = fp.getvalue()
    elif getattr(img, "filename", None) and os.path.isfile(img.filename):
        with open(img.filename, "rb") as fh:
            data = fh.read()
    if data is None or detect_codec(data) is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as again:
            same = again.mode == img.mode and again.size == img.size
            same = same and again.tobytes() == img.tobytes()
    except (OSError, ValueError):
        return None
    return data if same else None


def _array_bytes(x: np.ndarray, image_format: str, where: Callable[[], str]) -> bytes:
    """A uint8 (H, W), (H, W, 1) or (H, W, 3) array encoded as PNG (JPEG q95 when asked)."""
    from PIL import Image

    if x.dtype != np.uint8 or (x.ndim == 3 and x.shape[2] not in (1, 3)) or 0 in x.shape:
        raise SchemaError(
            f"{where()}: an image array must be uint8 of shape (H, W), (H, W, 1) or (H, W, 3), "
            f"got {x.dtype} {x.shape}"
        )
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    img = Image.fromarray(np.ascontiguousarray(x))
    return pil_bytes(img, "jpeg" if image_format == "jpeg" else "png")
