"""Collate: rows or column batches into one batch of numpy arrays and byte lists (64-byte aligned
buffers, from ``buffers``, re-exported here)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .buffers import ALIGNMENT, aligned_empty

__all__ = ["aligned_empty", "collate_rows", "ALIGNMENT", "BFloat16Bits"]


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
