"""The table reader: one consistent snapshot of a manifest, rows and byte ranges, verified.

The bottom of the read path: it knows the format, the chunks and the fetcher, and nothing of
loaders or frameworks (the public ``Table`` facade in ``table.py`` adds those on top)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import posixpath
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .buffers import aligned_empty
from .checksums import hash_bytes
from .errors import FetchError, FormatError, IntegrityError
from .fetch import CacheOptions, Fetcher, FetchOptions, Read, ReadPlan
from .format import Manifest, Section
from .index import ChunkIndex, open_index
from .ragged import ragged_views
from .sampling import EpochOrder, RowSelection, Shuffle, SubsetOrder
from .schema import Column, Schema
from .storage import Store
from .versions import read_manifest

__all__ = ["TableReader"]

SMALL_ROW_BYTES = 512  # columns (and chunks) at most this many bytes a row are read whole
ColumnValues = Any  # list[bytes] | list[str] | np.ndarray | list[np.ndarray] (ragged columns)


def _table_label(url: str) -> str:
    return posixpath.basename(url.rstrip("/").replace(os.sep, "/")) or url


class TableReader:
    """A read-only snapshot of a table: rows, columns and verified byte ranges. Picklable
    (handles are recreated lazily per process)."""

    def __init__(
        self,
        store: Store,
        manifest: Manifest,
        cache: CacheOptions | bool | str | None = None,
        fetch: FetchOptions | None = None,
    ) -> None:
        self._store = store
        self._manifest = manifest
        self._cache_opts = CacheOptions.coerce(cache)
        self._fetch_opts = fetch or FetchOptions()
        self.name = _table_label(store.url)
        # the chunks: a JSON list wrapped, or (format 4) the segments' rows read now
        self._index: ChunkIndex = open_index(
            store, manifest, self.name, self._cache_opts, self._fetch_opts
        )
        self._chunk_starts = self._index.starts
        self._fetcher = Fetcher(
            store, self.name, self._fetch_opts, self._cache_opts, resolve=self._index.describe
        )
        self._sized = np.zeros(self._index.num_chunks, dtype=bool)
        # Bounded in-memory LRU of small per-chunk arrays: offsets indexes and whole sections of
        # small columns (labels, states, short text), so random access does not issue a request
        # per tiny cell.
        self._mem: OrderedDict[tuple[int, str, str], np.ndarray] = OrderedDict()
        self._mem_bytes = 0
        self._mem_limit = 64 << 20
        self._small: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._async_readers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        cache: CacheOptions | bool | str | None = None,
        fetch: FetchOptions | None = None,
    ) -> TableReader:
        store = Store(url, storage_options, (fetch or FetchOptions()).retry)
        return cls(store, read_manifest(store), cache=cache, fetch=fetch)

    def refresh(self) -> TableReader:
        """A new snapshot of the same class on the latest committed version."""
        return type(self)(
            self._store, read_manifest(self._store), self._cache_opts, self._fetch_opts
        )

    def __getstate__(self) -> dict[str, Any]:
        # the manifest only (a format-4 root is a few KB): each process opens its own index
        return {
            "store": self._store,
            "manifest": self._manifest.dumps(),
            "cache": self._cache_opts,
            "fetch": self._fetch_opts,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        manifest = Manifest.loads(state["manifest"], f"pickled table {state['store'].url}")
        self.__init__(state["store"], manifest, state["cache"], state["fetch"])

    # -- metadata --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self._store.url

    @property
    def store(self) -> Store:
        return self._store

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def fetcher(self) -> Fetcher:
        return self._fetcher

    @property
    def index(self) -> ChunkIndex:
        """The chunks of this snapshot (every format)."""
        return self._index

    @property
    def schema(self) -> Schema:
        return self._manifest.schema

    @property
    def columns(self) -> list[str]:
        return self._manifest.schema.names

    @property
    def version(self) -> int:
        return self._manifest.version

    @property
    def num_chunks(self) -> int:
        return self._index.num_chunks

    @property
    def chunk_rows(self) -> tuple[int, ...]:
        """Rows per chunk (a new tuple each call: ``index.rows`` is the same as an array)."""
        return tuple(self._index.rows.tolist())

    @property
    def nbytes(self) -> int:
        return self._index.nbytes

    def chunk_data_bytes(self, columns: Sequence[str]) -> np.ndarray:
        """Bytes of ``columns``' data sections per chunk (estimated from the rows for a
        format-4 table, whose exact figures would read every record)."""
        return self._index.data_bytes(columns)

    @property
    def is_local(self) -> bool:
        return self._store.is_local

    @property
    def is_cached(self) -> bool:
        """True when reads are served from local disk (a local table or a cached remote one)."""
        return self._store.is_local or self._fetcher.cache is not None

    def __len__(self) -> int:
        return int(self._chunk_starts[-1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, rows={len(self)}, columns=[{self.schema.describe()}])"

    def info(self) -> dict[str, Any]:
        """Schema, rows, size and chunks, as ``gpuload info`` prints them."""
        col_bytes = {c: int(self._index.column_bytes.get(c, 0)) for c in self.columns}
        return {
            "name": self.name,
            "url": self.url,
            "version": self.version,
            "rows": len(self),
            "bytes": self.nbytes,
            "chunks": self.num_chunks,
            "schema": {c.name: c.type_string() for c in self.schema},
            "column_bytes": col_bytes,
            "column_metadata": {c.name: dict(c.metadata) for c in self.schema if c.metadata},
            "checksums": self.checksum_status(),
            "metadata": dict(self.schema.metadata),
        }

    def checksum_status(self) -> str:
        """Whether reads can be verified: every chunk, some (appended to a table written before
        format 2), or none (the table predates checksums: rewrite it to get them)."""
        have = self.num_chunks - self._index.unverified
        if have == self.num_chunks:
            return "xxh3-64 pages, every chunk"
        if have == 0:
            return (
                "none: written before gpuload format 2, reads are not verified "
                "(copy it with `gpuload ingest OLD NEW` to add checksums)"
            )
        return (
            f"{have} of {self.num_chunks} chunks (the others predate format 2 and are not verified)"
        )

    def verify(self) -> dict[str, Any]:
        """Read and check every byte of every chunk against its checksums, and every offsets
        index; returns a report. Chunks without checksums are listed as unverified."""
        report: dict[str, Any] = {"table": self.name, "version": self.version, "chunks": 0}
        report.update(verified=0, unverified=[], bad=[], bytes=0)
        # a format-4 index is read whole first: every segment, record and total
        report["bad"] += [{"chunk": "index", "error": p} for p in self._index.problems()]
        checker = Fetcher(  # verifies local reads too, whatever this table was opened with
            self._store,
            self.name,
            dataclasses.replace(self._fetch_opts, verify_local=True),
            self._cache_opts,
            resolve=self._index.describe,
        )
        if report["bad"]:
            report["ok"] = False
            return report
        for i, info in self._index.iter_chunks():
            report["chunks"] += 1
            try:
                self._verify_chunk(checker, i, info, report)
            except (IntegrityError, FormatError, FetchError) as e:
                report["bad"].append({"chunk": info.file, "error": str(e)})
        report["ok"] = not report["bad"]
        return report

    def _verify_chunk(self, checker: Fetcher, i: int, info, report: dict[str, Any]) -> None:
        """One chunk of ``verify``: its bytes through ``checker``, its offsets indexes."""
        self._ensure_sizes(np.array([i]))
        if info.checksums is None:
            report["unverified"].append(info.file)
        else:
            file = self._index.files(np.array([i]))[i]  # the name the fetcher can look up
            _read_through(checker, file, info.checksums.covers)
            report["verified"] += 1
            report["bytes"] += info.size
        for col in self.schema:
            if col.is_var:
                self._mem.pop((i, col.name, "offsets"), None)
                self.chunk_offsets(i, col)

    # -- row access ------------------------------------------------------------------------
    def row_index(self, i: int) -> int:
        """``i`` as a row number in [0, len); negative counts from the end; IndexError outside."""
        n = len(self)
        j = int(i)
        if j < 0:
            j += n
        if not 0 <= j < n:
            raise IndexError(f"row {i} out of range for table {self.name!r} with {n} rows")
        return j

    # -- the core batch read ---------------------------------------------------------------
    def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        chunk = np.searchsorted(self._chunk_starts, indices, side="right") - 1
        return chunk, indices - self._chunk_starts[chunk]

    def _locked(self) -> threading.Lock:
        """The in-memory LRU's lock; a forked child makes its own (a parent thread may have
        held this one at the fork)."""
        if self._pid != os.getpid():
            self._lock, self._pid = threading.Lock(), os.getpid()
        return self._lock

    def _mem_get(self, key: tuple[int, str, str]) -> np.ndarray | None:
        with self._locked():
            arr = self._mem.get(key)
            if arr is not None:
                self._mem.move_to_end(key)
            return arr

    def _mem_put(self, key: tuple[int, str, str], arr: np.ndarray) -> None:
        with self._locked():
            if key in self._mem:
                return
            self._mem[key] = arr
            self._mem_bytes += arr.nbytes
            while self._mem_bytes > self._mem_limit and len(self._mem) > 1:
                _, old = self._mem.popitem(last=False)
                self._mem_bytes -= old.nbytes

    def _section(self, chunk: int, column: Column, part: str, dtype, check=None) -> np.ndarray:
        """One section of a chunk (``part``: "data", "offsets" or "rowhash" of ``column``),
        read through the checks and kept in the in-memory LRU; ``check(info, sec, buf)``
        validates it once, before it is cached."""
        key = (chunk, column.name, part)
        arr = self._mem_get(key)
        if arr is not None:
            return arr
        return self._load_sections([(chunk, column, part, dtype, check)])[0]

    def _load_sections(self, items: Sequence[tuple]) -> list[np.ndarray]:
        """Read the sections ``items`` ((chunk, column, part, dtype, check) each) in one fetch
        (their round trips overlap, adjacent ones coalesce), check each, and keep them in the
        in-memory LRU."""
        chunks = np.asarray([it[0] for it in items], dtype=np.int64)
        self._ensure_sizes(chunks)
        secs = self._sections_of(items)
        files = self._index.files(chunks)
        for (c, col, part, dtype, _), sec in zip(items, secs):
            size = np.dtype(dtype).itemsize
            if sec.length % size:
                raise FormatError(
                    f"table {self.name!r}, chunk {files[c]}: the {part} "
                    f"section of column {col.name!r} (bytes [{sec.offset}, {sec.end})) is "
                    f"not a whole number of {size}-byte items"
                )
        dest = np.zeros(len(secs) + 1, dtype=np.int64)
        np.cumsum([sec.length for sec in secs], out=dest[1:])
        raw = np.empty(int(dest[-1]), dtype=np.uint8)
        reads = [
            Read(files[c], sec.offset, sec.length, int(d))
            for c, sec, d in zip(chunks.tolist(), secs, dest[:-1].tolist())
        ]
        self._fetcher.read_into(reads, raw)
        out = []
        for (c, col, part, dtype, check), sec, a, b in zip(
            items, secs, dest[:-1].tolist(), dest[1:].tolist()
        ):
            buf = raw[a:b].copy().view(dtype)  # its own buffer: the LRU frees sections one by one
            if check is not None:
                check(c, sec, buf)
            self._mem_put((c, col.name, part), buf)
            out.append(buf)
        return out

    def _sections_of(self, items: Sequence[tuple]) -> list[Section]:
        """The byte ranges of sections ((chunk, column, part, ...) each), from one lookup of
        their chunks' records."""
        recs = self._index.records(np.asarray([it[0] for it in items], dtype=np.int64))
        out = []
        for k, (_, col, part, _, _) in enumerate(items):
            off, length = recs[k][self._index.field(col.name, part)].tolist()
            out.append(Section(off, length))
        return out

    def preload_sections(self, indices: np.ndarray, columns: Sequence[Column]) -> None:
        """Fetch, in one go, the sections that reading ``columns`` of rows ``indices`` needs
        whole and that are not in memory yet: the data of small columns and the offsets of
        variable-length ones, for every chunk the rows lie in. On a remote table this is one
        round of requests instead of one per chunk, column and section."""
        items = self._missing_sections(indices, columns)
        if items:
            self._load_sections(items)

    def _missing_sections(self, indices: np.ndarray, columns: Sequence[Column]) -> list[tuple]:
        """(chunk, column, part, dtype, check) of the sections ``preload_sections`` reads."""
        every = np.unique(self._locate(indices)[0])
        items = []
        for col in columns:
            parts = []
            if self._is_small(col):
                whole = every[self._small_chunks(every, col)].tolist()
                parts.append(("data", np.uint8, None, whole))
            if col.is_var:
                parts.append(("offsets", "<i8", self._offsets_check(col), every.tolist()))
            for part, dtype, check, chunks in parts:
                items += [
                    (c, col, part, dtype, check)
                    for c in chunks
                    if self._mem_get((c, col.name, part)) is None
                ]
        return items

    def _offsets_check(self, column: Column):
        """The check of an offsets section before anything is read or allocated from it:
        starts at 0, ends at the data length, never decreases; for ragged columns every row is
        also a whole number of inner elements (byte offsets, multiples of ``item_nbytes``)."""
        item = column.item_nbytes if column.is_ragged else 1

        def check(chunk: int, sec: Section, buf) -> None:
            data_len = int(self._index.sections(np.array([chunk]), column.name, "data")[0, 1])
            lens = np.diff(buf)
            where = (
                f"table {self.name!r}, chunk {self._index.files(np.array([chunk]))[chunk]}: "
                f"offsets of column {column.name!r} (bytes [{sec.offset}, {sec.end}))"
            )
            if buf[0] != 0 or buf[-1] != data_len or (lens.size and np.any(lens < 0)):
                raise FormatError(f"{where} are corrupt")
            bad = np.flatnonzero(lens % item) if item > 1 else ()
            if len(bad):
                raise FormatError(
                    f"{where} are corrupt: row {int(bad[0])} of the chunk has {int(lens[bad[0]])} "
                    f"bytes, not a whole number of {item}-byte {column.type_string()} elements"
                )

        return check

    def chunk_offsets(self, chunk: int, column: Column) -> np.ndarray:
        """The int64 offsets index of a variable-length column in one chunk (LRU-cached)."""
        return self._section(chunk, column, "offsets", "<i8", self._offsets_check(column))

    def chunk_rowhashes(self, chunk: int, column: Column) -> np.ndarray:
        """Per-row hashes of a variable-length column in one chunk (read through the page
        checks, LRU-cached)."""
        return self._section(chunk, column, "rowhash", "<u8")

    def _row_hashed(self, chunks: np.ndarray, column: Column) -> np.ndarray:
        """Which of ``chunks`` carry per-row hashes of ``column``."""
        return self._index.sections(chunks, column.name, "rowhash")[:, 0] >= 0

    def fetch_rows(
        self, indices: np.ndarray, plan: ReadPlan, dest: np.ndarray, column: Column, view
    ) -> None:
        """Read ``plan`` (from ``read_plan(indices, column)``) into ``view`` and verify it:
        rows of chunks with per-row hashes are read exactly and checked row by row (fetched once
        more on a mismatch, then IntegrityError); everything else through the page checks."""
        hashed = self._row_hashed(plan.fidx, column) if column.is_var else None
        if hashed is None or not self._fetcher.verify or not hashed.any():
            self._fetcher.read_into(plan, view)
            return
        if not hashed.all():
            self._fetcher.read_into(_subplan(plan, ~hashed), view)
        rows = _subplan(plan, hashed)
        self._fetcher.read_into(rows, view, rows_checked=True)
        bad = self._bad_rows(indices[hashed], rows, column, view)
        if bad.size:
            again = _subplan(rows, bad)
            self._fetcher.stats["refetches"] += int(bad.size)
            self._fetcher.read_into(again, view, rows_checked=True, fresh=True)
            still = self._bad_rows(indices[hashed][bad], again, column, view)
            if still.size:
                raise self._row_error(indices[hashed][bad][still[0]], again, int(still[0]), column)

    def _bad_rows(self, indices, plan: ReadPlan, column: Column, view) -> np.ndarray:
        """Positions in ``plan`` whose bytes in ``view`` do not hash to their row's hash."""
        local = indices - self._chunk_starts[plan.fidx]
        want = np.empty(len(plan), dtype=np.uint64)
        for c in np.unique(plan.fidx).tolist():
            sel = plan.fidx == c
            want[sel] = self.chunk_rowhashes(c, column)[local[sel]]
        mv = memoryview(view).cast("B")
        got = np.fromiter(
            (hash_bytes(mv[d : d + n]) for d, n in zip(plan.dest.tolist(), plan.length.tolist())),
            np.uint64,
            len(plan),
        )
        return np.flatnonzero(got != want)

    def _row_error(self, row: int, plan: ReadPlan, k: int, column: Column) -> IntegrityError:
        a = int(plan.start[k])
        return IntegrityError(
            f"table {self.name!r}, chunk {plan.files[int(plan.fidx[k])]}, row {int(row)}, column "
            f"{column.name!r}, bytes [{a}, {a + int(plan.length[k])}): the row does not match its "
            "checksum; it was fetched twice and did not match either time"
        )

    def _is_small(self, column: Column) -> bool:
        """Whether ``column`` averages at most 512 bytes a row by the index's column totals (a
        hint only in format 4: each chunk's own record decides too, ``_small_chunks``)."""
        small = self._small.get(column.name)
        if small is None:
            total = self._index.column_bytes.get(column.name, 0)
            small = len(self) > 0 and total / len(self) <= SMALL_ROW_BYTES
            self._small[column.name] = small
        return small

    def _small_chunks(self, chunks: np.ndarray, column: Column) -> np.ndarray:
        """Which of ``chunks`` (distinct) are read a whole data section of ``column`` at a time:
        the column is small and the chunk's checked record says its section holds at most 512
        bytes a row, so no root's totals can make a row read fetch a whole chunk's data."""
        chunks = np.asarray(chunks, dtype=np.int64)
        if not self._is_small(column):
            return np.zeros(len(chunks), dtype=bool)
        if not column.is_var:  # checked to be exactly rows x row bytes in every chunk
            return np.full(len(chunks), column.row_nbytes <= SMALL_ROW_BYTES)
        lens = self._index.sections(chunks, column.name, "data")[:, 1]
        rows = self._chunk_starts[chunks + 1] - self._chunk_starts[chunks]
        return lens <= SMALL_ROW_BYTES * rows

    def _small_rows(self, idx: np.ndarray, column: Column) -> np.ndarray:
        """Per row of ``idx``: whether it is read out of its chunk's whole data section."""
        if not self._is_small(column) or not len(idx):
            return np.zeros(len(idx), dtype=bool)
        if not column.is_var:
            return np.full(len(idx), column.row_nbytes <= SMALL_ROW_BYTES)
        u, inv = np.unique(self._locate(idx)[0], return_inverse=True)
        return self._small_chunks(u, column)[inv.reshape(-1)]

    def chunk_section(self, chunk: int, column: Column) -> np.ndarray:
        """A column's whole data section in one chunk, as uint8 (LRU-cached)."""
        return self._section(chunk, column, "data", np.uint8)

    def _ensure_sizes(self, chunks: np.ndarray) -> None:
        """Check (once per chunk) that chunk files are as large as the manifest says before
        anything is allocated from the manifest's sizes: a manifest may lie."""
        todo = np.unique(chunks[~self._sized[chunks]])
        if todo.size:
            files = self._index.files(todo)
            self._fetcher.ensure_sizes([files[c] for c in todo.tolist()])
            self._sized[todo] = True

    def _read_small(self, idx: np.ndarray, col: Column) -> ColumnValues:
        chunks, local = self._locate(idx)
        self._ensure_sizes(chunks)
        if not col.is_var:
            out = aligned_empty((len(idx), *col.shape), col.np_dtype)
            for c in np.unique(chunks):
                sel = chunks == c
                rows = self.chunk_section(int(c), col).view(col.np_dtype).reshape(-1, *col.shape)
                out[sel] = rows[local[sel]]
            return out
        values: list = [None] * len(idx)
        for c in np.unique(chunks):
            sel = np.flatnonzero(chunks == c)
            data = memoryview(self.chunk_section(int(c), col))
            offs = self.chunk_offsets(int(c), col)
            lo = offs[local[sel]].tolist()
            hi = offs[local[sel] + 1].tolist()
            for k, a, b in zip(sel.tolist(), lo, hi):
                values[k] = data[a:b].tobytes()
        return values

    def read_plan(self, indices: np.ndarray, column: Column) -> tuple[ReadPlan, np.ndarray]:
        """The byte-range reads that gather ``column`` for ``indices`` into one packed buffer,
        and the (len+1) offsets of each row within that buffer."""
        chunks, local = self._locate(indices)
        self._ensure_sizes(chunks)
        n = len(indices)
        sec_off = self._index.sections(chunks, column.name, "data")[:, 0]
        files = self._index.files(chunks)
        if not column.is_var:
            rb = column.row_nbytes
            dest = np.arange(n + 1, dtype=np.int64) * rb
            plan = ReadPlan(
                files, chunks, sec_off + local * rb, np.full(n, rb, np.int64), dest[:-1]
            )
            return plan, dest
        starts = np.empty(n, dtype=np.int64)
        lens = np.empty(n, dtype=np.int64)
        self.preload_sections(indices, [column])
        for c in np.unique(chunks):
            sel = chunks == c
            offs = self.chunk_offsets(int(c), column)
            li = local[sel]
            starts[sel] = offs[li]
            lens[sel] = offs[li + 1] - offs[li]
        dest = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lens, out=dest[1:])
        return ReadPlan(files, chunks, sec_off + starts, lens, dest[:-1]), dest

    def read_column_into(
        self, indices: np.ndarray, column: Column, out=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gather one column's raw bytes for ``indices`` into ``out`` (allocated if None or too
        small). Returns (buffer view, per-row offsets into it)."""
        reads, dest = self.read_plan(indices, column)
        total = int(dest[-1])
        if out is None or out.nbytes < total:
            out = np.empty(total, dtype=np.uint8)
        view = out.reshape(-1).view(np.uint8)[:total]
        self.fetch_rows(np.asarray(indices, dtype=np.int64), reads, dest, column, view)
        return view, dest

    @property
    def prefetches(self) -> bool:
        """Whether ``prefetch`` does anything: the table is remote with the block cache on."""
        return self._fetcher.cache is not None

    def prefetch_sections(self, indices, columns: Sequence[str] | None = None) -> None:
        """Start downloading (without waiting) the cache blocks under the sections that
        ``prefetch`` of the same rows would read whole first, so a read-ahead over many
        batches does not meet those round trips one chunk at a time."""
        if not self.prefetches:
            return
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        items = (
            self._missing_sections(idx, self.schema.select(columns, self.name)) if idx.size else []
        )
        if not items:
            return
        chunks = np.asarray([it[0] for it in items], dtype=np.int64)
        self._ensure_sizes(chunks)
        files = self._index.files(chunks)
        reads = [
            Read(files[c], sec.offset, sec.length, 0)
            for c, sec in zip(chunks.tolist(), self._sections_of(items))
        ]
        self._fetcher.prefetch(ReadPlan.from_reads(reads))

    def prefetch(self, indices, columns: Sequence[str] | None = None) -> bool:
        """Start downloading the cache blocks that reading ``columns`` of rows ``indices``
        will need, without waiting (see ``Fetcher.prefetch``). True when all of them are now
        cached or downloading; False when the fetcher's bound left some out."""
        if not self.prefetches:
            return True
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if not idx.size:
            return True
        cols = self.schema.select(columns, self.name)
        self.preload_sections(idx, cols)  # what the batch reads whole, so it does not wait
        for col in cols:
            rows = idx[~self._small_rows(idx, col)]
            if rows.size:
                plan, _ = self.read_plan(rows, col)
                if not self._fetcher.prefetch(plan):
                    return False
        return True

    def read(self, indices, columns: Sequence[str] | None = None) -> dict[str, ColumnValues]:
        """Rows ``indices`` as a dict of columns: bytes/str lists, stacked numpy arrays."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(
                f"row indices out of range for table {self.name!r} with {len(self)} rows"
            )
        cols = self.schema.select(columns, self.name)
        if not self.is_local:
            self.preload_sections(idx, cols)
        return {c.name: self.read_column(idx, c) for c in cols}

    def read_column(self, idx: np.ndarray, col: Column) -> ColumnValues:
        """One column of rows ``idx``: bytes/str list, a stacked numpy array, or for a ragged
        column a list of arrays of shape (n_i, *inner). Rows of chunks whose section of a small
        column is read whole come from it; the others are read row by row."""
        small = self._small_rows(idx, col)
        if not small.any():
            return self._rows_read(idx, col)
        if small.all():
            return self._small_read(idx, col)
        return _merge_rows(
            small, self._small_read(idx[small], col), self._rows_read(idx[~small], col)
        )

    def _small_read(self, idx: np.ndarray, col: Column) -> ColumnValues:
        """``read_column`` out of whole data sections (every chunk of ``idx`` is small)."""
        values = self._read_small(idx, col)
        if col.kind == "text":
            values = self._decode_text(values, col)
        elif col.is_ragged:
            bounds = np.zeros(len(values) + 1, dtype=np.int64)
            np.cumsum([len(v) for v in values], out=bounds[1:])
            packed = np.frombuffer(bytearray(b"".join(values)), dtype=np.uint8)
            values = self._ragged(packed, bounds, col)
        return values

    def _rows_read(self, idx: np.ndarray, col: Column) -> ColumnValues:
        """``read_column`` row by row: exactly the bytes of the rows ``idx``."""
        if not col.is_var:
            plan, _ = self.read_plan(idx, col)  # checks the chunks' sizes before allocating
            out = aligned_empty((len(idx), *col.shape), col.np_dtype)
            self._fetcher.read_into(plan, out.reshape(-1).view(np.uint8))
            return out
        buf, dest = self.read_column_into(idx, col)
        if col.is_ragged:
            return self._ragged(buf, dest, col)
        mv = memoryview(buf)
        d = dest.tolist()
        values: list = [mv[d[i] : d[i + 1]].tobytes() for i in range(len(idx))]
        if col.kind == "text":
            values = self._decode_text(values, col)
        return values

    def _ragged(self, buf: np.ndarray, bounds: np.ndarray, col: Column) -> list[np.ndarray]:
        """Rows of a ragged column from their packed bytes: arrays viewing ``buf``."""
        where = f"table {self.name!r}, column {col.name!r}"
        return ragged_views(buf, bounds, col.np_dtype, col.shape, where)

    def _decode_text(self, values: list, col: Column) -> list[str]:
        try:
            return [v.decode("utf-8") for v in values]
        except UnicodeDecodeError as e:
            raise FormatError(
                f"table {self.name!r}, column {col.name!r}: text is not UTF-8 ({e})"
            ) from None

    def epoch_order(
        self, shuffle: Shuffle | bool | str, seed: int, epoch: int, subset: np.ndarray | None = None
    ) -> EpochOrder | SubsetOrder:
        """The row order of one epoch (see ``Shuffle`` for what ``shuffle=True`` means here),
        over every row or over ``subset`` (rows from ``select_rows``). A block shuffle of a
        subset keeps its runs of rows from one chunk together, as it keeps chunks together."""
        mode = Shuffle.coerce(shuffle).resolve(self.is_cached)
        if subset is None:
            rows = self._index.rows if mode == "block" else ()
            return EpochOrder(len(self), mode, int(seed), int(epoch), rows)
        runs: tuple[int, ...] = ()
        if mode == "block" and len(subset):
            chunk = self._locate(subset)[0]
            bounds = np.concatenate(
                [[0], np.flatnonzero(chunk[1:] != chunk[:-1]) + 1, [len(chunk)]]
            )
            runs = tuple(np.diff(bounds).tolist())
        return SubsetOrder(EpochOrder(len(subset), mode, int(seed), int(epoch), runs), subset)

    def select_rows(self, key: Any) -> np.ndarray:
        """Row numbers (int64) for a slice, row positions (negative count from the end) or a
        boolean mask over this table; IndexError naming the table for anything outside it."""
        key = key.key if isinstance(key, RowSelection) else key
        n = len(self)
        if isinstance(key, slice):
            return np.arange(*key.indices(n), dtype=np.int64)
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(
                    f"boolean mask of shape {idx.shape} does not match the {n} rows of table "
                    f"{self.name!r}"
                )
            return np.flatnonzero(idx).astype(np.int64)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"cannot select rows of table {self.name!r} with {idx.dtype} values")
        rows = idx.astype(np.int64).ravel()
        rows = np.where(rows < 0, rows + n, rows)
        bad = np.flatnonzero((rows < 0) | (rows >= n))
        if bad.size:
            raise IndexError(
                f"row {idx.ravel()[bad[0]]} out of range for table {self.name!r} with {n} rows"
            )
        return rows

    # -- async -----------------------------------------------------------------------------
    def _async_reader(self) -> _AsyncReader:
        loop = asyncio.get_running_loop()
        r = self._async_readers.get(loop)
        if r is None:
            r = _AsyncReader(self, loop)
            self._async_readers[loop] = r
        return r

    async def get_async(self, index: int, column: str) -> Any:
        """One cell, fetched without blocking the event loop; concurrent calls are batched."""
        col = self.schema.column(column, self.name)
        return await self._async_reader().get(self.row_index(index), col)


def _merge_rows(first: np.ndarray, a: ColumnValues, b: ColumnValues) -> ColumnValues:
    """One column's values for rows split by ``first`` (True: the row's value is in ``a``,
    False: in ``b``, each in row order) back in row order."""
    if isinstance(a, np.ndarray):
        out = aligned_empty((len(first), *a.shape[1:]), a.dtype)
        out[first] = a
        out[~first] = b
        return out
    values: list = [None] * len(first)
    for k, v in zip(np.flatnonzero(first).tolist(), a):
        values[k] = v
    for k, v in zip(np.flatnonzero(~first).tolist(), b):
        values[k] = v
    return values


def _subplan(plan: ReadPlan, mask: np.ndarray) -> ReadPlan:
    return ReadPlan(
        plan.files, plan.fidx[mask], plan.start[mask], plan.length[mask], plan.dest[mask]
    )


def _read_through(fetcher: Fetcher, file: str, nbytes: int, step: int = 8 << 20) -> None:
    """Read bytes [0, nbytes) of a chunk file through ``fetcher`` (which checks them)."""
    buf = np.empty(min(step, max(nbytes, 1)), dtype=np.uint8)
    for lo in range(0, nbytes, step):
        n = min(step, nbytes - lo)
        fetcher.read_into([Read(file, lo, n, 0)], buf[:n])


class _AsyncReader:
    """Batches get_async calls made in the same event-loop tick into one coalesced read."""

    def __init__(self, table: TableReader, loop: asyncio.AbstractEventLoop) -> None:
        self.table = table
        self.loop = loop
        self.pending: dict[str, list[tuple[int, asyncio.Future]]] = {}
        self.scheduled = False

    def get(self, index: int, col: Column) -> asyncio.Future:
        fut = self.loop.create_future()
        self.pending.setdefault(col.name, []).append((index, fut))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, {}
        for name, items in pending.items():
            col = self.table.schema[name]
            idx = np.array([i for i, _ in items], dtype=np.int64)
            task = self.loop.run_in_executor(None, self.table.read_column, idx, col)
            task.add_done_callback(lambda t, items=items, col=col: self._resolve(t, items, col))

    @staticmethod
    def _resolve(task: asyncio.Future, items, col: Column) -> None:
        if task.cancelled():
            for _, f in items:
                if not f.done():
                    f.cancel()
            return
        exc = task.exception()
        for k, (_, f) in enumerate(items):
            if f.done():
                continue
            if exc is not None:
                f.set_exception(exc)
            else:
                v = task.result()[k]
                f.set_result(np.array(v) if col.kind in ("array", "ragged") else v)
