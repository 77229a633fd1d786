"""Batch-decode contract shared by every backend.

A decoder writes a batch of images HWC uint8, back to back (each start aligned to
:data:`STAGING_ALIGN` bytes), into a caller-owned staging buffer that is allocated once and
reused, and returns where each image landed plus how it maps to the original image:

* ``meta[i] = (offset, H, W, C)``: image *i* is ``staging[offset : offset + H*W*C]`` viewed as
  ``(H, W, C)``; C is 3 (RGB) or 1 (grey source; consumers replicate it).
* ``origin[i] = (y0, x0)`` and ``scale[i] = (sy, sx)``: decoded pixel ``(r, c)`` covers original
  pixels ``[y0 + r*sy, y0 + (r+1)*sy) x [x0 + c*sx, x0 + (c+1)*sx)``. A crop window given in
  original coordinates maps into the decoded image as ``(y - y0) / sy``, ``(x - x0) / sx``.
  For libjpeg DCT scaling by 1/s, ``sy = sx = s`` and the decoded size is ``ceil(H/s) x
  ceil(W/s)``; a region decode reports the region's actual origin (it may have been widened to
  MCU boundaries, or to whole rows).

Before anything is sized from a header, every image's dimensions are checked against the
decoder's pixel limit (:attr:`Decoder.max_pixels`, default :data:`DEFAULT_MAX_PIXELS`): an
image over it, or with zero or negative dimensions, is a :class:`DecodeError` naming its index.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpuload.device import Device
from gpuload.errors import DecodeError, GpuloadError

from .header import (
    DEFAULT_MAX_PIXELS,
    ImageHeader,
    check_size,
    incomplete_reason,
    output_channels,
    read_header,
    validate_max_pixels,
)

__all__ = [
    "STAGING_ALIGN",
    "DecodeRequest",
    "DecodedBatch",
    "Decoder",
    "DecodePlan",
    "StagingTooSmallError",
    "staging_nbytes",
    "staging_nbytes_for",
    "as_batch_error",
    "batch_error",
    "check_headers",
    "raise_first_error",
]

STAGING_ALIGN = 64
"""Every image in the staging buffer starts at a multiple of this many bytes."""

_SCALES = (1, 2, 4, 8)


class StagingTooSmallError(GpuloadError, ValueError):
    """The caller's staging buffer cannot hold the decoded batch (it is never reallocated)."""


@dataclass(frozen=True, slots=True)
class DecodeRequest:
    """What to decode for one image.

    ``scale``: DCT scale denominator s in {1, 2, 4, 8}; the JPEG is decoded at 1/s of its size
    where the backend can (libjpeg-turbo DCT scaling: ``ceil(H/s) x ceil(W/s)``). Backends that
    cannot scale decode at full size and report ``scale == 1`` in the batch.
    ``roi``: optional region ``(y0, x0, y1, x1)`` (half-open, original-image pixels) that the
    caller will read; backends may decode less than the full image as long as the region is
    covered, and report the decoded region's origin.
    """

    scale: int = 1
    roi: tuple[int, int, int, int] | None = None

    def __post_init__(self):
        if self.scale not in _SCALES:
            raise ValueError(f"DecodeRequest.scale must be one of {_SCALES}, got {self.scale!r}")
        if self.roi is not None:
            if len(self.roi) != 4:
                raise ValueError(f"DecodeRequest.roi must be (y0, x0, y1, x1), got {self.roi!r}")
            object.__setattr__(self, "roi", tuple(int(v) for v in self.roi))
            y0, x0, y1, x1 = self.roi
            if not (0 <= y0 < y1 and 0 <= x0 < x1):
                raise ValueError(f"DecodeRequest.roi {self.roi!r} is empty or negative")


FULL = DecodeRequest()


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """How one image will be decoded: output shape, mapping, and a backend-specific method."""

    height: int
    width: int
    channels: int
    origin_y: int = 0
    origin_x: int = 0
    scale: int = 1
    method: str = ""
    arg: Any = None

    @property
    def nbytes(self) -> int:
        return self.height * self.width * self.channels


@dataclass
class DecodedBatch:
    """Where each decoded image of a batch lies in the staging buffer, and how it maps back."""

    meta: np.ndarray  # (N, 4) int64: offset, H, W, C
    origin: np.ndarray  # (N, 2) int64: y0, x0 of the decoded region, original pixels
    scale: np.ndarray  # (N, 2) float64: sy, sx, original pixels per decoded pixel
    staging: Any
    nbytes: int  # bytes of staging used (end of the last image)
    backend: str
    device: Device

    def __len__(self) -> int:
        return int(self.meta.shape[0])

    def image(self, i: int):
        """Image *i* as an (H, W, C) view of the staging buffer (host or device array)."""
        off, h, w, c = (int(v) for v in self.meta[i])
        flat = _flat_view(self.staging)
        return flat[off : off + h * w * c].reshape(h, w, c)

    def map_window(self, i: int, window: tuple[float, float, float, float]):
        """Map a window (y0, x0, y1, x1) in original pixels into image *i*'s decoded pixels."""
        oy, ox = self.origin[i]
        sy, sx = self.scale[i]
        y0, x0, y1, x1 = window
        return ((y0 - oy) / sy, (x0 - ox) / sx, (y1 - oy) / sy, (x1 - ox) / sx)


def _align(n: int) -> int:
    return (n + STAGING_ALIGN - 1) // STAGING_ALIGN * STAGING_ALIGN


def _flat_view(staging):
    if isinstance(staging, np.ndarray):
        return staging.reshape(-1)
    shape = getattr(staging, "shape", None)
    if shape is not None and len(shape) != 1:
        return staging.reshape(int(np.prod(shape)))
    return staging


def batch_error(index: int, message: str, cause: BaseException | None = None) -> DecodeError:
    """A DecodeError naming the image's index in the batch; callers add table/row/column."""
    err = DecodeError(f"image {index} of the batch: {message}")
    err.index = index  # type: ignore[attr-defined]
    if cause is not None:
        err.__cause__ = cause
    return err


def as_batch_error(index: int, e: Exception) -> DecodeError:
    """Any exception raised for image ``index`` of a batch, as a DecodeError naming the index
    (DecodeError messages kept, other types named: MemoryError, DecompressionBombError...)."""
    if isinstance(e, DecodeError):
        if getattr(e, "index", None) == index:
            return e
        return batch_error(index, str(e), e)
    return batch_error(index, f"{type(e).__name__}: {e}", e)


def raise_first_error(errors) -> None:
    """Raise the error of the lowest failing index, as a DecodeError naming that index
    (whatever the exception type: MemoryError, PIL's DecompressionBombError, a library's own);
    KeyboardInterrupt, SystemExit and other non-Exception errors propagate unchanged."""
    for i, e in enumerate(errors):
        if e is not None:
            if not isinstance(e, Exception):
                raise e
            raise as_batch_error(i, e)


def normalize_requests(requests, n: int) -> Sequence[DecodeRequest]:
    if requests is None:
        return [FULL] * n
    if isinstance(requests, DecodeRequest):
        return [requests] * n
    if len(requests) != n:
        raise ValueError(f"{len(requests)} requests for a batch of {n} images")
    out = []
    for r in requests:
        if r is None:
            out.append(FULL)
        elif isinstance(r, DecodeRequest):
            out.append(r)
        elif isinstance(r, int):
            out.append(DecodeRequest(scale=r))
        else:  # (scale, roi) pairs
            out.append(DecodeRequest(*r))
    return out


def parse_headers(
    datas, headers=None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> list[ImageHeader]:
    """Headers of a batch (parsed, or the caller's checked), each within ``max_pixels``; a
    DecodeError names the index of the first image that fails."""
    if headers is not None:
        if len(headers) != len(datas):
            raise ValueError(f"{len(headers)} headers for a batch of {len(datas)} images")
        check_headers(headers, max_pixels)
        return list(headers)
    out = []
    for i, d in enumerate(datas):
        try:
            out.append(read_header(d, max_pixels))
        except DecodeError as e:
            raise batch_error(i, str(e), e) from e
        except Exception as e:  # noqa: BLE001 - any header failure is this image's DecodeError
            raise batch_error(i, f"{type(e).__name__}: {e}", e) from e
    return out


def check_headers(headers: Sequence[ImageHeader], max_pixels: int | None) -> None:
    """DecodeError naming the index of the first header with zero, negative or too many pixels
    (checked before any buffer is sized from the headers)."""
    for i, h in enumerate(headers):
        try:
            check_size(h.height, h.width, max_pixels, h.codec.upper())
        except DecodeError as e:
            raise batch_error(i, str(e), e) from e


def check_roi(i: int, header: ImageHeader, req: DecodeRequest) -> None:
    if req.roi is not None:
        y0, x0, y1, x1 = req.roi
        if y1 > header.height or x1 > header.width:
            raise ValueError(
                f"image {i} of the batch: roi {req.roi} lies outside the "
                f"{header.height}x{header.width} image"
            )


def full_plan(
    header: ImageHeader,
    req: DecodeRequest | None = None,
    *,
    scalable: bool = False,
    channels: int | None = None,
    method: str = "",
) -> DecodePlan:
    """Plan a full-image decode, at 1/s for a JPEG when the backend can DCT-scale."""
    c = output_channels(header) if channels is None else channels
    s = req.scale if (scalable and req is not None and header.codec == "jpeg") else 1
    return DecodePlan(-(-header.height // s), -(-header.width // s), c, 0, 0, s, method)


def staging_nbytes(
    headers: Sequence[ImageHeader],
    requests=None,
    decoder: Decoder | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> int:
    """Bytes of staging needed for a batch: exact for ``decoder``, else an upper bound.

    The upper bound (no decoder) is every image at full size with 3 channels, which holds for
    every backend whatever the requests. Size the buffer once with the largest batch the loader
    will see (for example its batch size times the largest image) and reuse it. An image over
    the pixel limit (``decoder.max_pixels``, else ``max_pixels``) raises DecodeError naming it.
    """
    if decoder is not None:
        return decoder.staging_nbytes(headers, requests)
    check_headers(headers, validate_max_pixels(max_pixels))
    return sum(_align(h.height * h.width * 3) for h in headers)


def staging_nbytes_for(
    batch_size: int,
    max_height: int,
    max_width: int,
    channels: int = 3,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> int:
    """Upper bound of staging bytes for any batch of ``batch_size`` images no larger than
    ``max_height`` x ``max_width``, for every backend and request (the loader's one-time sizing
    when it knows the dataset's largest image but not each batch's headers)."""
    limit = validate_max_pixels(max_pixels)
    if max_height <= 0 or max_width <= 0 or (limit is not None and max_height * max_width > limit):
        raise ValueError(
            f"staging for {max_height}x{max_width} images: sizes must be positive and at most "
            f"max_pixels={limit} pixels"
        )
    return batch_size * _align(max_height * max_width * channels)


class Decoder:
    """Base class: plans the batch layout, checks the staging buffer, delegates the decode.

    Subclasses set ``name`` and implement :meth:`_plan` and :meth:`_decode`. ``max_pixels``
    (default :data:`DEFAULT_MAX_PIXELS`, None: no limit) bounds each image's header dimensions
    before anything is sized from them; :func:`get_decoder` sets it.
    """

    name = "base"
    _max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __init__(self, device: Device, threads: int | None = None):
        self.device = device
        self.threads = max(1, int(threads if threads is not None else (os.cpu_count() or 1)))

    @property
    def max_pixels(self) -> int | None:
        """Most pixels (height x width) an image's header may claim; None means no limit."""
        return self._max_pixels

    @max_pixels.setter
    def max_pixels(self, value: int | None) -> None:
        self._max_pixels = validate_max_pixels(value)

    # ----- planning -------------------------------------------------------------------------
    def _plan(self, i: int, header: ImageHeader, req: DecodeRequest) -> DecodePlan:
        raise NotImplementedError

    def plan_batch(self, headers: Sequence[ImageHeader], requests=None) -> list[DecodePlan]:
        """One plan per image; DecodeError (naming the index) for an image over the limit."""
        check_headers(headers, self.max_pixels)
        reqs = normalize_requests(requests, len(headers))
        plans = []
        for i, (h, r) in enumerate(zip(headers, reqs, strict=True)):
            check_roi(i, h, r)
            plans.append(self._plan(i, h, r))
        return plans

    def output_shapes(
        self, headers: Sequence[ImageHeader], requests=None
    ) -> list[tuple[int, int, int]]:
        """(H, W, C) of each decoded image for these headers and requests."""
        return [(p.height, p.width, p.channels) for p in self.plan_batch(headers, requests)]

    def staging_nbytes(self, headers: Sequence[ImageHeader], requests=None) -> int:
        """Exact staging bytes this decoder needs for the batch (aligned starts included)."""
        return sum(_align(p.nbytes) for p in self.plan_batch(headers, requests))

    # ----- staging --------------------------------------------------------------------------
    def _staging_capacity(self, staging) -> int:
        """Size in bytes of a host staging buffer; subclasses handle device buffers."""
        if not isinstance(staging, np.ndarray):
            raise TypeError(
                f"{self.name} decoder on {self.device} needs a host numpy uint8 staging buffer, "
                f"got {type(staging).__name__}"
            )
        if (
            staging.dtype != np.uint8
            or not staging.flags.c_contiguous
            or not staging.flags.writeable
        ):
            raise TypeError("staging must be a writable, C-contiguous numpy uint8 array")
        return staging.nbytes

    # ----- the batch call -------------------------------------------------------------------
    def decode_batch(
        self, datas: Sequence[Any], requests=None, staging=None, *, headers=None, stream=None
    ) -> DecodedBatch:
        """Decode ``datas`` (bytes-like encoded images) into ``staging``.

        ``requests``: None (full size), one :class:`DecodeRequest` for all, or one per image.
        ``staging``: caller-owned uint8 buffer, reused across batches and never reallocated
        here (host numpy for CPU backends, a CUDA device array on GPU backends).
        ``headers``: optional pre-parsed :class:`ImageHeader` list (skips re-parsing).
        ``stream``: CUDA stream for GPU backends (numba stream, integer handle or None).
        Raises :class:`DecodeError` naming the failing image's index, and
        :class:`StagingTooSmallError` when ``staging`` cannot hold the batch.
        """
        if staging is None:
            raise TypeError("decode_batch needs a staging buffer; size it with staging_nbytes()")
        n = len(datas)
        hdrs = parse_headers(datas, headers, self.max_pixels)
        reqs = normalize_requests(requests, n)
        plans = []
        for i, (h, r) in enumerate(zip(hdrs, reqs, strict=True)):
            check_roi(i, h, r)
            plans.append(self._plan(i, h, r))
        offsets = np.empty(n, np.int64)
        end = 0
        for i, p in enumerate(plans):
            offsets[i] = end
            end += _align(p.nbytes)
        used = int(offsets[-1]) + plans[-1].nbytes if n else 0
        cap = self._staging_capacity(staging)
        if used > cap:
            raise StagingTooSmallError(
                f"staging buffer too small: this batch of {n} images needs {used} bytes, the "
                f"buffer holds {cap}; size it once with staging_nbytes(headers, requests, decoder) "
                f"over the largest batch"
            )
        # libjpeg pads a truncated stream with grey instead of failing: reject it up front.
        for i, (d, h) in enumerate(zip(datas, hdrs, strict=True)):
            reason = incomplete_reason(d, h)
            if reason is not None:
                raise batch_error(i, reason)
        if n:
            self._decode(datas, hdrs, plans, offsets, staging, stream)
        meta = np.empty((n, 4), np.int64)
        origin = np.empty((n, 2), np.int64)
        scale = np.empty((n, 2), np.float64)
        for i, p in enumerate(plans):
            meta[i] = (offsets[i], p.height, p.width, p.channels)
            origin[i] = (p.origin_y, p.origin_x)
            scale[i] = (p.scale, p.scale)
        return DecodedBatch(meta, origin, scale, staging, used, self.name, self.device)

    def _decode(self, datas, headers, plans, offsets, staging, stream) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release threads and library handles (they are re-created on next use)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} device={self.device} threads={self.threads}>"


def host_views(staging: np.ndarray, plans: Sequence[DecodePlan], offsets) -> list[np.ndarray]:
    flat = staging.reshape(-1)
    out = []
    for p, off in zip(plans, offsets, strict=True):
        off = int(off)
        out.append(flat[off : off + p.nbytes].reshape(p.height, p.width, p.channels))
    return out


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
