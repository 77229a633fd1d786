"""Iterables of column batches: a generator of dicts of lists/arrays, pyarrow RecordBatches or
Tables, or pandas DataFrames, ingested as one table version committed once at the end (ingest
writes every batch, then commits; a failure midway leaves the table as it was).

Telling column batches from row dicts (``batches=None``): RecordBatches, Tables and DataFrames
are batches; a dict is a batch when each value is a sequence, all of one length, and at least
one of them holds values no cell of a row can be (bytes, str, dicts, images). A dict of
numeric arrays of one length is a row just as well (a row of two float32[14] columns looks
like a batch of 14 rows), so it is read as a row, as before: pass ``batches=True`` for such
batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from itertools import chain
from typing import Any

import numpy as np

from ..errors import SchemaError
from .arrow import arrow_batch_to_columns
from .base import RawBatch, Source
from .frames import pandas_columns

__all__ = ["batches_source", "looks_like_batches"]


def _is_frame(x: Any) -> bool:
    mod = type(x).__module__ or ""
    return mod.startswith("pandas") and hasattr(x, "columns") and hasattr(x, "iloc")


def _is_arrow_batch(x: Any) -> bool:
    mod = type(x).__module__ or ""
    return mod.startswith("pyarrow") and hasattr(x, "num_rows") and hasattr(x, "schema")


def _is_sequence(v: Any) -> bool:
    return hasattr(v, "__len__") and not isinstance(v, (str, bytes, bytearray, memoryview, Mapping))


def looks_like_batches(first: Any) -> bool:
    """Whether the first item of an iterable is a column batch (see the module docstring)."""
    if _is_frame(first) or _is_arrow_batch(first):
        return True
    if not isinstance(first, Mapping) or not first:
        return False
    values = list(first.values())
    if not all(_is_sequence(v) for v in values) or len({len(v) for v in values}) != 1:
        return False
    for v in values:
        if isinstance(v, np.ndarray) and v.dtype != object:
            continue
        if len(v) and not isinstance(v[0], (int, float, bool, np.generic, np.ndarray, list, tuple)):
            return True  # bytes, str, dicts, images: no cell of a row is a list of these
    return False


def batches_source(items: Iterable[Any]) -> Source:
    """Column batches from ``items`` (each a dict of equal-length columns, a RecordBatch, a
    pyarrow Table or a DataFrame), as they come; the row count is not known up front."""

    def gen() -> Iterator[tuple[RawBatch, int]]:
        row = 0
        for k, item in enumerate(items):
            batch, n = _one_batch(item, k, row)
            row += n
            yield batch, n

    return Source(gen(), None)


def _one_batch(item: Any, k: int, row0: int) -> tuple[RawBatch, int]:
    if _is_frame(item):
        return pandas_columns(item, row0), len(item)
    if _is_arrow_batch(item):
        import pyarrow as pa

        if isinstance(item, pa.Table):
            table = item.combine_chunks()
            parts = table.to_batches()
            item = parts[0] if parts else pa.RecordBatch.from_pylist([], schema=table.schema)
        return arrow_batch_to_columns(item, row0), item.num_rows
    if not isinstance(item, Mapping):
        raise SchemaError(
            f"batch {k} (from row {row0}): expected a dict of columns, a pyarrow RecordBatch or "
            f"a pandas DataFrame, got {type(item).__name__}"
        )
    lengths = {}
    for name, v in item.items():
        if not _is_sequence(v):
            raise SchemaError(
                f"batch {k} (from row {row0}), column {name!r}: expected a list or array of "
                f"values, got {type(v).__name__}"
            )
        lengths[str(name)] = len(v)
    if len(set(lengths.values())) > 1:
        raise SchemaError(f"batch {k} (from row {row0}): columns have different lengths: {lengths}")
    n = next(iter(lengths.values()), 0)
    return {str(name): v for name, v in item.items()}, n


def peek(items: Iterable[Any]) -> tuple[Any, Iterable[Any]]:
    """The first item of ``items`` and an iterable that still yields it (None when empty)."""
    it = iter(items)
    for first in it:
        return first, chain([first], it)
    return None, ()
