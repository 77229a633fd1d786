"""The on-disk format (see docs/FORMAT.md): manifest JSON + immutable chunk files.

A chunk holds, for each column, one section (64-byte aligned): fixed-shape columns as raw
little-endian arrays; variable-length columns (image, bytes, text, ragged) as concatenated bytes
plus an int64 offsets section, so any row's bytes are one byte range. Since format 2 every chunk
ends with the hashes of its pages (gpuload.checksums), so every read can be verified. Format 3
is format 2 plus ragged columns: only a manifest whose schema has one is written as format 3,
so readers that know format 2 keep reading every other table. Format 4 moves the chunk list out
of the manifest into immutable binary index segments (``index/<32 hex>.idx``; their layout is
defined here, their reading in ``gpuload.index``): the manifest becomes a small root naming them.

A manifest is validated completely when it is parsed: every field's type and range, the nesting
depth of metadata, and every section against its chunk. A malformed manifest is one
``FormatError`` naming the manifest and the field, never a raw ValueError or TypeError.
"""

from __future__ import annotations

import gc
import json
import math
import re
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from .checksums import PageChecksums
from .errors import FormatError, SchemaError
from .schema import Schema
from .storage import check_relpath

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ChunkInfo",
    "IndexRoot",
    "Manifest",
    "SegmentInfo",
    "SegmentLayout",
    "Section",
    "ALIGN",
    "INDEXED_SINCE",
    "MAX_INT",
    "check_chunks",
    "record_dtype",
    "record_field",
    "version_path",
]

FORMAT_NAME = "gpuload-table"
FORMAT_VERSION = 4  # the newest this gpuload writes (for tables that need it: written_version)
SUPPORTED_VERSIONS = (1, 2, 3, 4)
RAGGED_SINCE = 3  # the first format with ragged columns
INDEXED_SINCE = 4  # the first format whose chunk list lives in index segments
ALIGN = 64
MANIFEST = "manifest.json"
CHUNK_RE = re.compile(r"chunks/[0-9a-f]{32}\.chunk")
SEGMENT_RE = re.compile(r"index/[0-9a-f]{32}\.idx")
SEGMENT_MAGIC = b"gpuload-index\x00\x00\x00"  # the first 16 bytes of every segment file
SEGMENT_HEADER = 64  # bytes: magic, then six little-endian uint64 (see SegmentLayout.header)
MAX_ROOT_SEGMENTS = 1 << 16  # a root listing more is refused (writers keep at most 32)
MAX_INT = 1 << 50  # offsets, sizes, rows and versions: far beyond any real table, far below 2^63
MAX_DEPTH = 32  # nesting depth of free-form metadata
_TABLE_ID_RE = re.compile(r"[0-9a-f]{1,64}")


def written_version(schema: Schema) -> int:
    """The format version a manifest of ``schema`` is written as: the oldest that holds it (3
    with a ragged column, else 2), so an older gpuload refuses only what it cannot read."""
    return RAGGED_SINCE if any(c.is_ragged for c in schema) else 2


def version_path(version: int) -> str:
    """The immutable file of a committed version: ``versions/v<12 digits>.json``."""
    return f"versions/v{version:012d}.json"


def _int(v: Any, what: str, where: str, lo: int = 0, hi: int = MAX_INT) -> int:
    """A JSON integer in [lo, hi), or a FormatError naming the field."""
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v < hi:
        raise FormatError(
            f"{where}: field {what!r} must be an integer in [{lo}, {hi}), got {v!r}"[:400]
        )
    return v


def _depth(v: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a JSON value, stopping once it exceeds ``limit``."""
    stack = [(v, 1)]
    deepest = 0
    while stack:
        x, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(x, dict):
            stack.extend((y, d + 1) for y in x.values())
        elif isinstance(x, list):
            stack.extend((y, d + 1) for y in x)
    return deepest


@dataclass(frozen=True)
class Section:
    """A byte range [offset, offset + length) inside a chunk file."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    @classmethod
    def from_json(cls, v: Any, what: str, where: str) -> Section:
        if not isinstance(v, list) or len(v) != 2:
            raise FormatError(f"{where}: field {what!r} must be [offset, length], got {v!r}"[:400])
        return cls(_int(v[0], f"{what}[0]", where), _int(v[1], f"{what}[1]", where))


@dataclass(frozen=True)
class ChunkInfo:
    """One immutable chunk: its file, row count, size, per-column sections and page checksums
    (None for chunks written before format 2)."""

    file: str
    rows: int
    size: int
    data: Mapping[str, Section]
    offsets: Mapping[str, Section] = field(default_factory=dict)
    checksums: PageChecksums | None = None
    # variable-length columns: each row's xxh3-64 hash (uint64 LE), so a row read alone is
    # verified without reading the pages around it
    rowhash: Mapping[str, Section] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        cols: dict[str, Any] = {}
        for name, sec in self.data.items():
            entry: dict[str, Any] = {"data": [sec.offset, sec.length]}
            if name in self.offsets:
                o = self.offsets[name]
                entry["offsets"] = [o.offset, o.length]
            if name in self.rowhash:
                h = self.rowhash[name]
                entry["rowhash"] = [h.offset, h.length]
            cols[name] = entry
        d: dict[str, Any] = {
            "file": self.file,
            "rows": self.rows,
            "size": self.size,
            "columns": cols,
        }
        if self.checksums is not None:
            d["checksums"] = self.checksums.to_json()
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> ChunkInfo:
        if not isinstance(d, Mapping):
            raise FormatError(f"{where}: a chunk entry must be an object")
        file = d.get("file")
        if not isinstance(file, str) or not CHUNK_RE.fullmatch(file):
            raise FormatError(f"{where}: chunk path {file!r} is not a chunk file inside the table")
        check_relpath(file)
        where = f"{where} ({file})"
        rows = _int(d.get("rows"), "rows", where)
        size = _int(d.get("size"), "size", where)
        cols = d.get("columns")
        if not isinstance(cols, Mapping):
            raise FormatError(f"{where}: field 'columns' must be an object")
        data: dict[str, Section] = {}
        offsets: dict[str, Section] = {}
        rowhash: dict[str, Section] = {}
        for name, v in cols.items():
            if not isinstance(v, Mapping):
                raise FormatError(f"{where}: field 'columns.{name}' must be an object")
            data[name] = Section.from_json(v.get("data"), f"columns.{name}.data", where)
            if "offsets" in v:
                offsets[name] = Section.from_json(v["offsets"], f"columns.{name}.offsets", where)
            if "rowhash" in v:
                rowhash[name] = Section.from_json(v["rowhash"], f"columns.{name}.rowhash", where)
        sums = PageChecksums.from_json(d["checksums"], where) if "checksums" in d else None
        if rowhash and sums is None:
            raise FormatError(f"{where}: row hashes without page checksums")
        return cls(file, rows, size, data, offsets, sums, rowhash)


def record_field(position: int, part: str) -> str:
    """The record field of section ``part`` ("data", "offsets" or "rowhash") of the column at
    ``position`` in the schema: an (offset, length) pair of little-endian int64."""
    return f"c{position}.{part}"


def record_dtype(schema: Schema) -> np.dtype:
    """The fixed-width little-endian record of one chunk in a format-4 index segment: the chunk
    file's 16-byte id, its size, page size (0: no checksums), checksummed bytes and digest,
    then per column (in schema order) its data section, and for variable-length columns its
    offsets and row-hash sections (a missing row-hash section is (-1, 0))."""
    return _record_dtype(tuple(c.is_var for c in schema))


@lru_cache(maxsize=64)
def _record_dtype(var: tuple[bool, ...]) -> np.dtype:
    fields: list[tuple] = [
        ("id", "u1", (16,)),
        ("size", "<i8"),
        ("page", "<i8"),
        ("covers", "<i8"),
        ("digest", "<u8"),
    ]
    for i, v in enumerate(var):
        parts = ("data", "offsets", "rowhash") if v else ("data",)
        fields += [(record_field(i, p), "<i8", (2,)) for p in parts]
    return np.dtype(fields)


def _align(n: int) -> int:
    return n + (-n) % ALIGN


@dataclass(frozen=True)
class SegmentLayout:
    """Where things lie in a segment file of ``chunks`` records of ``record_nbytes`` bytes, with
    page hashes over pages of ``page`` bytes: the 64-byte header, the ``rows`` section (int64 per
    chunk) at 64, the ``records`` section at the next 64-byte boundary, zero padding up to a
    64-byte boundary (``covers``), then the page hash table (8 bytes a page) up to ``size``."""

    chunks: int
    record_nbytes: int
    page: int

    rows_offset = SEGMENT_HEADER

    @property
    def rows_end(self) -> int:
        return SEGMENT_HEADER + 8 * self.chunks

    @property
    def records_offset(self) -> int:
        return _align(self.rows_end)

    @property
    def records_end(self) -> int:
        return self.records_offset + self.chunks * self.record_nbytes

    @property
    def covers(self) -> int:
        return _align(self.records_end)

    @property
    def size(self) -> int:
        return self.covers + 8 * -(-self.covers // self.page)

    def header(self) -> bytes:
        """The 64 header bytes: magic, then format version, chunks, record bytes, rows offset,
        records offset and checksummed bytes as little-endian uint64."""
        return SEGMENT_MAGIC + struct.pack(
            "<6Q",
            INDEXED_SINCE,
            self.chunks,
            self.record_nbytes,
            self.rows_offset,
            self.records_offset,
            self.covers,
        )


@dataclass(frozen=True)
class SegmentInfo:
    """One immutable index segment as the root lists it: its file, how many chunks and rows its
    records describe, its size and page checksums."""

    file: str
    chunks: int
    rows: int
    size: int
    checksums: PageChecksums

    def layout(self, record_nbytes: int) -> SegmentLayout:
        return SegmentLayout(self.chunks, record_nbytes, self.checksums.page)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "chunks": self.chunks,
            "rows": self.rows,
            "size": self.size,
            "checksums": self.checksums.to_json(),
        }

    @classmethod
    def from_json(cls, d: Any, where: str, record_nbytes: int) -> SegmentInfo:
        """A root's segment entry, its size checked against the layout its counts imply."""
        if not isinstance(d, Mapping):
            raise FormatError(f"{where}: a segment entry must be an object")
        file = d.get("file")
        if not isinstance(file, str) or not SEGMENT_RE.fullmatch(file):
            raise FormatError(f"{where}: segment path {file!r} is not an index segment file"[:400])
        check_relpath(file)
        where = f"{where} ({file})"
        chunks = _int(d.get("chunks"), "chunks", where, 1)
        rows = _int(d.get("rows"), "rows", where, chunks)
        size = _int(d.get("size"), "size", where)
        if "checksums" not in d:
            raise FormatError(f"{where}: a segment needs page checksums")
        seg = cls(file, chunks, rows, size, PageChecksums.from_json(d["checksums"], where))
        lay = seg.layout(record_nbytes)
        if seg.checksums.covers != lay.covers or seg.checksums.end != size or size != lay.size:
            raise FormatError(
                f"{where}: {chunks} records of {record_nbytes} bytes make a {lay.size}-byte "
                f"segment checksummed up to byte {lay.covers}; the root says {size} bytes, "
                f"checksummed up to {seg.checksums.covers}"
            )
        return seg


@dataclass(frozen=True)
class IndexRoot:
    """What a format-4 root says of its chunks: the index segments holding their records, in
    row order, and the totals over them."""

    segments: tuple[SegmentInfo, ...]
    num_chunks: int
    num_rows: int
    nbytes: int
    column_bytes: Mapping[str, int]
    unverified: int = 0  # chunks without page checksums (written before format 2)

    def to_json(self) -> dict[str, Any]:
        return {
            "num_chunks": self.num_chunks,
            "nbytes": self.nbytes,
            "unverified_chunks": self.unverified,
            "column_bytes": dict(self.column_bytes),
            "segments": [s.to_json() for s in self.segments],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], schema: Schema, where: str) -> IndexRoot:
        """The index fields of a format-4 root, validated (``check``)."""
        if "chunks" in d:
            raise FormatError(f"{where}: a format-4 root lists no chunks (they are in segments)")
        segs = d.get("segments")
        if not isinstance(segs, list) or len(segs) > MAX_ROOT_SEGMENTS:
            raise FormatError(
                f"{where}: field 'segments' must be a list of at most {MAX_ROOT_SEGMENTS}"
            )
        cb = d.get("column_bytes")
        if not isinstance(cb, Mapping):
            raise FormatError(f"{where}: field 'column_bytes' must be an object")
        rec = record_dtype(schema).itemsize
        root = cls(
            segments=tuple(
                SegmentInfo.from_json(s, f"{where} segment {i}", rec) for i, s in enumerate(segs)
            ),
            num_chunks=_int(d.get("num_chunks"), "num_chunks", where),
            num_rows=_int(d.get("num_rows"), "num_rows", where),
            nbytes=_int(d.get("nbytes"), "nbytes", where),
            column_bytes={k: _int(v, f"column_bytes.{k}", where) for k, v in cb.items()},
            unverified=_int(d.get("unverified_chunks", 0), "unverified_chunks", where),
        )
        root.check(schema, where)
        return root

    def check(self, schema: Schema, where: str) -> None:
        """The totals agree with the segments, and the segments are listed once each."""
        files = [s.file for s in self.segments]
        if len(set(files)) != len(files):
            raise FormatError(f"{where}: a segment is listed twice")
        chunks = sum(s.chunks for s in self.segments)
        rows = sum(s.rows for s in self.segments)
        if chunks != self.num_chunks or rows != self.num_rows:
            raise FormatError(
                f"{where}: the root says {self.num_chunks} chunks and {self.num_rows} rows, its "
                f"segments hold {chunks} chunks and {rows} rows"
            )
        if sorted(self.column_bytes) != sorted(schema.names):
            raise FormatError(f"{where}: field 'column_bytes' must name each column once")
        if self.unverified > self.num_chunks:
            raise FormatError(f"{where}: more unverified chunks than chunks")


@dataclass(frozen=True)
class Manifest:
    """One committed snapshot of a table. Formats 1-3 list their chunks here (``chunks``); a
    format-4 root lists none (``chunks`` is empty) and names its index segments (``index``):
    read chunks through ``gpuload.index.open_index``, which serves both."""

    table_id: str
    version: int
    schema: Schema
    chunks: tuple[ChunkInfo, ...]
    created: float = 0.0
    updated: float = 0.0
    format_version: int = 2  # as read; a manifest is written as written_version(schema) or 4
    index: IndexRoot | None = None  # format 4: where the chunk records are

    @property
    def is_indexed(self) -> bool:
        """Whether the chunks are in index segments (format 4) rather than listed here."""
        return self.index is not None

    @property
    def num_chunks(self) -> int:
        return self.index.num_chunks if self.index is not None else len(self.chunks)

    @property
    def num_rows(self) -> int:
        if self.index is not None:
            return self.index.num_rows
        return sum(c.rows for c in self.chunks)

    @property
    def nbytes(self) -> int:
        if self.index is not None:
            return self.index.nbytes
        return sum(c.size for c in self.chunks)

    def to_json(self) -> dict[str, Any]:
        d = {
            "format": FORMAT_NAME,
            "format_version": written_version(self.schema),
            "table_id": self.table_id,
            "version": self.version,
            "created": self.created,
            "updated": self.updated,
            "num_rows": self.num_rows,
            "schema": self.schema.to_json(),
        }
        if self.index is not None:
            return {**d, "format_version": INDEXED_SINCE, **self.index.to_json()}
        return {**d, "chunks": [c.to_json() for c in self.chunks]}

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def loads(cls, raw: bytes, where: str) -> Manifest:
        """Parse and validate a manifest; every problem is a FormatError naming ``where``."""
        try:
            d = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{where}: manifest is not valid JSON ({e})") from None
        except RecursionError:
            raise FormatError(f"{where}: manifest JSON is nested too deeply") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise FormatError(f"{where}: not a gpuload table manifest (format != {FORMAT_NAME!r})")
        ver = d.get("format_version")
        if isinstance(ver, bool) or ver not in SUPPORTED_VERSIONS:
            raise FormatError(
                f"{where}: format version {ver!r} is not supported by this gpuload "
                f"(reads {list(SUPPORTED_VERSIONS)}); upgrade gpuload to read it"
            )
        schema = _schema(d.get("schema"), where)
        if ver < RAGGED_SINCE and any(c.is_ragged for c in schema):
            raise FormatError(
                f"{where}: format version {ver} has no ragged columns (they need {RAGGED_SINCE})"
            )
        index = IndexRoot.from_json(d, schema, where) if ver >= INDEXED_SINCE else None
        chunks: tuple[ChunkInfo, ...] = ()
        if index is None:
            chunks_json = d.get("chunks")
            if not isinstance(chunks_json, list):
                raise FormatError(f"{where}: field 'chunks' must be a list")
            chunks = _parse_chunks(chunks_json, where)
        table_id = d.get("table_id", "")
        if not isinstance(table_id, str) or not _TABLE_ID_RE.fullmatch(table_id):
            raise FormatError(f"{where}: field 'table_id' must be 1-64 lowercase hex digits")
        m = cls(
            table_id=table_id,
            version=_int(d.get("version"), "version", where, 1),
            schema=schema,
            chunks=chunks,
            created=_time(d.get("created", 0.0), "created", where),
            updated=_time(d.get("updated", 0.0), "updated", where),
            format_version=ver,
            index=index,
        )
        if "num_rows" in d and _int(d["num_rows"], "num_rows", where) != m.num_rows:
            raise FormatError(
                f"{where}: num_rows {d['num_rows']} disagrees with the chunks' rows ({m.num_rows})"
            )
        m.validate(where)
        return m

    def validate(self, where: str) -> None:
        """Check every section lies inside its chunk, inside the checksummed pages, and matches
        the schema, so no size read from the manifest can exceed the chunk it describes (for
        format 4: the root's totals; records are checked as they are read, gpuload.index)."""
        if self.num_rows >= MAX_INT:
            raise FormatError(f"{where}: {self.num_rows} rows is more than a table can hold")
        if self.index is not None:
            self.index.check(self.schema, where)
            return
        check_chunks(self.schema, self.chunks, where)

    @staticmethod
    def now() -> float:
        return time.time()


def check_chunks(schema: Schema, chunks: Sequence[ChunkInfo], where: str, first: int = 0) -> None:
    """Every chunk entry against ``schema``: listed once, sections inside the chunk and its
    checksummed pages, sized as the schema says (``first``: the number of the first chunk)."""
    files = set()
    for i, c in enumerate(chunks, first):
        here = f"{where} chunk {i} ({c.file})"
        if c.file in files:
            raise FormatError(f"{here}: the chunk is listed twice")
        files.add(c.file)
        limit = c.size
        if c.checksums is not None:
            if c.checksums.end != c.size:
                raise FormatError(
                    f"{here}: page hashes end at byte {c.checksums.end}, the chunk has {c.size}"
                )
            limit = c.checksums.covers
        extra = sorted((set(c.data) | set(c.rowhash)) - set(schema.names))
        if extra:
            raise FormatError(f"{here}: sections for unknown column(s) {extra}")
        for col in schema:
            _check_column(here, c, col, limit)


def _parse_chunks(chunks_json: list, where: str) -> tuple[ChunkInfo, ...]:
    """The chunk entries, with the cyclic garbage collector paused: a manifest of N chunks makes
    ~13 N long-lived objects, and the collector's passes over them doubled the parse time
    (benchmarks/RESULTS.md, "The manifest at a billion rows")."""
    paused = gc.isenabled()
    gc.disable()
    try:
        return tuple(
            ChunkInfo.from_json(c, f"{where} chunk {i}") for i, c in enumerate(chunks_json)
        )
    finally:
        if paused:
            gc.enable()


def _check_column(here: str, c: ChunkInfo, col, limit: int) -> None:
    sec = c.data.get(col.name)
    if sec is None:
        raise FormatError(f"{here}: no section for column {col.name!r}")
    if sec.end > limit:
        raise FormatError(
            f"{here}: column {col.name!r} section [{sec.offset}, {sec.end}) lies outside the "
            f"chunk's {limit} data bytes"
        )
    if col.is_var:
        off = c.offsets.get(col.name)
        if off is None or off.length != 8 * (c.rows + 1) or off.end > limit:
            raise FormatError(
                f"{here}: column {col.name!r} needs an offsets section of {8 * (c.rows + 1)} "
                "bytes inside the chunk"
            )
        rh = c.rowhash.get(col.name)
        if rh is not None and (rh.length != 8 * c.rows or rh.end > limit):
            raise FormatError(
                f"{here}: column {col.name!r} row hashes must be {8 * c.rows} bytes inside the "
                "checksummed pages"
            )
        if col.is_ragged and sec.length % col.item_nbytes:
            raise FormatError(
                f"{here}: ragged column {col.name!r} has {sec.length} bytes, not a whole number "
                f"of {col.item_nbytes}-byte {col.type_string()} elements"
            )
    elif sec.length != c.rows * col.row_nbytes:
        raise FormatError(
            f"{here}: column {col.name!r} has {sec.length} bytes, expected {c.rows} rows x "
            f"{col.row_nbytes}"
        )


def _schema(v: Any, where: str) -> Schema:
    if not isinstance(v, Mapping):
        raise FormatError(f"{where}: field 'schema' must be an object")
    if _depth(v) > MAX_DEPTH:
        raise FormatError(f"{where}: field 'schema' is nested deeper than {MAX_DEPTH} levels")
    try:
        return Schema.from_json(v)
    except (SchemaError, TypeError, ValueError, OverflowError) as e:
        raise FormatError(f"{where}: bad schema: {e}"[:600]) from None


def _time(v: Any, what: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise FormatError(f"{where}: field {what!r} must be a finite number, got {v!r}"[:400])
    return float(v)
