"""The chunk index of a snapshot, for every format: how many chunks, where each one's rows start
(one int64 array, for ``searchsorted`` from row to chunk), and each chunk's record (file, size,
page checksums, sections) for the chunks a read needs.

Formats 1-3 list their chunks in the manifest: ``ListIndex`` wraps that list. Format 4 keeps
them in immutable index segments (docs/FORMAT.md, "Format 4"): ``SegmentIndex`` reads the root
and the ``rows`` sections of every segment in one verified fetch and takes one cumulative sum;
records are read lazily, a few pages at a time, checked with vectorised checks
(``gpuload.segments``) before anything is sized from them, and kept in a bounded cache. No
per-chunk Python object is built at open.

The writer's side (the segments a format-4 commit publishes, the merge rule) and vacuum's
(every file a version names) are here too."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from .checksums import PageChecksums
from .errors import FetchError, FormatError, IntegrityError
from .fetch import CacheOptions, Fetcher, FetchOptions, Read
from .format import (
    MAX_INT,
    SEGMENT_HEADER,
    ChunkInfo,
    IndexRoot,
    Manifest,
    SegmentInfo,
    record_dtype,
    record_field,
)
from .schema import Schema
from .segments import (
    check_header,
    check_records,
    chunk_from_record,
    chunk_id,
    chunk_names,
    encode_segment,
    records_from_chunks,
)
from .storage import Store

__all__ = [
    "ChunkFile",
    "ChunkIndex",
    "chunks_present",
    "INDEX_THRESHOLD",
    "ListIndex",
    "MAX_SEGMENTS",
    "SegmentIndex",
    "SegmentWriter",
    "files_named",
    "index_threshold",
    "max_segments",
    "merge_run",
    "open_index",
    "read_segment",
]

log = logging.getLogger("gpuload.index")
T = TypeVar("T")

INDEX_THRESHOLD = 4096  # a commit writes format 4 once the table would have more chunks than this
MAX_SEGMENTS = 32  # a root listing more has its smallest trailing segments merged
SEGMENT_PAGE = 4096  # page size of the checksums of segments written here
RECORD_CACHE_BYTES = 32 << 20  # records kept in memory per open index
BLOCK_BYTES = 4096  # records are read and cached in blocks of about this many bytes
SCAN_BYTES = 8 << 20  # records read at a time when a segment's chunk ids are scanned
ENV_THRESHOLD = "GPULOAD_INDEX_THRESHOLD"  # overrides INDEX_THRESHOLD (tests, benchmarks)
ENV_MAX_SEGMENTS = "GPULOAD_MAX_SEGMENTS"  # overrides MAX_SEGMENTS


def _env_int(name: str, default: int, lo: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if v < lo:
        raise ValueError(f"{name} must be at least {lo}, got {v}")
    return v


def index_threshold() -> int:
    """Chunks a table may have and still be written as a JSON manifest (formats 2 and 3):
    ``GPULOAD_INDEX_THRESHOLD`` or ``INDEX_THRESHOLD``."""
    return _env_int(ENV_THRESHOLD, INDEX_THRESHOLD, 0)


def max_segments() -> int:
    """Segments a format-4 root may list before a commit merges trailing ones:
    ``GPULOAD_MAX_SEGMENTS`` or ``MAX_SEGMENTS``."""
    return _env_int(ENV_MAX_SEGMENTS, MAX_SEGMENTS, 1)


class ChunkFile(str):
    """A chunk file name that knows its chunk number, so the fetcher can look its record up
    (``ChunkIndex.describe``) without a table-sized map from names to chunks."""

    chunk: int

    def __new__(cls, name: str, chunk: int) -> ChunkFile:
        obj = super().__new__(cls, name)
        obj.chunk = int(chunk)
        return obj

    def __reduce__(self):
        return (ChunkFile, (str(self), self.chunk))


class ChunkIndex:
    """The chunks of one snapshot. ``starts`` (int64, num_chunks + 1): the first row of each
    chunk and the row count at the end; records come from ``records`` for the chunks asked."""

    schema: Schema
    starts: np.ndarray
    nbytes: int  # bytes of all chunk files
    column_bytes: Mapping[str, int]  # bytes of each column's data sections
    unverified: int  # chunks without page checksums

    def _init_columns(self) -> None:
        self._pos = {c.name: i for i, c in enumerate(self.schema)}

    @property
    def num_chunks(self) -> int:
        return len(self.starts) - 1

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    @property
    def rows(self) -> np.ndarray:
        """Rows per chunk (a new read-only int64 array)."""
        out = np.diff(self.starts)
        out.flags.writeable = False
        return out

    def field(self, column: str, part: str) -> str:
        """The record field of a column's section ``part``: data, offsets or rowhash."""
        return record_field(self._pos[column], part)

    def records(self, chunks: np.ndarray) -> np.ndarray:
        """The records of ``chunks`` (chunk numbers, repeats allowed), in that order."""
        raise NotImplementedError

    def sections(self, chunks: np.ndarray, column: str, part: str) -> np.ndarray:
        """(offset, length) per chunk of a column's section ``part``; length 0 and offset -1
        for a row-hash section the chunk does not have."""
        return self.records(chunks)[self.field(column, part)]

    def files(self, chunks: np.ndarray) -> Mapping[int, str] | Sequence[str]:
        """Names of the chunk files of ``chunks``, indexable by chunk number (a ReadPlan's
        ``files``)."""
        raise NotImplementedError

    def chunk(self, i: int) -> ChunkInfo:
        """Chunk ``i`` as a ChunkInfo (for reports and errors, not for hot paths)."""
        raise NotImplementedError

    def describe(self, file: str) -> tuple[int, PageChecksums | None] | None:
        """Size and page checksums of a chunk file of this snapshot (None: not one): what the
        fetcher looks up."""
        raise NotImplementedError

    def data_bytes(self, columns: Sequence[str]) -> np.ndarray:
        """Bytes of the data sections of ``columns`` per chunk (for splitting work by bytes)."""
        raise NotImplementedError

    def iter_chunks(self, step: int = 4096) -> Iterator[tuple[int, ChunkInfo]]:
        """Every chunk in order, as (number, ChunkInfo), reading records ``step`` at a time."""
        rows = self.starts
        for lo in range(0, self.num_chunks, step):
            idx = np.arange(lo, min(lo + step, self.num_chunks), dtype=np.int64)
            recs = self.records(idx)
            names = chunk_names(recs["id"])
            for k, c in enumerate(idx.tolist()):
                yield c, chunk_from_record(recs[k], rows[c + 1] - rows[c], names[k], self.schema)

    def problems(self) -> list[str]:
        """Whatever a full read of the index finds wrong (``TableReader.verify``)."""
        return []


class ListIndex(ChunkIndex):
    """Formats 1-3: the chunk entries of a JSON manifest (validated when it was parsed), as
    records built once."""

    def __init__(self, manifest: Manifest) -> None:
        self.schema = manifest.schema
        self._init_columns()
        self._chunks = manifest.chunks
        rows, self._recs = records_from_chunks(manifest.chunks, self.schema)
        self.starts = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(rows, out=self.starts[1:])
        self._names = [c.file for c in manifest.chunks]
        self._number = {f: i for i, f in enumerate(self._names)}
        self.nbytes = int(self._recs["size"].sum())
        self.column_bytes = {
            c.name: int(self._recs[self.field(c.name, "data")][:, 1].sum()) for c in self.schema
        }
        self.unverified = int((self._recs["page"] == 0).sum())
        self._fields: dict[str, np.ndarray] = {}

    def records(self, chunks: np.ndarray) -> np.ndarray:
        return self._recs[np.asarray(chunks, dtype=np.int64)]

    def sections(self, chunks: np.ndarray, column: str, part: str) -> np.ndarray:
        name = self.field(column, part)
        arr = self._fields.get(name)
        if arr is None:
            arr = self._fields[name] = np.ascontiguousarray(self._recs[name])
        return arr[np.asarray(chunks, dtype=np.int64)]

    def files(self, chunks: np.ndarray) -> Sequence[str]:
        return self._names

    def chunk(self, i: int) -> ChunkInfo:
        return self._chunks[i]

    def describe(self, file: str) -> tuple[int, PageChecksums | None] | None:
        i = self._number.get(file)
        if i is None:
            return None
        c = self._chunks[i]
        return c.size, c.checksums

    def data_bytes(self, columns: Sequence[str]) -> np.ndarray:
        out = np.zeros(self.num_chunks, dtype=np.int64)
        for name in columns:
            out += self._recs[self.field(name, "data")][:, 1]
        return out

    def iter_chunks(self, step: int = 4096) -> Iterator[tuple[int, ChunkInfo]]:
        yield from enumerate(self._chunks)


def segment_fetcher(
    store: Store,
    label: str,
    segments: Sequence[SegmentInfo],
    cache: CacheOptions | bool | str | None = None,
    fetch: FetchOptions | None = None,
) -> Fetcher:
    """A fetcher for index segments: always verified (local reads too), through the table's
    block cache where it has one."""
    opts = dataclasses.replace(fetch or FetchOptions(), verify_local=True)
    return Fetcher(
        store,
        label,
        opts,
        cache,
        sizes={s.file: s.size for s in segments},
        checksums={s.file: s.checksums for s in segments},
    )


class _Segments:
    """Consecutive segments of a root (the first holding chunk ``first_chunk``) with their
    layouts and first chunks, and the errors that name a segment and the chunks a byte range of
    it describes. Chunk numbers passed in and out are the table's."""

    def __init__(
        self, label: str, segments: Sequence[SegmentInfo], schema: Schema, first_chunk: int = 0
    ) -> None:
        self.label = label
        self.list = tuple(segments)
        self.record = record_dtype(schema)
        self.layouts = [s.layout(self.record.itemsize) for s in self.list]
        self.first = np.full(len(self.list) + 1, first_chunk, dtype=np.int64)
        np.cumsum([s.chunks for s in self.list], out=self.first[1:])
        self.first[1:] += first_chunk

    def of_chunk(self, chunk: int) -> int:
        return int(np.searchsorted(self.first, chunk, side="right")) - 1

    def where(self, s: int) -> str:
        return f"table {self.label!r}, segment {self.list[s].file}"

    def chunk_where(self, chunk: int) -> str:
        return f"{self.where(self.of_chunk(chunk))}, chunk {chunk}"

    def chunks_in(self, s: int, lo: int, hi: int) -> tuple[int, int]:
        """The first and last chunk whose rows or record lie in bytes [lo, hi) of segment s."""
        lay, base = self.layouts[s], int(self.first[s])
        spans = []
        for off, end, width in (
            (lay.rows_offset, lay.rows_end, 8),
            (lay.records_offset, lay.records_end, lay.record_nbytes),
        ):
            if lo < end and hi > off:
                spans.append(((max(lo, off) - off) // width, (min(hi, end) - off - 1) // width))
        if not spans:
            return base, base + lay.chunks - 1
        return base + min(a for a, _ in spans), base + max(b for _, b in spans)

    def wrap(self, err: FormatError | IntegrityError, s: int | None = None) -> FormatError:
        """A fetch of segment bytes that failed its checks, as one FormatError naming the
        segment and the chunks those bytes describe."""
        file = getattr(err, "file", None)
        if s is None and file is not None:
            s = next((k for k, seg in enumerate(self.list) if seg.file == file), None)
        if s is None:
            return FormatError(f"table {self.label!r}, index segments: {err}")
        lo, hi = getattr(err, "span", (0, self.layouts[s].size))
        a, b = self.chunks_in(s, lo, hi)
        return FormatError(f"{self.where(s)}, chunks {a}-{b}: {err}")

    def unreadable(self, err: FetchError, s: int | None = None) -> FetchError:
        """A segment that could not be read at all (missing, unreachable), as a FetchError
        naming the table and the segment file rather than a chunk."""
        if s is None:
            s = next((k for k, seg in enumerate(self.list) if seg.file in str(err)), None)
        cause = err.__cause__
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(err)
        where = self.where(s) if s is not None else f"table {self.label!r}, index segments"
        return FetchError(f"{where}: the chunk index segment cannot be read ({detail})")

    def guarded(self, fn: Callable[[], T], s: int | None = None) -> T:
        """``fn()`` (a read of segment bytes); its errors reworded to name the segment."""
        try:
            return fn()
        except (FormatError, IntegrityError) as e:
            raise self.wrap(e, s) from e
        except FetchError as e:
            raise self.unreadable(e, s) from e


class SegmentIndex(ChunkIndex):
    """Format 4: the rows of every chunk read at open, records read lazily from the segments
    (verified, checked, cached up to ``RECORD_CACHE_BYTES``)."""

    def __init__(
        self,
        store: Store,
        manifest: Manifest,
        label: str,
        cache: CacheOptions | bool | str | None = None,
        fetch: FetchOptions | None = None,
    ) -> None:
        if manifest.index is None:
            raise ValueError("SegmentIndex needs a format-4 manifest")
        self._args = (store, manifest, label, cache, fetch)
        self.schema = manifest.schema
        self._init_columns()
        root = manifest.index
        self._segs = _Segments(label, root.segments, self.schema)
        self._fetcher = segment_fetcher(store, label, root.segments, cache, fetch)
        self.nbytes, self.column_bytes = root.nbytes, dict(root.column_bytes)
        self.unverified = root.unverified
        self._block = max(1, BLOCK_BYTES // self._segs.record.itemsize)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.starts = self._read_rows(root)

    def __getstate__(self) -> dict[str, Any]:
        store, manifest, label, cache, fetch = self._args
        return {"args": (store, manifest.dumps(), label, cache, fetch)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        store, raw, label, cache, fetch = state["args"]
        manifest = Manifest.loads(raw, f"pickled index of {label!r}")
        self.__init__(store, manifest, label, cache, fetch)

    # -- open: every chunk's rows ------------------------------------------------------------
    def _read_rows(self, root: IndexRoot) -> np.ndarray:
        """``starts``: the rows sections of all segments read (with their headers) in one
        verified fetch straight into one int64 array, checked, then summed in place."""
        segs = self._segs
        files = [s.file for s in segs.list]
        try:
            self._fetcher.ensure_sizes(files)  # real sizes before anything is sized from them
        except (FormatError, IntegrityError, FetchError):
            for k, f in enumerate(files):  # which one: named segment by segment
                segs.guarded(lambda f=f: self._fetcher.ensure_size(f), k)
            raise
        n = root.num_chunks
        buf = np.empty(8 * (n + 1) + SEGMENT_HEADER * len(files), dtype=np.uint8)
        head0 = 8 * (n + 1)
        reads = []
        for k, (seg, lay) in enumerate(zip(segs.list, segs.layouts)):
            reads.append(Read(seg.file, 0, SEGMENT_HEADER, head0 + SEGMENT_HEADER * k))
            reads.append(
                Read(seg.file, lay.rows_offset, 8 * seg.chunks, 8 * (1 + int(segs.first[k])))
            )
        segs.guarded(lambda: self._fetcher.read_into(reads, buf))
        for k, lay in enumerate(segs.layouts):
            at = head0 + SEGMENT_HEADER * k
            check_header(buf[at : at + SEGMENT_HEADER].tobytes(), lay, segs.where(k))
        starts = buf[:head0].view("<i8")
        _check_rows(starts[1:], segs)
        starts[0] = 0
        np.cumsum(starts[1:], out=starts[1:])
        _check_totals(starts, segs, root)
        return starts

    # -- records -----------------------------------------------------------------------------
    def records(self, chunks: np.ndarray) -> np.ndarray:
        chunks = np.asarray(chunks, dtype=np.int64).reshape(-1)
        if chunks.size == 1:  # the common case of row access: no sorting
            return self._one(int(chunks[0]))
        if not chunks.size:
            return np.zeros(0, self._segs.record)
        u, inv = np.unique(chunks, return_inverse=True)
        if u[0] < 0 or u[-1] >= self.num_chunks:
            raise IndexError(f"chunk numbers outside [0, {self.num_chunks})")
        return self._sorted_records(u)[inv]

    def _one(self, c: int) -> np.ndarray:
        """The record of chunk ``c`` (an array of one)."""
        if not 0 <= c < self.num_chunks:
            raise IndexError(f"chunk number {c} outside [0, {self.num_chunks})")
        s = self._segs.of_chunk(c)
        k = c - (c - int(self._segs.first[s])) % self._block
        block = self._cached([k]).get(k)
        if block is None:
            block = self._load([k])[k]
        return block[c - k : c - k + 1]

    def _block_of(self, u: np.ndarray) -> np.ndarray:
        """The first chunk of the block holding each chunk (blocks never cross segments)."""
        first = self._segs.first
        seg = np.searchsorted(first, u, side="right") - 1
        return u - (u - first[seg]) % self._block

    def _sorted_records(self, u: np.ndarray) -> np.ndarray:
        """Records of sorted, distinct chunks, loading the blocks not in the cache."""
        first = self._block_of(u)
        keys, at = np.unique(first, return_index=True)
        keys_l = keys.tolist()
        blocks = self._cached(keys_l)
        missing = [k for k in keys_l if k not in blocks]
        if missing:
            blocks.update(self._load(missing))
        out = np.empty(len(u), self._segs.record)
        bounds = [*at.tolist(), len(u)]
        for j, k in enumerate(keys_l):
            sl = slice(bounds[j], bounds[j + 1])
            out[sl] = blocks[k][u[sl] - k]
        return out

    def _locked(self) -> threading.Lock:
        """The cache's lock; a forked child makes its own (the parent's may have been held)."""
        if self._pid != os.getpid():
            self._lock, self._pid = threading.Lock(), os.getpid()
        return self._lock

    def _cached(self, keys: list[int]) -> dict[int, np.ndarray]:
        with self._locked():
            found = {}
            for k in keys:
                b = self._cache.get(k)
                if b is not None:
                    self._cache.move_to_end(k)
                    found[k] = b
            return found

    def _load(self, keys: list[int]) -> dict[int, np.ndarray]:
        """Read blocks (first chunk numbers ``keys``) in one verified fetch, check every
        record, and cache them."""
        segs, rec = self._segs, self._segs.record.itemsize
        spans = []  # (key, count, segment)
        for k in keys:
            s = segs.of_chunk(k)
            spans.append((k, min(self._block, int(segs.first[s + 1]) - k), s))
        dest = np.zeros(len(spans) + 1, dtype=np.int64)
        np.cumsum([c * rec for _, c, _ in spans], out=dest[1:])
        raw = np.empty(int(dest[-1]), dtype=np.uint8)
        reads = [
            Read(
                segs.list[s].file,
                segs.layouts[s].records_offset + (k - int(segs.first[s])) * rec,
                c * rec,
                int(d),
            )
            for (k, c, s), d in zip(spans, dest[:-1].tolist())
        ]
        segs.guarded(lambda: self._fetcher.read_into(reads, raw))
        recs = raw.view(segs.record)
        numbers = np.concatenate([np.arange(k, k + c, dtype=np.int64) for k, c, _ in spans])
        rows = self.starts[numbers + 1] - self.starts[numbers]
        check_records(recs, rows, self.schema, lambda i: segs.chunk_where(int(numbers[i])))
        out, pos = {}, 0
        for k, c, _ in spans:
            out[k] = recs[pos : pos + c].copy()
            pos += c
        self._remember(out)
        return out

    def _remember(self, blocks: dict[int, np.ndarray]) -> None:
        with self._locked():
            for k, b in blocks.items():
                if k not in self._cache:
                    self._cache[k] = b
                    self._cache_bytes += b.nbytes
            while self._cache_bytes > RECORD_CACHE_BYTES and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.nbytes

    # -- the rest of the interface -----------------------------------------------------------
    def files(self, chunks: np.ndarray) -> Mapping[int, str]:
        chunks = np.asarray(chunks, dtype=np.int64).reshape(-1)
        u = chunks if chunks.size == 1 else np.unique(chunks)
        names = chunk_names(self.records(u)["id"])
        return {c: ChunkFile(n, c) for c, n in zip(u.tolist(), names)}

    def chunk(self, i: int) -> ChunkInfo:
        rec = self.records(np.array([i]))[0]
        (name,) = chunk_names(rec["id"][None])
        return chunk_from_record(rec, int(self.starts[i + 1] - self.starts[i]), name, self.schema)

    def describe(self, file: str) -> tuple[int, PageChecksums | None] | None:
        c = getattr(file, "chunk", None)
        if c is None or not 0 <= c < self.num_chunks:
            return None
        rec = self.records(np.array([c]))[0]
        if chunk_names(rec["id"][None])[0] != file:
            return None
        page = int(rec["page"])
        sums = PageChecksums(page, int(rec["covers"]), int(rec["digest"])) if page else None
        return int(rec["size"]), sums

    def data_bytes(self, columns: Sequence[str]) -> np.ndarray:
        """Estimated from the rows (the root's per-column totals spread evenly over rows):
        exact figures would read every record."""
        total = sum(self.column_bytes.get(c, 0) for c in columns)
        per_row = total / max(1, self.num_rows)
        return np.round(np.diff(self.starts) * per_row).astype(np.int64)

    def problems(self) -> list[str]:
        """Every segment read whole and checked; the root's totals recomputed; chunk files
        named twice across segments."""
        out: list[str] = []
        store, manifest, label, _, _ = self._args
        seen: dict[bytes, int] = {}
        nbytes, unverified = 0, 0
        cols = dict.fromkeys(self.column_bytes, 0)
        for k in range(len(self._segs.list)):
            try:
                _, recs = read_segment(self._fetcher, self._segs, k, self.schema)
            except FormatError as e:
                out.append(str(e))
                continue
            nbytes += int(recs["size"].sum())
            unverified += int((recs["page"] == 0).sum())
            for c in cols:
                cols[c] += int(recs[self.field(c, "data")][:, 1].sum())
            for j, key in enumerate(np.ascontiguousarray(recs["id"]).view("V16").ravel().tolist()):
                if key in seen:
                    out.append(
                        f"{self._segs.chunk_where(int(self._segs.first[k]) + j)}: "
                        f"the chunk file is also chunk {seen[key]}"
                    )
                seen[key] = int(self._segs.first[k]) + j
        if not out and (nbytes, cols, unverified) != (
            self.nbytes,
            self.column_bytes,
            self.unverified,
        ):
            out.append(
                f"table {label!r}: the root's totals (bytes, column bytes, unverified "
                "chunks) disagree with its segments"
            )
        return out


def _check_rows(rows: np.ndarray, segs: _Segments) -> None:
    """Every chunk has at least one row and fewer than 2^50."""
    bad = (rows <= 0) | (rows >= MAX_INT)
    if bad.any():
        c = int(np.argmax(bad))
        raise FormatError(f"{segs.chunk_where(c)}: has {int(rows[c])} rows; a chunk has 1 to 2^50")


def _check_totals(starts: np.ndarray, segs: _Segments, root: IndexRoot) -> None:
    """The summed rows grow at every chunk (no overflow) and agree with each segment's entry
    and the root's total."""
    if len(starts) > 1 and not bool(np.all(starts[1:] > starts[:-1])):
        raise FormatError(f"table {segs.label!r}: the chunks' rows overflow")
    for k, seg in enumerate(segs.list):
        a, b = int(segs.first[k]), int(segs.first[k + 1])
        got = int(starts[b] - starts[a])
        if got != seg.rows:
            raise FormatError(
                f"{segs.where(k)}, chunks {a}-{b - 1}: the rows section sums to {got} rows, "
                f"the root says {seg.rows}"
            )
    if int(starts[-1]) != root.num_rows:  # (the root's own check makes this unreachable)
        raise FormatError(
            f"table {segs.label!r}: the segments' rows sections sum to {int(starts[-1])} rows, "
            f"the root says {root.num_rows}"
        )


def read_segment(
    fetcher: Fetcher, segs: _Segments, k: int, schema: Schema
) -> tuple[np.ndarray, np.ndarray]:
    """Segment ``k`` read whole (verified) and checked: its rows and records."""
    seg, lay = segs.list[k], segs.layouts[k]
    segs.guarded(lambda: fetcher.ensure_size(seg.file), k)
    buf = np.empty(lay.records_end, dtype=np.uint8)
    segs.guarded(lambda: fetcher.read_into([Read(seg.file, 0, lay.records_end, 0)], buf), k)
    check_header(buf[:SEGMENT_HEADER].tobytes(), lay, segs.where(k))
    rows = buf[lay.rows_offset : lay.rows_end].view("<i8")
    first = int(segs.first[k])
    bad = (rows <= 0) | (rows >= MAX_INT)
    if bad.any():
        c = first + int(np.argmax(bad))
        raise FormatError(f"{segs.chunk_where(c)}: has {int(rows[c - first])} rows")
    if int(rows.sum()) != seg.rows:
        raise FormatError(
            f"{segs.where(k)}: the rows section sums to {int(rows.sum())}, the root says {seg.rows}"
        )
    recs = buf[lay.records_offset : lay.records_end].view(segs.record)
    check_records(recs, rows, schema, lambda i: segs.chunk_where(first + i))
    return rows, recs


def open_index(
    store: Store,
    manifest: Manifest,
    label: str,
    cache: CacheOptions | bool | str | None = None,
    fetch: FetchOptions | None = None,
) -> ChunkIndex:
    """The chunk index of a snapshot: its JSON chunk list wrapped (formats 1-3), or its
    segments opened (format 4: reads the rows sections)."""
    if manifest.is_indexed:
        return SegmentIndex(store, manifest, label, cache, fetch)
    return ListIndex(manifest)


def files_named(
    store: Store, manifest: Manifest, label: str, memo: dict[str, list[str]] | None = None
) -> set[str]:
    """Every file a version needs: its chunks, and for format 4 its segments (each read whole
    and checked; ``memo`` keeps the chunk names of segments read before, by segment file)."""
    if not manifest.is_indexed:
        return {c.file for c in manifest.chunks}
    memo = {} if memo is None else memo
    root = manifest.index
    segs = _Segments(label, root.segments, manifest.schema)
    fetcher = segment_fetcher(store, label, root.segments, cache=False)
    out: set[str] = set()
    for k, seg in enumerate(root.segments):
        out.add(seg.file)
        names = memo.get(seg.file)
        if names is None:
            _, recs = read_segment(fetcher, segs, k, manifest.schema)
            names = memo[seg.file] = chunk_names(recs["id"])
        out.update(names)
    fetcher.close()
    return out


def _segment_ids(fetcher: Fetcher, segs: _Segments, k: int) -> Iterator[tuple[int, np.ndarray]]:
    """The chunk ids of segment ``k``, ``SCAN_BYTES`` of records at a time (verified reads):
    (the table's number of the first chunk, (n, 16) uint8 ids)."""
    seg, lay = segs.list[k], segs.layouts[k]
    segs.guarded(lambda: fetcher.ensure_size(seg.file), k)
    head = np.empty(SEGMENT_HEADER, dtype=np.uint8)
    segs.guarded(lambda: fetcher.read_into([Read(seg.file, 0, SEGMENT_HEADER, 0)], head), k)
    check_header(head.tobytes(), lay, segs.where(k))
    rec = lay.record_nbytes
    step = max(1, SCAN_BYTES // rec)
    buf = np.empty(min(step, seg.chunks) * rec, dtype=np.uint8)
    for lo in range(0, seg.chunks, step):
        n = min(step, seg.chunks - lo)
        read = Read(seg.file, lay.records_offset + lo * rec, n * rec, 0)
        segs.guarded(lambda r=read, n=n: fetcher.read_into([r], buf[: n * rec]), k)
        yield int(segs.first[k]) + lo, buf[: n * rec].view(segs.record)["id"]


def chunks_present(
    store: Store, manifest: Manifest, label: str, files: Sequence[str], clean: set[str]
) -> dict[str, int]:
    """Which of the chunk files ``files`` format-4 version ``manifest`` already names, with
    their chunk numbers: every segment's ids read a block of records at a time (memory stays
    bounded whatever the segments' sizes) and compared vectorised. Segments in ``clean`` are
    known to name none of ``files`` and are skipped; each segment found so is added to it
    (segments are immutable, so a rebased commit reads only the winner's new ones)."""
    root = manifest.index
    if root is None or not files:
        return {}
    want = np.frombuffer(b"".join(chunk_id(f) for f in files), np.uint8).reshape(-1, 16)
    want_keys = np.ascontiguousarray(want).view("V16").ravel()
    segs = _Segments(label, root.segments, manifest.schema)
    fetcher = segment_fetcher(store, label, root.segments, cache=False)
    found: dict[str, int] = {}
    try:
        for k, seg in enumerate(segs.list):
            if seg.file in clean:
                continue
            hits: dict[str, int] = {}
            for first, ids in _segment_ids(fetcher, segs, k):
                keys = np.ascontiguousarray(ids).view("V16").ravel()
                at = np.flatnonzero(np.isin(keys, want_keys))
                names = chunk_names(ids[at]) if at.size else []
                hits.update(zip(names, (first + at).tolist()))
            if hits:
                found.update(hits)
            else:
                clean.add(seg.file)
    finally:
        fetcher.close()
    return found


# -- writing -----------------------------------------------------------------------------------
def merge_run(chunks: Sequence[int], limit: int) -> int:
    """How many trailing segments (chunk counts ``chunks``, in row order) to merge into one so
    that at most ``limit`` remain: 0 when none need to; else the last ones, at least two, plus
    each earlier one while it holds no more chunks than those chosen together. Segments then
    grow about geometrically from last to first, so a record is rewritten a few times over a
    table's life (about 5 in simulations of 10^5 appends; O(log N))."""
    n = len(chunks)
    if n <= limit:
        return 0
    k = max(2, n - limit + 1)
    total = sum(chunks[n - k :])
    while k < n and chunks[n - k - 1] <= total:
        k += 1
        total += chunks[n - k]
    return k


@dataclasses.dataclass(frozen=True)
class _Totals:
    chunks: int = 0
    rows: int = 0
    nbytes: int = 0
    columns: tuple[int, ...] = ()
    unverified: int = 0

    @classmethod
    def of(cls, rows: np.ndarray, recs: np.ndarray, schema: Schema) -> _Totals:
        cols = tuple(int(recs[record_field(i, "data")][:, 1].sum()) for i in range(len(schema)))
        return cls(
            len(rows),
            int(rows.sum()),
            int(recs["size"].sum()),
            cols,
            int((recs["page"] == 0).sum()),
        )

    @classmethod
    def of_root(cls, root: IndexRoot, schema: Schema) -> _Totals:
        cols = tuple(int(root.column_bytes[c.name]) for c in schema)
        return cls(root.num_chunks, root.num_rows, root.nbytes, cols, root.unverified)

    def __add__(self, o: _Totals) -> _Totals:
        cols = tuple(a + b for a, b in zip(self.columns or (0,) * len(o.columns), o.columns))
        return _Totals(
            self.chunks + o.chunks,
            self.rows + o.rows,
            self.nbytes + o.nbytes,
            cols,
            self.unverified + o.unverified,
        )


class SegmentWriter:
    """The index side of one commit: the segments a format-4 root needs on top of a base
    version, written before the root is published (so a crash before it leaves the table as
    it was). The segment of this commit's own chunks is written once and reused when a lost
    race rebases the commit; ``written`` lists every segment file it wrote."""

    def __init__(self, store: Store, schema: Schema, label: str, chunks: Sequence[ChunkInfo]):
        self.store, self.schema, self.label = store, schema, label
        self.rows, self.records = records_from_chunks(chunks, schema)
        check_records(self.records, self.rows, schema, lambda k: f"new chunk {k} of {label!r}")
        self.totals = _Totals.of(self.rows, self.records, schema)
        self.written: list[str] = []
        self._own: SegmentInfo | None = None
        self._converted: dict[tuple[str, int], tuple[SegmentInfo | None, _Totals]] = {}

    def root_on(self, base: Manifest | None) -> IndexRoot:
        """The index of ``base``'s chunks (None: no base) followed by this commit's."""
        segs, totals = self._base(base)
        pending = len(self.rows) > 0
        counts = [s.chunks for s in segs] + ([len(self.rows)] if pending else [])
        k = merge_run(counts, max_segments())
        if k:
            run = segs[len(segs) - (k - pending) :] if k - pending else []
            keep = segs[: len(segs) - len(run)]
            segs = [*keep, self._merged(run, sum(s.chunks for s in keep), pending)]
        elif pending:
            segs = [*segs, self._own_segment()]
        t = totals + self.totals
        return IndexRoot(
            segments=tuple(segs),
            num_chunks=t.chunks,
            num_rows=t.rows,
            nbytes=t.nbytes,
            column_bytes={
                c.name: t.columns[i] if t.columns else 0 for i, c in enumerate(self.schema)
            },
            unverified=t.unverified,
        )

    def _base(self, base: Manifest | None) -> tuple[list[SegmentInfo], _Totals]:
        if base is None:
            return [], _Totals(columns=(0,) * len(self.schema))
        if base.index is not None:
            return list(base.index.segments), _Totals.of_root(base.index, base.schema)
        key = (base.table_id, base.version)
        if key not in self._converted:  # a JSON base converted: one segment of all its chunks
            rows, recs = records_from_chunks(base.chunks, base.schema)
            seg = self._write(rows, recs) if len(rows) else None
            self._converted[key] = (seg, _Totals.of(rows, recs, base.schema))
        seg, totals = self._converted[key]
        return ([seg] if seg is not None else []), totals

    def _own_segment(self) -> SegmentInfo:
        if self._own is None:
            self._own = self._write(self.rows, self.records)
        return self._own

    def _merged(self, run: list[SegmentInfo], first_chunk: int, own: bool) -> SegmentInfo:
        """One segment of the records of ``run`` (the base's trailing segments, the first
        holding chunk ``first_chunk``) followed by this commit's own when ``own``."""
        rows, recs = [], []
        if run:
            segs = _Segments(self.label, run, self.schema, first_chunk)
            fetcher = segment_fetcher(self.store, self.label, run, cache=False)
            for k in range(len(run)):
                r, c = read_segment(fetcher, segs, k, self.schema)
                rows.append(r)
                recs.append(c)
            fetcher.close()
        if own:
            rows.append(self.rows)
            recs.append(self.records)
        log.debug("%s: merging %d segments into one", self.label, len(run) + own)
        return self._write(np.concatenate(rows), np.concatenate(recs))

    def _write(self, rows: np.ndarray, recs: np.ndarray) -> SegmentInfo:
        parts, _, sums = encode_segment(rows, recs, SEGMENT_PAGE)
        name = f"index/{uuid.uuid4().hex}.idx"
        self.written.append(name)
        size = self.store.write_new(name, parts)
        return SegmentInfo(name, len(rows), int(rows.sum()), size, sums)

    def discard(self, keep: set[str] | frozenset[str] = frozenset()) -> None:
        """Remove the segment files this commit wrote that ``keep`` does not name (best effort:
        one that cannot be removed is left for vacuum)."""
        for name in self.written:
            if name in keep:
                continue
            try:
                self.store.remove(name)
            except OSError as e:
                log.warning(
                    "could not remove unpublished segment %s of %s: %s", name, self.label, e
                )
        self.written = [n for n in self.written if n in keep]
        if self._own is not None and self._own.file not in keep:
            self._own = None
        self._converted = {
            k: v for k, v in self._converted.items() if v[0] is None or v[0].file in keep
        }
