"""Collate: rows or column batches into one batch of numpy arrays and byte lists, and 64-byte
aligned buffers (TensorFlow aborts on DLPack buffers that are not 64-byte aligned)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["aligned_empty", "collate_rows", "ALIGNMENT", "BFloat16Bits"]

ALIGNMENT = 64


def aligned_empty(shape, dtype, align: int = ALIGNMENT) -> np.ndarray:
    """An uninitialised C-contiguous array whose data pointer is a multiple of ``align``."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + nbytes].view(dtype).reshape(shape)


def collate_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack a list of row dicts: numbers and arrays -> numpy arrays; bytes and str -> lists;
    anything else (e.g. framework tensors a transform produced) -> a list, left to the adapter."""
    if not rows:
        return {}
    out: dict[str, Any] = {}
    for k in rows[0]:
        vals = [r[k] for r in rows]
        v0 = vals[0]
        if isinstance(v0, (bytes, bytearray, str)):
            out[k] = vals
        elif isinstance(v0, (int, float, bool, np.generic)) or (
            isinstance(v0, np.ndarray) and v0.dtype != object
        ):
            try:
                out[k] = np.stack([np.asarray(v) for v in vals])
            except ValueError:
                out[k] = vals  # ragged shapes from a transform: left as a list
        else:
            out[k] = vals
    return out


class BFloat16Bits:
    """A uint16 array (host or device) holding bfloat16 bit patterns; exporters reinterpret it
    as torch.bfloat16 / tf.bfloat16 without a copy (numpy has no bfloat16)."""

    __slots__ = ("bits",)

    def __init__(self, bits) -> None:
        self.bits = bits

    @property
    def shape(self):
        return self.bits.shape

    def __len__(self) -> int:
        return len(self.bits)

    def __getitem__(self, key) -> BFloat16Bits:
        return BFloat16Bits(self.bits[key])
