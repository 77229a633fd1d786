"""Ragged arrays: per row an array of shape (n_i, *inner) of one numeric dtype ("float32[*,14]"
for a trajectory of 14-DOF states, "int32[*]" for token ids).

A ragged row is stored as its values' little-endian bytes, so a column is read back by viewing
each row's byte range as (n_i, *inner). This module holds the three conversions around that
layout, each dependent on numpy and gpuload's errors only, so the writer side (ingest), the
reader and the loaders import it without a cycle:

- ``ragged_row_bytes``: one user value (list, nested list or array, n may be 0) to row bytes,
  checked against the column's dtype and inner shape;
- ``ragged_views``: a packed buffer of rows back to arrays (views, no copy);
- ``pad_ragged``: a batch of rows to one padded (B, L, *inner) array and the lengths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .errors import FormatError, SchemaError

__all__ = ["pad_ragged", "ragged_row_bytes", "ragged_views"]


def ragged_row_bytes(
    value: Any, dtype: np.dtype, inner: tuple[int, ...], where: Callable[[], str]
) -> bytes:
    """The stored bytes of one ragged row: ``value`` (shape (n, *inner), n >= 0; an empty list
    is n = 0) as little-endian ``dtype``. Integers must fit ``dtype``; floats are not stored in
    integer columns. ``where()`` names the table, row and column in the SchemaError raised for
    anything else."""
    try:
        a = np.asarray(value)
    except ValueError:
        raise SchemaError(f"{where()}: ragged nested lists inside one row") from None
    if a.size == 0:
        a = a.astype(dtype)  # no values to lose: [] is float64 to numpy, or an empty object array
    if a.dtype == object or a.dtype.kind not in "biuf":
        raise SchemaError(
            f"{where()}: expected an array of numbers, got {type(value).__name__} of {a.dtype}"
        )
    if a.size == 0 and a.ndim == 1:
        a = a.reshape(0, *inner)
    if a.ndim != 1 + len(inner) or a.shape[1:] != tuple(inner):
        want = ", ".join(["n", *map(str, inner)])
        raise SchemaError(f"{where()}: shape {a.shape} is not ({want}{',' if not inner else ''})")
    return _cast(a, dtype, where).tobytes()


def _cast(a: np.ndarray, dtype: np.dtype, where: Callable[[], str]) -> np.ndarray:
    """``a`` as contiguous little-endian ``dtype``: integers range-checked, kinds kept."""
    if a.dtype.kind in "iu" and dtype.kind in "iu":
        if a.size:
            info = np.iinfo(dtype)
            if int(a.min()) < info.min or int(a.max()) > info.max:
                raise SchemaError(f"{where()}: value out of range for {dtype.name}")
    elif not np.can_cast(a.dtype, dtype, casting="same_kind"):
        raise SchemaError(
            f"{where()}: {a.dtype} values cannot be stored as {dtype.name} without losing their kind"
        )
    return np.ascontiguousarray(a, dtype=dtype.newbyteorder("<"))


def ragged_views(
    buf: np.ndarray, bounds: Sequence[int], dtype: np.dtype, inner: tuple[int, ...], where: str
) -> list[np.ndarray]:
    """Rows of a packed uint8 buffer as arrays of shape (n_i, *inner): row i is bytes
    ``[bounds[i], bounds[i+1])``. Views of ``buf`` (writable if it is), no copy. A row whose
    byte length is not a whole number of inner elements is a FormatError naming ``where``."""
    dt = np.dtype(dtype).newbyteorder("<")
    item = dt.itemsize * int(np.prod(inner, dtype=np.int64))
    b = np.asarray(bounds, dtype=np.int64)
    lens = np.diff(b)
    bad = np.flatnonzero(lens % item) if item else np.array([], dtype=np.int64)
    if bad.size:
        k = int(bad[0])
        raise FormatError(
            f"{where}: row {k} of the read has {int(lens[k])} bytes, not a whole number of "
            f"{item}-byte elements; the offsets are corrupt"
        )
    out = []
    lo_hi = zip(b[:-1].tolist(), b[1:].tolist())
    if b[0] % dt.itemsize == 0 and buf.ctypes.data % dt.alignment == 0:
        flat = buf.view(np.uint8)
        for lo, hi in lo_hi:
            out.append(flat[lo:hi].view(dt).reshape(-1, *inner))
    else:  # unaligned: each row its own copy
        for lo, hi in lo_hi:
            out.append(np.frombuffer(buf[lo:hi].tobytes(), dtype=dt).reshape(-1, *inner))
    return out


def pad_ragged(
    values: Sequence[np.ndarray],
    inner_shape: tuple[int, ...] | Sequence[int],
    dtype: Any,
    max_len: int | None = None,
    pad_value: Any = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A batch of ragged rows as one array ``(B, L, *inner_shape)`` filled with ``pad_value``
    past each row's end, and the rows' lengths (int64, shape (B,)): what a model takes when it
    masks padding. ``L`` is the longest row in the batch, or ``max_len`` when given; a row
    longer than ``max_len`` is a ValueError naming it (rows are never silently truncated)."""
    inner = tuple(int(s) for s in inner_shape)
    dt = np.dtype(dtype)
    lengths = np.zeros(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        shape = np.shape(v)
        if len(shape) != 1 + len(inner) or tuple(shape[1:]) != inner:
            raise ValueError(
                f"pad_ragged: row {i} has shape {tuple(shape)}, expected (n, *{inner})"
            )
        lengths[i] = shape[0]
    longest = int(lengths.max()) if len(values) else 0
    if max_len is None:
        width = longest
    else:
        if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 0:
            raise ValueError(f"pad_ragged: max_len must be a non-negative integer, got {max_len!r}")
        width = int(max_len)
        if longest > width:
            k = int(np.flatnonzero(lengths > width)[0])
            raise ValueError(
                f"pad_ragged: row {k} has {int(lengths[k])} elements, more than max_len={width}; "
                "rows are not truncated: raise max_len or filter the rows"
            )
    out = np.full((len(values), width, *inner), pad_value, dtype=dt)
    for i, v in enumerate(values):
        if lengths[i]:
            out[i, : lengths[i]] = v
    return out, lengths
