"""64-byte aligned host buffers: what DLPack consumers need to take memory without a copy
(TensorFlow aborts on anything else; XLA's CPU client copies anything else). Every array the
reader and the loader hand out is allocated here."""

from __future__ import annotations

import numpy as np

__all__ = ["ALIGNMENT", "aligned_empty"]

ALIGNMENT = 64


def aligned_empty(shape, dtype, align: int = ALIGNMENT) -> np.ndarray:
    """An uninitialised C-contiguous array whose data pointer is a multiple of ``align``."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + nbytes].view(dtype).reshape(shape)
