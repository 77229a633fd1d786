"""Ingest: turn user data (dicts, rows, Arrow, Parquet, pandas, image folders, tables) into
validated column batches and write them as one committed version."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any

import numpy as np

from .errors import SchemaError, TableNotFoundError
from .format import ChunkInfo, Manifest
from .ragged import ragged_row_bytes
from .reader import TableReader
from .schema import Column, Schema, detect_codec
from .sources.arrow import arrow_batch_to_columns, arrow_source, parquet_source
from .sources.base import BATCH_ROWS, RawBatch, Source
from .sources.batches import batches_source, looks_like_batches, peek
from .sources.frames import pandas_columns
from .sources.images import check_image_format, image_value_bytes, is_image_value
from .sources.webdataset import WebDataset, looks_like_shards
from .storage import Store
from .versions import read_manifest
from .writer import DEFAULT_CHUNK_BYTES, ChunkWriter, TableWriter

__all__ = [
    "BlockStager",
    "Staged",
    "ingest_into",
    "infer_schema",
    "target_schema",
    "IMAGE_EXTENSIONS",
    "arrow_batch_to_columns",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif")


# -- sources ---------------------------------------------------------------------------------
def as_source(data: Any, batch_rows: int = BATCH_ROWS, batches: bool | None = None) -> Source:
    """Recognise the kind of ``data`` and stream it as raw column batches. ``batches``: whether
    an iterable yields column batches (True) or row dicts (False); None tells them apart by the
    first item (see ``gpuload.sources.batches``)."""
    if isinstance(data, TableReader):
        return Source(
            _table_batches(data, batch_rows),
            len(data),
            dict(data.schema.metadata),
            data.schema,
        )
    if isinstance(data, WebDataset):
        return data.source(batch_rows)
    if looks_like_shards(data):
        return WebDataset(data).source(batch_rows)
    if isinstance(data, (str, os.PathLike)):
        return _path_source(os.fspath(data), batch_rows)
    mod = type(data).__module__ or ""
    if mod.startswith("pyarrow"):
        return arrow_source(data, batch_rows)
    if mod.startswith("pandas") and hasattr(data, "columns") and hasattr(data, "iloc"):
        return _dict_source(pandas_columns(data), batch_rows)
    if isinstance(data, Mapping):
        return _dict_source(data, batch_rows)
    if isinstance(data, Iterable) and not isinstance(data, (bytes, bytearray)):
        if batches is None:
            if isinstance(data, (list, tuple)):
                first = data[0] if data else None
            else:
                first, data = peek(data)  # a generator: its first item is put back
            batches = looks_like_batches(first)
        return batches_source(data) if batches else _rows_source(data, batch_rows)
    raise SchemaError(
        f"cannot ingest a {type(data).__name__}: pass a dict of columns, an iterable of row dicts "
        "or of column batches, a pyarrow Table, a pandas DataFrame, a Parquet path, an image "
        "folder, WebDataset shards or a gpuload Table"
    )


def _batch_len(batch: Mapping[str, Any]) -> int:
    for v in batch.values():
        return len(v)
    return 0


def _dict_source(data: Mapping[str, Any], batch_rows: int) -> Source:
    if not data:
        raise SchemaError("cannot ingest a dict with no columns")
    cols = {}
    lengths = {}
    for k, v in data.items():
        if isinstance(v, (str, bytes)) or not hasattr(v, "__len__"):
            raise SchemaError(
                f"column {k!r}: expected a list or array of values, got {type(v).__name__}"
            )
        cols[str(k)] = v
        lengths[str(k)] = len(v)
    if len(set(lengths.values())) > 1:
        raise SchemaError(f"columns have different lengths: {lengths}")
    n = next(iter(lengths.values()))

    def gen():
        for lo in range(0, n, batch_rows):
            hi = min(n, lo + batch_rows)
            yield {k: v[lo:hi] for k, v in cols.items()}, hi - lo

    return Source(gen(), n)


def _rows_source(rows: Iterable[Mapping[str, Any]], batch_rows: int) -> Source:
    total = len(rows) if hasattr(rows, "__len__") else None

    def gen():
        it = iter(rows)
        start = 0
        names: list[str] | None = None
        while True:
            block = list(islice(it, batch_rows))
            if not block:
                return
            if names is None:
                if not isinstance(block[0], Mapping):
                    raise SchemaError(
                        f"row 0: expected a dict of column values, got {type(block[0]).__name__}"
                    )
                names = list(block[0].keys())
            out: dict[str, list] = {k: [] for k in names}
            for j, r in enumerate(block):
                if not isinstance(r, Mapping):
                    raise SchemaError(f"row {start + j}: expected a dict, got {type(r).__name__}")
                if r.keys() != out.keys():
                    extra = sorted(set(r) - set(names))
                    missing = sorted(set(names) - set(r))
                    raise SchemaError(
                        f"row {start + j}: "
                        + "; ".join(
                            ([f"unknown column(s) {extra}"] if extra else [])
                            + ([f"missing column(s) {missing}"] if missing else [])
                        )
                    )
                for k in names:
                    out[k].append(r[k])
            start += len(block)
            yield out, len(block)

    return Source(gen(), total)


def _table_batches(table: TableReader, batch_rows: int):
    """A gpuload table's rows in order, as raw column batches (read and verified)."""
    for lo in range(0, len(table), batch_rows):
        batch = table.read(np.arange(lo, min(len(table), lo + batch_rows), dtype=np.int64))
        yield batch, _batch_len(batch)


def _path_source(path: str, batch_rows: int) -> Source:
    if "://" not in path and not os.path.exists(path):
        raise SchemaError(f"ingest source {path!r} does not exist")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "manifest.json")):
            return as_source(TableReader.open(path), batch_rows)
        files = sorted(os.listdir(path))
        if any(f.endswith(".parquet") for f in files):
            return parquet_source(path, batch_rows)
        return _image_folder_source(path, batch_rows)
    if path.endswith(".parquet") or path.endswith(".pq") or "://" in path:
        return parquet_source(path, batch_rows)
    raise SchemaError(
        f"cannot ingest {path!r}: expected a Parquet file or folder, an image folder or a table"
    )


def _image_folder_source(root: str, batch_rows: int) -> Source:
    classes = sorted(
        d
        for d in os.listdir(root)
        if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")
    )
    if not classes:
        raise SchemaError(
            f"{root!r} has no class subfolders: an image folder needs root/<class>/<image> files"
        )
    items: list[tuple[str, int]] = []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls)):
            dirnames.sort()
            for f in sorted(filenames):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    items.append((os.path.join(dirpath, f), label))
    if not items:
        raise SchemaError(
            f"{root!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under its class folders"
        )

    def read(p: str) -> bytes:
        with open(p, "rb") as fh:
            return fh.read()

    def gen():
        with ThreadPoolExecutor(max_workers=8) as pool:
            for lo in range(0, len(items), batch_rows):
                block = items[lo : lo + batch_rows]
                paths = [p for p, _ in block]
                yield (
                    {
                        "image": list(pool.map(read, paths)),
                        "label": np.array([lbl for _, lbl in block], dtype=np.int64),
                        "path": [os.path.relpath(p, root).replace(os.sep, "/") for p in paths],
                    },
                    len(block),
                )

    hint = Schema(
        (
            Column("image", "image"),
            Column("label", "scalar", "int64", metadata={"class_names": classes}),
            Column("path", "text"),
        )
    )
    return Source(gen(), len(items), {"source": "image_folder", "class_names": classes}, hint)


# -- inference and validation -----------------------------------------------------------------
def infer_column(name: str, values: Any) -> Column:
    """The column type of a batch of values, from its first value (and array dtype/shape):
    arrays whose first dimension varies within the batch make a ragged column."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        if values.dtype.kind in "SUV":
            raise SchemaError(
                f"column {name!r}: numpy {values.dtype} arrays are not supported; pass lists of str/bytes"
            )
        if values.ndim == 1:
            return Column(name, "scalar", _dtype_name(values.dtype))
        return Column(name, "array", _dtype_name(values.dtype), tuple(values.shape[1:]))
    if len(values) == 0:
        raise SchemaError(f"column {name!r}: cannot infer a type from no values; pass schema=")
    v = values[0]
    if isinstance(v, (bytes, bytearray, memoryview)):
        # image vs bytes from the magic; the codec itself is recorded from all rows at commit
        return Column(name, "image") if detect_codec(v) else Column(name, "bytes")
    if isinstance(v, str):
        return Column(name, "text")
    if is_image_value(v):  # {"bytes", "path"} dicts (Hugging Face datasets), PIL images
        return Column(name, "image")
    if isinstance(v, (bool, np.bool_)):
        return Column(name, "scalar", "bool")
    if isinstance(v, (int, np.integer)):
        return Column(
            name,
            "scalar",
            _dtype_name(np.asarray(v).dtype) if isinstance(v, np.integer) else "int64",
        )
    if isinstance(v, (float, np.floating)):
        return Column(
            name,
            "scalar",
            _dtype_name(np.asarray(v).dtype) if isinstance(v, np.floating) else "float64",
        )
    if isinstance(v, (np.ndarray, list, tuple)):
        return _infer_array(name, values)
    if v is None:
        raise SchemaError(
            f"row 0, column {name!r}: None cannot be stored; gpuload columns have no nulls"
        )
    raise SchemaError(f"row 0, column {name!r}: cannot store a {type(v).__name__}")


def _infer_array(name: str, values: Any) -> Column:
    """Array values: a fixed-shape column when every value of the batch has row 0's shape, a
    ragged one ("float32[*,14]") when only their first dimension varies (an empty list fits any
    inner shape). Anything else is typed from row 0 and refused row by row when converted."""
    arrays = []
    for j, x in enumerate(values):
        try:
            a = np.asarray(x)
        except ValueError:
            raise SchemaError(f"row {j}, column {name!r}: ragged nested lists") from None
        if a.dtype == object or a.dtype.kind not in "biuf":
            if a.size == 0 and a.ndim == 1:
                arrays.append(None)  # [] or an empty object array: a row of length 0
                continue
            if j == 0:
                raise SchemaError(f"row 0, column {name!r}: arrays must be numeric, got {a.dtype}")
            break
        arrays.append(a)
    first = arrays[0]
    if first is not None and first.ndim == 0:
        return Column(name, "scalar", _dtype_name(first.dtype))
    full = [a for a in arrays if a is not None and not (a.size == 0 and a.ndim == 1)]
    same = len(arrays) == len(values) and all(
        a is not None and a.shape == first.shape for a in arrays
    )
    if first is not None and first.shape[0] > 0 and (same or len(arrays) < len(values)):
        return Column(name, "array", _dtype_name(first.dtype), tuple(first.shape))
    inner = {a.shape[1:] for a in full}
    if len(arrays) == len(values) and len(inner) <= 1 and all(a.ndim >= 1 for a in full):
        dtype = np.result_type(*[a.dtype for a in full]) if full else np.dtype(np.float64)
        return Column(name, "ragged", _dtype_name(dtype), next(iter(inner), ()))
    if first is None:
        raise SchemaError(
            f"row 0, column {name!r}: an empty row leaves the type open; pass schema="
        )
    return Column(name, "array", _dtype_name(first.dtype), tuple(first.shape))


def _dtype_name(dt: np.dtype) -> str:
    dt = np.dtype(dt)
    if dt.kind == "b":
        return "bool"
    return dt.newbyteorder("=").name


def infer_schema(batch: RawBatch, hint: Schema | None = None) -> Schema:
    """A Schema inferred from one raw batch; columns ``hint`` names take its types."""
    return Schema(
        tuple(
            hint[k] if hint is not None and k in hint else infer_column(k, v)
            for k, v in batch.items()
        ),
        hint.metadata if hint is not None else {},
    )


class _Validator:
    """Validates and converts raw batches against a schema; tracks image codecs seen."""

    def __init__(self, schema: Schema, label: str, image_format: str = "png") -> None:
        self.schema = schema
        self.label = label
        self.image_format = check_image_format(image_format)
        self.codecs: dict[str, set[str]] = {c.name: set() for c in schema if c.kind == "image"}

    def convert(self, batch: RawBatch, n: int, row0: int) -> dict[str, Any]:
        names = set(batch)
        expected = set(self.schema.names)
        if names != expected:
            extra = sorted(names - expected)
            missing = sorted(expected - names)
            msg = []
            if extra:
                msg.append(f"unknown column(s) {extra}")
            if missing:
                msg.append(f"missing column(s) {missing}")
            raise SchemaError(
                f"ingest into {self.label!r} at row {row0}: {'; '.join(msg)}; the schema has {self.schema.names}"
            )
        out = {}
        for col in self.schema:
            v = batch[col.name]
            if len(v) != n:
                raise SchemaError(
                    f"ingest into {self.label!r}: column {col.name!r} has {len(v)} values, expected {n}"
                )
            out[col.name] = self._column(col, v, row0)
        return out

    def _where(self, col: Column, row: int) -> str:
        return f"table {self.label!r}, row {row}, column {col.name!r}"

    def _column(self, col: Column, v: Any, row0: int) -> Any:
        if col.kind in ("image", "bytes"):
            return self._bytes(col, v, row0)
        if col.is_ragged:
            dtype = col.np_dtype
            return [
                ragged_row_bytes(x, dtype, col.shape, lambda j=j: self._where(col, row0 + j))
                for j, x in enumerate(v)
            ]
        if col.kind == "text":
            vals = []
            for j, x in enumerate(v):
                if not isinstance(x, str):
                    raise SchemaError(
                        f"{self._where(col, row0 + j)}: expected str, got {type(x).__name__}"
                    )
                vals.append(x.encode("utf-8"))
            return vals
        return self._numeric(col, v, row0)

    def _bytes(self, col: Column, v: Any, row0: int) -> list[bytes]:
        """Image or bytes values (bytes, {"bytes", "path"} dicts; for images also PIL images
        and uint8 arrays, encoded per ``image_format``) as bytes, image codecs checked."""
        vals = []
        image = col.kind == "image"
        seen = self.codecs.get(col.name)
        for j, x in enumerate(v):
            b = image_value_bytes(
                x, image, self.image_format, lambda j=j: self._where(col, row0 + j)
            )
            if seen is not None:
                codec = detect_codec(b)
                if codec is None:
                    raise SchemaError(
                        f"{self._where(col, row0 + j)}: {len(b)} bytes are not a recognised image "
                        "(JPEG, PNG, WebP, GIF, BMP, TIFF); store them in a 'bytes' column instead"
                    )
                if col.codec not in (None, "mixed") and codec != col.codec:
                    raise SchemaError(
                        f"{self._where(col, row0 + j)}: a {codec} image in a column declared {col.type_string()}"
                    )
                seen.add(codec)
            vals.append(b)
        return vals

    def _numeric(self, col: Column, v: Any, row0: int) -> np.ndarray:
        target = col.np_dtype
        want = (len(v), *col.shape)
        try:
            arr = np.asarray(v)
        except ValueError:
            arr = None
        if arr is None or arr.dtype == object or arr.shape != want or arr.dtype.kind not in "biuf":
            self._first_bad_row(col, v, row0)
            raise SchemaError(
                f"table {self.label!r}, column {col.name!r}: cannot stack values from row {row0}"
            )
        both_int = arr.dtype.kind in "iu" and target.kind in "iu"  # range-checked below
        if not both_int and not np.can_cast(arr.dtype, target, casting="same_kind"):
            raise SchemaError(
                f"table {self.label!r}, column {col.name!r} at row {row0}: {arr.dtype} values cannot be "
                f"stored as {col.dtype} without losing their kind"
            )
        if target.kind in "iu" and arr.dtype.kind in "iu" and arr.size:
            info = np.iinfo(target)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                bad = int(
                    np.flatnonzero(
                        ((arr < info.min) | (arr > info.max)).reshape(len(v), -1).any(axis=1)
                    )[0]
                )
                raise SchemaError(
                    f"{self._where(col, row0 + bad)}: value out of range for {col.dtype}"
                )
        return np.ascontiguousarray(arr, dtype=target)

    def _first_bad_row(self, col: Column, v: Any, row0: int) -> None:
        """Raise a SchemaError naming the first value that is not a number of the column's
        shape (called when a batch does not stack into one numeric array)."""
        for j, x in enumerate(v):
            try:
                xa = np.asarray(x)
            except ValueError:
                raise SchemaError(f"{self._where(col, row0 + j)}: ragged nested lists") from None
            if xa.dtype == object or xa.dtype.kind not in "biuf":
                raise SchemaError(
                    f"{self._where(col, row0 + j)}: expected numbers, got {type(x).__name__} {x!r}"[
                        :300
                    ]
                )
            if xa.shape != col.shape:
                hint = ""
                if col.shape and xa.ndim == len(col.shape) and xa.shape[1:] == col.shape[1:]:
                    star = ",".join(["*", *map(str, col.shape[1:])])
                    hint = f"; for arrays of varying length declare schema={{{col.name!r}: '{col.dtype}[{star}]'}}"
                raise SchemaError(
                    f"{self._where(col, row0 + j)}: shape {xa.shape} does not match the column's "
                    f"{col.type_string()} (shape {col.shape}){hint}"
                )

    def final_schema(self) -> Schema:
        cols = []
        for c in self.schema:
            if c.kind == "image" and c.codec is None:
                seen = self.codecs[c.name]
                codec = next(iter(seen)) if len(seen) == 1 else ("mixed" if seen else None)
                c = Column(c.name, c.kind, c.dtype, c.shape, codec, c.metadata)
            cols.append(c)
        return Schema(tuple(cols), self.schema.metadata)


def target_schema(given: Schema | None, existing: Schema | None) -> Schema | None:
    """The schema rows are validated against before any is seen: the one given, else an
    existing table's (when appending; image codecs left open, recorded from the rows), else
    None (inferred from the first batch)."""
    if given is not None:
        return given
    if existing is None:
        return None
    return Schema(
        tuple(
            Column(
                c.name, c.kind, c.dtype, c.shape, None if c.kind == "image" else c.codec, c.metadata
            )
            for c in existing
        ),
        existing.metadata,
    )


@dataclass
class Staged:
    """What a ``BlockStager`` wrote: uncommitted chunks, in row order, and the schema of their
    rows (image codecs as observed; None when no row was seen)."""

    schema: Schema | None
    chunks: list[ChunkInfo] = field(default_factory=list)
    rows: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)


class BlockStager:
    """Ingest's validation and conversion for data arriving in blocks in another process (a
    Ray write task): each block (anything ``ingest`` takes as one piece: a pyarrow Table, a
    DataFrame, a dict of columns) is checked against ``schema`` (None: inferred from the first
    block, as ingest does) and written as chunk files that no manifest names yet. Committing
    them is the caller's (``TableWriter.stage``); ``discard`` removes them."""

    def __init__(
        self,
        store: Store,
        label: str,
        schema: Schema | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        image_format: str = "png",
        name_prefix: str = "",
    ) -> None:
        self.store, self.label = store, label
        self.image_format = check_image_format(image_format)
        self.chunk_bytes, self.name_prefix = chunk_bytes, name_prefix
        self.rows = 0
        self.metadata: dict[str, Any] | None = None
        self._schema = schema
        self._validator: _Validator | None = None
        self._writer: ChunkWriter | None = None

    def add(self, block: Any) -> int:
        """Validate, convert and write one block; returns its row count."""
        src = as_source(block, BATCH_ROWS)
        if self.metadata is None:
            self.metadata = dict(src.metadata)
        rows = 0
        for raw, n in src.batches:
            if n == 0:
                continue
            if self._writer is None:
                self._start(self._schema or infer_schema(raw, src.schema_hint))
            self._writer.write(self._validator.convert(raw, n, self.rows), n)  # type: ignore[union-attr]
            self.rows += n
            rows += n
        return rows

    def _start(self, schema: Schema) -> None:
        self._validator = _Validator(schema, self.label, self.image_format)
        self._writer = ChunkWriter(
            self.store, schema, self.chunk_bytes, self.label, self.name_prefix
        )

    def finish(self) -> Staged:
        """Write the buffered rows; what was staged."""
        if self._writer is None:
            return Staged(self._schema, [], 0, self.metadata or {})
        self._writer.flush()
        final = self._validator.final_schema()  # type: ignore[union-attr]
        return Staged(final, list(self._writer.chunks), self.rows, self.metadata or {})

    def discard(self) -> None:
        """Remove every chunk written so far (best effort)."""
        if self._writer is not None:
            self._writer.discard()


def _progress(total: int | None, label: str, enabled: bool | None):
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, unit="rows", desc=f"ingest {label}", disable=not enabled, leave=False)


def ingest_into(
    store: Store,
    label: str,
    data: Any,
    mode: str = "create",
    schema: Schema | Mapping[str, Any] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool | None = None,
    batch_rows: int = BATCH_ROWS,
    image_format: str = "png",
    batches: bool | None = None,
) -> Manifest:
    """Validate and write ``data`` to the table at ``store`` as one new committed version
    (written chunk by chunk, committed once at the end: a failure midway commits nothing).
    ``image_format`` ("png", "jpeg" or "keep") says how PIL images and uint8 arrays bound for
    image columns are encoded (see ``gpuload.sources.images``); ``batches`` whether an
    iterable yields column batches (None: told apart by its first item)."""
    check_image_format(image_format)
    given = Schema.from_spec(schema) if schema is not None else None
    src = as_source(data, batch_rows, batches)
    existing = None
    if mode == "append":
        try:
            existing = read_manifest(store).schema
        except TableNotFoundError:
            existing = None
    it = iter(src.batches)
    first = next(it, None)
    target = target_schema(given, existing)
    if target is None and first is not None:
        target = infer_schema(first[0], src.schema_hint)
    elif target is None and src.schema_hint is not None:
        target = src.schema_hint
    elif target is None:
        raise SchemaError(f"cannot infer the schema of {label!r} from empty data; pass schema=")
    validator = _Validator(target, label, image_format)
    writer = TableWriter(store, target, mode, chunk_bytes, label)
    row = 0
    try:
        with _progress(src.total, label, progress) as bar:
            for raw, n in chain([first] if first is not None else [], it):
                if n == 0:
                    continue
                writer.write(validator.convert(raw, n, row), n)
                row += n
                bar.update(n)
        final = validator.final_schema()
        return writer.commit(schema=final, metadata=src.metadata or None)
    except BaseException:
        writer.abort()
        raise
