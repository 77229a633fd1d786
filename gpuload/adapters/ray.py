"""Ray Data: a Datasink that writes a Ray Dataset as one table version, and a Datasource that
reads a table as a Ray Dataset. Imported only when used (``gpuload.ray``, or ``ingest`` of a
Ray Dataset); importing gpuload never imports Ray.

Writing is Lance's Ray sink shape (stage on the workers, commit once on the driver):

- ``on_write_start`` (driver) records the version the write starts from (a create of a table
  that exists fails here) and a random write id;
- each write task validates and converts its blocks with ingest's own code
  (``gpuload.ingest.BlockStager``: the same column kinds, inference and errors as
  ``client.ingest``) and writes them as chunk files named ``<write id[:16]><16 random hex>``,
  invisible to readers until a manifest names them; it returns its task index and the chunks'
  metadata as plain JSON-able data (``ChunkInfo.to_json``), which the driver validates;
- ``on_write_complete`` (driver) keeps one result per task index (a task reported twice has
  the chunks of the extra report removed), orders the chunks by task index, then block order,
  and commits them as ONE version on top of the recorded one through ``TableWriter``'s commit
  protocol: an append that lost a race rebases, a create or overwrite raises
  CommitConflictError and removes its chunks. After a commit, chunk files carrying this write's
  id that it does not name (attempts of a task that died and was retried) are removed;
- ``on_write_failed`` removes every chunk file carrying this write's id (best effort); the
  table stays at its previous version, and ``vacuum`` removes whatever a killed worker left.

Schema: the one given, else (append) the existing table's, else each task infers it from its
first block with ingest's rules and the driver checks at commit that every task inferred the
same columns (SchemaError naming both tasks otherwise: pass ``schema=``).

Reading: ``TableSource`` splits the table into read tasks of contiguous chunk ranges balanced
by bytes, each reading through the table's fetcher (coalesced, verified reads) and yielding one
pyarrow block per chunk: image and bytes columns as binary, text as string, scalars as numbers,
fixed-shape arrays as Ray's tensor extension type (``map_batches(batch_format="numpy")`` gives
an ``(n, *shape)`` array), ragged columns as lists (of fixed-size lists for an inner shape).
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data import Datasink, Datasource, ReadTask
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource.datasink import WriteResult

from ..errors import FormatError, GpuloadError, SchemaError
from ..format import ChunkInfo, Manifest
from ..ingest import BlockStager, target_schema
from ..reader import TableReader
from ..schema import Column, Schema
from ..sources.arrow import arrow_array
from ..sources.frames import pandas_column
from ..storage import Store
from ..writer import (
    DEFAULT_CHUNK_BYTES,
    MODES,
    TableWriter,
    merge_codecs,
    same_columns,
    start_version,
)

__all__ = ["TableSink", "TableSource", "write_dataset", "arrow_block", "chunk_ranges"]

log = logging.getLogger("gpuload.ray")
_ID_CHARS = 16  # hex digits of the write id that start each of its chunk names


# -- writing ---------------------------------------------------------------------------------
class TableSink(Datasink):
    """Writes a Ray Dataset as one new version of the table at ``url`` (``mode`` "create",
    "append" or "overwrite"); ``ds.write_datasink(sink)``, then ``sink.manifest`` is the
    committed version."""

    def __init__(
        self,
        url: str,
        mode: str = "create",
        *,
        schema: Schema | Mapping[str, Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        image_format: str = "png",
        label: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.url = str(url)
        self.mode = mode
        self.schema = Schema.from_spec(schema) if schema is not None else None
        self.storage_options = dict(storage_options or {})
        self.chunk_bytes = int(chunk_bytes)
        self.image_format = image_format
        self.label = label or self.url.rstrip("/").rsplit("/", 1)[-1] or self.url
        self.manifest: Manifest | None = None  # the committed version, after the write
        self.task_rows: dict[int, int] = {}  # after the write: rows committed per task index
        self._write_id: str | None = None  # set by on_write_start, travels to the tasks
        self._target: Schema | None = None  # what the tasks validate against (None: infer)
        self._base: Manifest | None = None  # driver only: the version the write started from
        self._writer: TableWriter | None = None  # driver only: the commit in progress

    def __getstate__(self) -> dict[str, Any]:
        """What a write task needs: the driver's view of the table stays on the driver."""
        state = dict(self.__dict__)
        state["_base"] = state["_writer"] = state["manifest"] = None
        state["task_rows"] = {}
        return state

    def __repr__(self) -> str:
        return f"TableSink({self.url!r}, mode={self.mode!r})"

    def get_name(self) -> str:
        return "GpuloadTable"

    def _store(self) -> Store:
        return Store(self.url, self.storage_options)

    def on_write_start(self, schema: Any = None) -> None:
        """Driver: record the starting version (TableExistsError for a create of an existing
        table) and the schema the tasks validate against. ``schema`` (Ray's Arrow schema of
        the first block) is not used: gpuload's own inference decides the column kinds."""
        store = self._store()
        self._base = start_version(store, self.mode, self.label)
        existing = self._base.schema if self.mode == "append" and self._base else None
        self._target = target_schema(self.schema, existing)
        self._write_id = uuid.uuid4().hex
        store.makedirs()

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
        """Task: stage this task's blocks as chunk files; returns plain data (task index, rows,
        schema and chunks as JSON-able dicts). A failure removes what the task wrote."""
        task = int(ctx.task_idx)
        stager = BlockStager(
            self._store(),
            self.label,
            self._target,
            self.chunk_bytes,
            self.image_format,
            name_prefix=self._write_id[:_ID_CHARS],  # type: ignore[index]
        )
        try:
            for block in blocks:
                stager.add(block_columns(block))
            staged = stager.finish()
        except SchemaError as e:
            stager.discard()
            raise SchemaError(f"{e} (Ray write task {task}; rows counted from its first)") from e
        except BaseException:
            stager.discard()
            raise
        return {
            "task": task,
            "rows": staged.rows,
            "schema": staged.schema.to_json() if staged.schema is not None else None,
            "chunks": [c.to_json() for c in staged.chunks],
            "metadata": staged.metadata,
        }

    def on_write_complete(self, write_result: WriteResult) -> None:
        """Driver: publish every task's chunks as one version on top of the recorded one."""
        if self._write_id is None:  # no block reached the write operator: an empty dataset
            self.on_write_start(None)
        results = self._one_per_task(write_result.write_returns)
        schema = self._final_schema(results)
        where = f"Ray write of table {self.label!r}"
        chunks = [
            ChunkInfo.from_json(c, f"{where}, task {r['task']}")
            for r in results
            for c in r["chunks"]
        ]
        metadata = next((r["metadata"] for r in results if r.get("metadata")), None)
        self._writer = TableWriter(
            self._store(), schema, self.mode, self.chunk_bytes, self.label, base=self._base
        )
        self._writer.stage(chunks)
        self.manifest = self._writer.commit(metadata=metadata)
        self.task_rows = {r["task"]: int(r["rows"]) for r in results}
        self._remove_strays(keep={c.file for c in chunks})

    def _one_per_task(self, returns: Sequence[Any]) -> list[dict[str, Any]]:
        """One result per task index, in task order; the chunks of any other report of the
        same task (a re-executed task) are removed."""
        kept: dict[int, dict[str, Any]] = {}
        for r in returns:
            if not isinstance(r, Mapping) or not isinstance(r.get("task"), int):
                raise GpuloadError(f"Ray write of {self.label!r}: a task returned {r!r:.200}")
            if r["task"] in kept:
                log.warning("Ray write of %s: task %d reported twice", self.label, r["task"])
                self._remove([c["file"] for c in r["chunks"]])
                continue
            kept[r["task"]] = dict(r)
        return [kept[k] for k in sorted(kept)]

    def _final_schema(self, results: list[dict[str, Any]]) -> Schema:
        """The committed schema: every task's columns must agree; image codecs are merged."""
        schema, first = None, None
        for r in results:
            if r["schema"] is None or not r["rows"]:
                continue
            s = Schema.from_json(r["schema"])
            if schema is None:
                schema, first = s, r["task"]
            elif not same_columns(schema, s):
                raise SchemaError(
                    f"Ray write of table {self.label!r}: task {first} inferred "
                    f"{schema.describe()} but task {r['task']} inferred {s.describe()}; "
                    "pass schema= to the sink"
                )
            else:
                schema = merge_codecs(schema, s)
        if schema is None:
            schema = self._target
        if schema is None:
            raise SchemaError(
                f"cannot infer the schema of {self.label!r} from an empty dataset; pass schema="
            )
        return schema

    def on_write_failed(self, error: Exception) -> None:
        """Driver: remove the chunks this write staged (best effort); the table keeps its
        previous version. Nothing is removed once a version naming them may exist."""
        if self._writer is not None and self._writer.may_have_published:
            return
        if self._writer is not None:
            self._writer.abort()
        self._remove_strays(keep=set())

    def _remove_strays(self, keep: set[str]) -> None:
        """Remove chunk files carrying this write's id that ``keep`` does not name: staged by
        an attempt that failed, or by a write that did not commit."""
        if self._write_id is None:
            return
        prefix = f"{self._write_id[:_ID_CHARS]}"
        try:
            names = [n for n, _, _ in self._store().list_files("chunks")]
        except (GpuloadError, OSError) as e:
            log.warning("Ray write of %s: could not list its chunks (%s)", self.label, e)
            return
        self._remove([f"chunks/{n}" for n in names if n.startswith(prefix)], keep)

    def _remove(self, files: Iterable[str], keep: Collection[str] = ()) -> None:
        """Remove chunk files of this write (never another's), best effort."""
        store = self._store()
        for f in files:
            if f in keep or not f.startswith(f"chunks/{(self._write_id or '')[:_ID_CHARS]}"):
                continue
            try:
                store.remove(f)
            except (GpuloadError, OSError) as e:
                log.warning("Ray write of %s: could not remove %s (%s)", self.label, f, e)


def block_columns(block: Any) -> dict[str, Any]:
    """A Ray block (pyarrow Table or pandas DataFrame) as ingest's column values; Ray's tensor
    extension columns (numpy arrays per row) become stacked arrays or lists of arrays."""
    if isinstance(block, pa.Table):
        return {
            name: _arrow_column(col.combine_chunks(), name)
            for name, col in zip(block.column_names, block.columns)
        }
    acc = BlockAccessor.for_block(block)
    df = acc.to_pandas()
    return {str(c): _pandas_column(df[c], str(c)) for c in df.columns}


def _arrow_column(arr: Any, name: str) -> Any:
    if isinstance(arr.type, pa.ExtensionType) and type(arr.type).__module__.startswith("ray."):
        if arr.null_count:
            bad = int(np.flatnonzero(~np.asarray(arr.is_valid()))[0])
            raise SchemaError(
                f"row {bad}, column {name!r}: null value (gpuload columns have no nulls)"
            )
        values = arr.to_numpy()
        return list(values) if values.dtype == object else values
    return arrow_array(arr, name, 0)


def _pandas_column(s: Any, name: str) -> Any:
    if type(s.dtype).__module__.startswith("ray."):  # Ray's TensorDtype
        values = s.array.to_numpy()
        return list(values) if values.dtype == object else values
    return pandas_column(s, name)


def write_dataset(
    ds: Any,
    url: str,
    label: str | None = None,
    mode: str = "create",
    schema: Schema | Mapping[str, Any] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    storage_options: Mapping[str, Any] | None = None,
    image_format: str = "png",
    ray_remote_args: Mapping[str, Any] | None = None,
    concurrency: int | None = None,
) -> Manifest:
    """Write the Ray Dataset ``ds`` to the table at ``url`` as one new version (see
    ``TableSink``); returns the committed manifest."""
    sink = TableSink(
        url,
        mode,
        schema=schema,
        storage_options=storage_options,
        chunk_bytes=chunk_bytes,
        image_format=image_format,
        label=label,
    )
    ds.write_datasink(sink, ray_remote_args=dict(ray_remote_args or {}), concurrency=concurrency)
    if sink.manifest is None:
        raise GpuloadError(f"Ray write of {sink.label!r} finished without a commit")
    return sink.manifest


# -- reading ---------------------------------------------------------------------------------
def chunk_ranges(chunk_bytes: Sequence[int], parallelism: int) -> list[tuple[int, int]]:
    """Contiguous ``[first, last)`` chunk ranges, at most ``parallelism`` of them (and no more
    than there are chunks), each about an equal share of the bytes; together they cover every
    chunk exactly once, in order."""
    n = len(chunk_bytes)
    if n == 0:
        return []
    k = max(1, min(int(parallelism), n))
    cum = np.cumsum(np.asarray(chunk_bytes, dtype=np.float64))
    total = float(cum[-1]) or 1.0
    cuts = [0]
    for j in range(1, k):
        # the first chunk after which j/k of the bytes are read; every range keeps >= 1 chunk
        at = int(np.searchsorted(cum, total * j / k, side="left")) + 1
        at = min(max(at, cuts[-1] + 1), n - (k - j))
        cuts.append(at)
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:]))


class TableSource(Datasource):
    """A gpuload table (one snapshot) as a Ray Datasource: ``ray.data.read_datasource``."""

    def __init__(self, table: TableReader, columns: Sequence[str] | None = None) -> None:
        super().__init__()
        self._table = table
        self._columns = [c.name for c in table.schema.select(columns, table.name)]

    def get_name(self) -> str:
        return "GpuloadTable"

    def _chunk_sizes(self) -> list[int]:
        """Each chunk's bytes in the selected columns (data sections; estimated from the rows
        for a format-4 table, whose exact figures would read every chunk record)."""
        return self._table.chunk_data_bytes(self._columns).tolist()

    def estimate_inmemory_data_size(self) -> int | None:
        return int(sum(self._chunk_sizes()))

    def arrow_schema(self) -> pa.Schema:
        """The Arrow schema of every block this source yields."""
        return arrow_schema([self._table.schema[n] for n in self._columns])

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        """Read tasks over contiguous chunk ranges with their row and byte counts."""
        sizes = self._chunk_sizes()
        starts = self._table.index.starts
        schema = self.arrow_schema()
        tasks = []
        for first, last in chunk_ranges(sizes, parallelism):
            meta = BlockMetadata(
                num_rows=int(starts[last] - starts[first]),
                size_bytes=int(sum(sizes[first:last])),
                exec_stats=None,
                input_files=None,
            )
            read = functools.partial(
                _read_chunks, self._table, self._columns, [int(x) for x in starts[first : last + 1]]
            )
            tasks.append(ReadTask(read, meta, schema, per_task_row_limit=per_task_row_limit))
        return tasks


def _read_chunks(table: TableReader, columns: list[str], bounds: list[int]) -> Iterator[pa.Table]:
    """A read task: one pyarrow block per chunk (rows ``bounds[i]`` to ``bounds[i + 1]``)."""
    cols = [table.schema[n] for n in columns]
    packed = [c.name for c in cols if c.kind in ("image", "bytes", "text")]
    rest = [c.name for c in cols if c.name not in packed]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rows = np.arange(lo, hi, dtype=np.int64)
        values: dict[str, Any] = table.read(rows, rest) if rest else {}
        for name in packed:  # straight into Arrow's layout: no Python object per row
            values[name] = _packed_array(table, rows, table.schema[name])
        yield arrow_block(values, cols)


def _packed_array(table: TableReader, rows: np.ndarray, col: Column) -> pa.Array:
    """A bytes, image or text column of ``rows`` as one Arrow array built on the verified
    buffer the reader gathers (text checked to be UTF-8, as the reader's own decode does)."""
    buf, dest = table.read_column_into(rows, col)
    large = int(dest[-1]) >= (1 << 31) - 1
    if col.kind == "text":
        typ = pa.large_string() if large else pa.string()
    else:
        typ = pa.large_binary() if large else pa.binary()
    offsets = dest.astype(np.int64 if large else np.int32)
    arr = pa.Array.from_buffers(typ, len(rows), [None, pa.py_buffer(offsets), pa.py_buffer(buf)])
    if col.kind == "text":
        try:
            arr.validate(full=True)
        except pa.ArrowInvalid as e:
            raise FormatError(
                f"table {table.name!r}, column {col.name!r}, rows {rows[0]}-{rows[-1]}: text "
                f"that is not UTF-8 ({e})"
            ) from None
    return arr


def arrow_schema(columns: Sequence[Column]) -> pa.Schema:
    """The Arrow types gpuload columns are read as (see the module docstring)."""
    empty = {c.name: _empty(c) for c in columns}
    return arrow_block(empty, columns).schema


def _empty(col: Column) -> Any:
    if col.kind in ("image", "bytes", "text") or col.is_ragged:
        return []
    return np.zeros((0, *col.shape), col.np_dtype)


def arrow_block(values: Mapping[str, Any], columns: Sequence[Column]) -> pa.Table:
    """Column values as ``TableReader.read`` returns them, as one pyarrow Table."""
    from ray.data.extensions import ArrowTensorArray

    arrays = []
    for col in columns:
        v = values[col.name]
        if isinstance(v, pa.Array):
            arrays.append(v)
        elif col.kind in ("image", "bytes"):
            arrays.append(pa.array(v, type=_binary_type(v)))
        elif col.kind == "text":
            arrays.append(pa.array(v, type=pa.string()))
        elif col.is_ragged:
            arrays.append(_ragged_array(v, col))
        elif col.kind == "array":
            arrays.append(ArrowTensorArray.from_numpy(np.ascontiguousarray(v)))
        else:
            arrays.append(pa.array(np.asarray(v)))
    return pa.table(arrays, names=[c.name for c in columns])


def _binary_type(values: list) -> pa.DataType:
    return pa.large_binary() if sum(map(len, values)) >= (1 << 31) - 1 else pa.binary()


def _ragged_array(rows: list[np.ndarray], col: Column) -> pa.Array:
    """Ragged rows (arrays of shape (n_i, *inner)) as list<...> with fixed-size lists for the
    inner dimensions."""
    lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    flat = (
        np.concatenate([r.reshape(-1) for r in rows]) if rows else np.zeros(0, col.np_dtype)
    ).astype(col.np_dtype, copy=False)
    values: pa.Array = pa.array(flat)
    for d in reversed(col.shape):
        values = pa.FixedSizeListArray.from_arrays(values, int(d))
    if offsets[-1] < (1 << 31) - 1:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
    return pa.LargeListArray.from_arrays(pa.array(offsets), values)
