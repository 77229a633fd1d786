"""The on-disk format (see docs/FORMAT.md): manifest JSON + immutable chunk files.

A chunk holds, for each column, one section (64-byte aligned): fixed-shape columns as raw
little-endian arrays; variable-length columns (image, bytes, text, ragged) as concatenated bytes
plus an int64 offsets section, so any row's bytes are one byte range. Since format 2 every chunk
ends with the hashes of its pages (gpuload.checksums), so every read can be verified. Format 3
is format 2 plus ragged columns: only a manifest whose schema has one is written as format 3,
so readers that know format 2 keep reading every other table.

A manifest is validated completely when it is parsed: every field's type and range, the nesting
depth of metadata, and every section against its chunk. A malformed manifest is one
``FormatError`` naming the manifest and the field, never a raw ValueError or TypeError.
"""

from __future__ import annotations

import gc
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .checksums import PageChecksums
from .errors import FormatError, SchemaError
from .schema import Schema
from .storage import check_relpath

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ChunkInfo",
    "Manifest",
    "Section",
    "ALIGN",
    "MAX_INT",
    "version_path",
]

FORMAT_NAME = "gpuload-table"
FORMAT_VERSION = 3  # the newest this gpuload writes (for schemas that need it: written_version)
SUPPORTED_VERSIONS = (1, 2, 3)
RAGGED_SINCE = 3  # the first format with ragged columns
ALIGN = 64
MANIFEST = "manifest.json"
CHUNK_RE = re.compile(r"chunks/[0-9a-f]{32}\.chunk")
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


@dataclass(frozen=True)
class Manifest:
    """One committed snapshot of a table."""

    table_id: str
    version: int
    schema: Schema
    chunks: tuple[ChunkInfo, ...]
    created: float = 0.0
    updated: float = 0.0
    format_version: int = 2  # as read; a manifest is written as written_version(schema)

    @property
    def num_rows(self) -> int:
        return sum(c.rows for c in self.chunks)

    @property
    def nbytes(self) -> int:
        return sum(c.size for c in self.chunks)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": written_version(self.schema),
            "table_id": self.table_id,
            "version": self.version,
            "created": self.created,
            "updated": self.updated,
            "num_rows": self.num_rows,
            "schema": self.schema.to_json(),
            "chunks": [c.to_json() for c in self.chunks],
        }

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
        )
        if "num_rows" in d and _int(d["num_rows"], "num_rows", where) != m.num_rows:
            raise FormatError(
                f"{where}: num_rows {d['num_rows']} disagrees with the chunks' rows ({m.num_rows})"
            )
        m.validate(where)
        return m

    def validate(self, where: str) -> None:
        """Check every section lies inside its chunk, inside the checksummed pages, and matches
        the schema, so no size read from the manifest can exceed the chunk it describes."""
        if self.num_rows >= MAX_INT:
            raise FormatError(f"{where}: {self.num_rows} rows is more than a table can hold")
        files = set()
        for i, c in enumerate(self.chunks):
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
            extra = sorted((set(c.data) | set(c.rowhash)) - set(self.schema.names))
            if extra:
                raise FormatError(f"{here}: sections for unknown column(s) {extra}")
            for col in self.schema:
                _check_column(here, c, col, limit)

    @staticmethod
    def now() -> float:
        return time.time()


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
