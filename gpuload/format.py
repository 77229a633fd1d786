"""The on-disk format (see docs/FORMAT.md): manifest JSON + immutable chunk files.

A chunk holds, for each column, one section (64-byte aligned): fixed-shape columns as raw
little-endian arrays; variable-length columns as concatenated bytes plus an int64 offsets
section, so any row's bytes are one byte range.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import FormatError, SchemaError
from .schema import Schema
from .storage import check_relpath

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "ChunkInfo", "Manifest", "Section", "ALIGN"]

FORMAT_NAME = "gpuload-table"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
ALIGN = 64
MANIFEST = "manifest.json"
CHUNK_RE = re.compile(r"^chunks/[0-9a-f]{32}\.chunk$")


@dataclass(frozen=True)
class Section:
    """A byte range [offset, offset + length) inside a chunk file."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class ChunkInfo:
    """One immutable chunk: its file, row count, size, and per-column sections."""

    file: str
    rows: int
    size: int
    data: Mapping[str, Section]
    offsets: Mapping[str, Section] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        cols: dict[str, Any] = {}
        for name, sec in self.data.items():
            entry: dict[str, Any] = {"data": [sec.offset, sec.length]}
            if name in self.offsets:
                o = self.offsets[name]
                entry["offsets"] = [o.offset, o.length]
            cols[name] = entry
        return {"file": self.file, "rows": self.rows, "size": self.size, "columns": cols}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str) -> ChunkInfo:
        try:
            file = d["file"]
            rows = int(d["rows"])
            size = int(d["size"])
            cols = d["columns"]
            data = {k: Section(int(v["data"][0]), int(v["data"][1])) for k, v in cols.items()}
            offsets = {
                k: Section(int(v["offsets"][0]), int(v["offsets"][1]))
                for k, v in cols.items()
                if "offsets" in v
            }
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise FormatError(f"{where}: malformed chunk entry ({e!r})") from None
        if not isinstance(file, str) or not CHUNK_RE.match(file):
            raise FormatError(f"{where}: chunk path {file!r} is not a chunk file inside the table")
        check_relpath(file)
        return cls(file, rows, size, data, offsets)


@dataclass(frozen=True)
class Manifest:
    """One committed snapshot of a table."""

    table_id: str
    version: int
    schema: Schema
    chunks: tuple[ChunkInfo, ...]
    created: float = 0.0
    updated: float = 0.0

    @property
    def num_rows(self) -> int:
        return sum(c.rows for c in self.chunks)

    @property
    def nbytes(self) -> int:
        return sum(c.size for c in self.chunks)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
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
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise FormatError(f"{where}: not a gpuload table manifest (format != {FORMAT_NAME!r})")
        ver = d.get("format_version")
        if ver not in SUPPORTED_VERSIONS:
            raise FormatError(
                f"{where}: format version {ver!r} is not supported by this gpuload "
                f"(reads {list(SUPPORTED_VERSIONS)}); upgrade gpuload to read it"
            )
        try:
            schema = Schema.from_json(d["schema"])
        except (KeyError, SchemaError) as e:
            raise FormatError(f"{where}: bad schema: {e}") from None
        if not isinstance(d.get("chunks"), list):
            raise FormatError(f"{where}: 'chunks' must be a list")
        chunks = tuple(
            ChunkInfo.from_json(c, f"{where} chunk {i}") for i, c in enumerate(d["chunks"])
        )
        m = cls(
            table_id=str(d.get("table_id", "")),
            version=int(d.get("version", 0)),
            schema=schema,
            chunks=chunks,
            created=float(d.get("created", 0.0)),
            updated=float(d.get("updated", 0.0)),
        )
        if "num_rows" in d and int(d["num_rows"]) != m.num_rows:
            raise FormatError(
                f"{where}: num_rows {d['num_rows']} disagrees with the chunks' rows ({m.num_rows})"
            )
        m.validate(where)
        return m

    def validate(self, where: str) -> None:
        """Check every section lies inside its chunk and matches the schema."""
        for i, c in enumerate(self.chunks):
            if c.rows < 0 or c.size < 0:
                raise FormatError(f"{where} chunk {i} ({c.file}): negative rows or size")
            for col in self.schema:
                sec = c.data.get(col.name)
                if sec is None:
                    raise FormatError(
                        f"{where} chunk {i} ({c.file}): no section for column {col.name!r}"
                    )
                if sec.offset < 0 or sec.length < 0 or sec.end > c.size:
                    raise FormatError(
                        f"{where} chunk {i} ({c.file}): column {col.name!r} section "
                        f"[{sec.offset}, {sec.end}) lies outside the chunk's {c.size} bytes"
                    )
                if col.is_var:
                    off = c.offsets.get(col.name)
                    if (
                        off is None
                        or off.length != 8 * (c.rows + 1)
                        or off.offset < 0
                        or off.end > c.size
                    ):
                        raise FormatError(
                            f"{where} chunk {i} ({c.file}): column {col.name!r} needs an offsets "
                            f"section of {8 * (c.rows + 1)} bytes inside the chunk"
                        )
                elif sec.length != c.rows * col.row_nbytes:
                    raise FormatError(
                        f"{where} chunk {i} ({c.file}): column {col.name!r} has {sec.length} bytes, "
                        f"expected {c.rows} rows x {col.row_nbytes}"
                    )

    @staticmethod
    def now() -> float:
        return time.time()
