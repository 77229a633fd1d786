"""Arrow and Parquet sources: pyarrow Tables and RecordBatches, Parquet files and folders.

Arrow types map to column values: binary to bytes, strings to str, numbers to numpy arrays,
``fixed_size_list`` (and lists of equal length) to fixed-shape arrays, ``list``/``large_list``
whose lengths vary to ragged rows (``list<float>`` -> "float32[*]", ``list<fixed_size_list<float,
14>>`` -> "float32[*,14]"), ``struct<bytes: binary, path: string>`` (Hugging Face ``datasets`` /
LeRobot image values) to ``{"bytes", "path"}`` dicts that become images. Nulls, at any level,
are one SchemaError naming the row and column (gpuload columns have no nulls).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..errors import MissingDependencyError, SchemaError
from .base import RawBatch, Source

__all__ = ["arrow_batch_to_columns", "arrow_source", "parquet_source", "IMAGE_STRUCT_FIELDS"]

IMAGE_STRUCT_FIELDS = ("bytes", "path")


def arrow_source(data: Any, batch_rows: int) -> Source:
    """A pyarrow Table or RecordBatch as raw column batches."""
    import pyarrow as pa

    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if not isinstance(data, pa.Table):
        raise SchemaError(
            f"cannot ingest pyarrow object {type(data).__name__}; pass a pyarrow Table"
        )
    meta = arrow_metadata(data.schema)

    def gen():
        start = 0
        for rb in data.to_batches(max_chunksize=batch_rows):
            yield arrow_batch_to_columns(rb, start), rb.num_rows
            start += rb.num_rows

    return Source(gen(), data.num_rows, meta)


def parquet_source(path: str, batch_rows: int) -> Source:
    """A Parquet file or folder (local or an fsspec URL), read batch by batch."""
    try:
        import pyarrow.dataset as ds
    except ImportError as e:
        raise MissingDependencyError(
            "reading Parquet needs pyarrow: pip install 'gpuload[arrow]'"
        ) from e
    dataset = ds.dataset(path, format="parquet")
    total = dataset.count_rows()
    meta = arrow_metadata(dataset.schema)

    def gen():
        start = 0
        for rb in dataset.to_batches(batch_size=batch_rows):
            if rb.num_rows == 0:
                continue
            yield arrow_batch_to_columns(rb, start), rb.num_rows
            start += rb.num_rows

    return Source(gen(), total, meta)


def arrow_metadata(schema) -> dict[str, Any]:
    """The table metadata gpuload stored in an Arrow schema (key ``gpuload``), if any."""
    md = schema.metadata or {}
    raw = md.get(b"gpuload")
    if raw:
        try:
            return json.loads(raw)
        except ValueError:
            return {}
    return {}


def arrow_batch_to_columns(rb, row0: int = 0) -> RawBatch:
    """A pyarrow RecordBatch as {name: list of bytes/str or numpy array}, zero-copy where possible."""
    return {name: arrow_array(rb.column(i), name, row0) for i, name in enumerate(rb.schema.names)}


def _null_error(arr, name: str, row0: int) -> SchemaError:
    bad = int(np.flatnonzero(~np.asarray(arr.is_valid()))[0])
    return SchemaError(
        f"row {row0 + bad}, column {name!r}: null value (gpuload columns have no nulls)"
    )


def arrow_array(arr, name: str, row0: int) -> Any:
    """One Arrow array (a column of ``len(arr)`` rows from row ``row0``) as column values."""
    import pyarrow.types as pt

    if arr.null_count:
        raise _null_error(arr, name, row0)
    t = arr.type
    if pt.is_binary(t) or pt.is_large_binary(t):
        bufs = arr.buffers()
        off_dtype = np.int64 if pt.is_large_binary(t) else np.int32
        offs = np.frombuffer(bufs[1], dtype=off_dtype)[arr.offset : arr.offset + len(arr) + 1]
        data = bufs[2].to_pybytes() if bufs[2] is not None else b""
        o = offs.tolist()
        return [data[o[i] : o[i + 1]] for i in range(len(arr))]
    if pt.is_fixed_size_binary(t):
        return [v.as_py() for v in arr]
    if pt.is_string(t) or pt.is_large_string(t):
        return arr.to_pylist()
    if pt.is_boolean(t) or pt.is_integer(t) or pt.is_floating(t):
        return arr.to_numpy(zero_copy_only=False)
    if pt.is_fixed_size_list(t) or pt.is_list(t) or pt.is_large_list(t):
        return _arrow_nested(arr, name, row0)
    if pt.is_dictionary(t):
        return arrow_array(arr.cast(t.value_type), name, row0)
    if pt.is_struct(t):
        return _arrow_image_struct(arr, name, row0)
    raise SchemaError(
        f"column {name!r}: arrow type {t} is not supported (use binary, string, numbers, lists "
        "or struct<bytes, path> images)"
    )


def _is_list(t) -> bool:
    import pyarrow.types as pt

    return pt.is_fixed_size_list(t) or pt.is_list(t) or pt.is_large_list(t)


def _arrow_nested(arr, name: str, row0: int) -> np.ndarray | list[np.ndarray]:
    """Nested lists as a fixed-shape array (n, *dims) when every level has one length, or as
    ragged rows (a list of (n_i, *inner) arrays) when only the outermost lengths vary."""
    import pyarrow.types as pt

    n = len(arr)
    bounds = np.arange(n + 1, dtype=np.int64)  # each row's element range at the current level
    dims: list[int | None] = []
    cur = arr
    while _is_list(cur.type):
        if pt.is_fixed_size_list(cur.type):
            size = cur.type.list_size
            bounds = bounds * size
        else:
            offs = np.asarray(cur.offsets, dtype=np.int64)
            offs = offs - offs[0]
            lens = np.diff(offs)
            varies = bool(lens.size and (lens != lens[0]).any())
            if varies and dims:
                bad = int(np.searchsorted(bounds, np.flatnonzero(lens != lens[0])[0], "right")) - 1
                raise SchemaError(
                    f"row {row0 + bad}, column {name!r}: nested lists whose inner lengths vary "
                    f"({int(lens[0])} and others); only the first dimension may vary"
                )
            if not dims and lens.size and not lens.any():
                varies = True  # only empty lists: rows of length 0, not a 0-wide array
            size = None if varies else (int(lens[0]) if lens.size else 0)
            bounds = offs[bounds]
        dims.append(size)
        cur = cur.flatten()
        if cur.null_count:
            first = int(np.flatnonzero(~np.asarray(cur.is_valid()))[0])
            bad = int(np.searchsorted(bounds, first, side="right")) - 1
            raise SchemaError(
                f"row {row0 + bad}, column {name!r}: null value inside a list "
                "(gpuload columns have no nulls)"
            )
    values = cur.to_numpy(zero_copy_only=False)
    if dims[0] is None:
        inner = tuple(int(d) for d in dims[1:])  # type: ignore[arg-type]
        b = bounds.tolist()
        return [values[b[i] : b[i + 1]].reshape(-1, *inner) for i in range(n)]
    try:
        return values.reshape(n, *dims)
    except ValueError:
        raise SchemaError(f"column {name!r}: cannot reshape nested lists to {dims}") from None


def _arrow_image_struct(arr, name: str, row0: int) -> list[dict[str, Any]]:
    """``struct<bytes: binary, path: string>`` (how Hugging Face ``datasets`` and LeRobot store
    images) as ``{"bytes": b or None, "path": p or None}`` dicts; other structs are refused."""
    fields = [arr.type.field(i).name for i in range(arr.type.num_fields)]
    if not fields or not set(fields) <= set(IMAGE_STRUCT_FIELDS):
        raise SchemaError(
            f"column {name!r}: arrow type {arr.type} is not supported; of structs only image "
            "values struct<bytes: binary, path: string> are"
        )
    children = dict(zip(fields, arr.flatten()))
    data = children["bytes"].to_pylist() if "bytes" in children else [None] * len(arr)
    paths = children["path"].to_pylist() if "path" in children else [None] * len(arr)
    return [{"bytes": b, "path": p} for b, p in zip(data, paths)]
