"""The bytes of format-4 index segments: chunk records to and from ChunkInfo, whole segment
files, and the vectorised checks every record passes before anything is sized from it.

Pure functions of bytes and schemas (no I/O): ``gpuload.index`` reads and writes the files.
The layout is ``gpuload.format.SegmentLayout``; docs/FORMAT.md, "Format 4", is the spec."""

from __future__ import annotations

import gc
import struct
from collections.abc import Callable, Sequence

import numpy as np

from .checksums import PageChecksums, hash_bytes, page_hashes
from .errors import FormatError
from .format import (
    INDEXED_SINCE,
    MAX_INT,
    SEGMENT_HEADER,
    SEGMENT_MAGIC,
    ChunkInfo,
    Section,
    SegmentLayout,
    record_dtype,
    record_field,
)
from .schema import Schema

__all__ = [
    "ABSENT",
    "chunk_from_record",
    "chunk_id",
    "chunk_names",
    "check_header",
    "check_records",
    "encode_segment",
    "records_from_chunks",
]

ABSENT = (-1, 0)  # a section a chunk does not have (a row-hash section written before them)
_ID_PREFIX, _ID_SUFFIX = "chunks/", ".chunk"


def chunk_id(file: str) -> bytes:
    """The 16 bytes a chunk file's 32-hex name encodes (``chunks/<32 hex>.chunk``)."""
    return bytes.fromhex(file[len(_ID_PREFIX) : -len(_ID_SUFFIX)])


def chunk_names(ids: np.ndarray) -> list[str]:
    """Chunk file names from an (n, 16) uint8 array of ids."""
    h = np.ascontiguousarray(ids).tobytes().hex()
    return [f"{_ID_PREFIX}{h[i : i + 32]}{_ID_SUFFIX}" for i in range(0, len(h), 32)]


def records_from_chunks(
    chunks: Sequence[ChunkInfo], schema: Schema
) -> tuple[np.ndarray, np.ndarray]:
    """The ``rows`` (int64) and ``records`` of chunk entries already validated against
    ``schema`` (``gpuload.format.check_chunks``): every field after the id gathered as one list
    of ints per chunk and converted once (the collector paused: a list of N tuples is made)."""
    dt = record_dtype(schema)
    n = len(chunks)
    rows = np.fromiter((c.rows for c in chunks), np.int64, n)
    recs = np.zeros(n, dt)
    if not n:
        return rows, recs
    cols = [(c.name, c.is_var) for c in schema]
    paused = gc.isenabled()
    gc.disable()
    try:
        flat = np.array([_flat(c, cols) for c in chunks], dtype=np.int64)
        ids = b"".join(chunk_id(c.file) for c in chunks)
    finally:
        if paused:
            gc.enable()
    recs["id"] = np.frombuffer(ids, np.uint8).reshape(n, 16)
    recs.view(np.uint8).reshape(n, dt.itemsize)[:, 16:] = flat.view(np.uint8).reshape(n, -1)
    return rows, recs


def _flat(c: ChunkInfo, cols: list[tuple[str, bool]]) -> list[int]:
    """A record's fields after the id, as int64 values (the digest's bits as a signed int)."""
    s = c.checksums
    digest = (s.digest - (1 << 64) if s.digest >= 1 << 63 else s.digest) if s else 0
    out = [c.size, s.page, s.covers, digest] if s else [c.size, 0, 0, 0]
    for name, var in cols:
        d = c.data[name]
        out += (d.offset, d.length)
        if var:
            o, h = c.offsets[name], c.rowhash.get(name)
            out += (o.offset, o.length, *((h.offset, h.length) if h is not None else ABSENT))
    return out


def chunk_from_record(rec: np.void, rows: int, name: str, schema: Schema) -> ChunkInfo:
    """One (checked) record as the ChunkInfo a JSON manifest would have held."""
    data, offsets, rowhash = {}, {}, {}
    for i, col in enumerate(schema):
        data[col.name] = Section(*map(int, rec[record_field(i, "data")]))
        if col.is_var:
            offsets[col.name] = Section(*map(int, rec[record_field(i, "offsets")]))
            h = rec[record_field(i, "rowhash")]
            if int(h[0]) >= 0:
                rowhash[col.name] = Section(int(h[0]), int(h[1]))
    page = int(rec["page"])
    sums = PageChecksums(page, int(rec["covers"]), int(rec["digest"])) if page else None
    return ChunkInfo(name, int(rows), int(rec["size"]), data, offsets, sums, rowhash)


def encode_segment(
    rows: np.ndarray, records: np.ndarray, page: int
) -> tuple[list, SegmentLayout, PageChecksums]:
    """A segment file's bytes (as parts to write) for these rows and records, its layout and
    its page checksums (for the root)."""
    lay = SegmentLayout(len(rows), records.dtype.itemsize, page)
    body = bytearray(lay.covers)
    body[:SEGMENT_HEADER] = lay.header()
    body[lay.rows_offset : lay.rows_end] = np.ascontiguousarray(rows, "<i8").tobytes()
    body[lay.records_offset : lay.records_end] = np.ascontiguousarray(records).tobytes()
    hashes = page_hashes([body], page).tobytes()
    return [body, hashes], lay, PageChecksums(page, lay.covers, hash_bytes(hashes))


def check_header(raw: bytes, lay: SegmentLayout, where: str) -> None:
    """A segment's 64 header bytes must be exactly what its root entry implies."""
    if bytes(raw) != lay.header():
        magic = bytes(raw[:16]) == SEGMENT_MAGIC
        fields = struct.unpack("<6Q", bytes(raw[16:64])) if len(raw) == SEGMENT_HEADER else ()
        raise FormatError(
            f"{where}: the header does not match the root ("
            + (f"header says {fields}, " if magic else "not a gpuload index segment, ")
            + f"expected version {INDEXED_SINCE}, {lay.chunks} chunks of {lay.record_nbytes} "
            "bytes)"
        )


def check_records(
    recs: np.ndarray, rows: np.ndarray, schema: Schema, where: Callable[[int], str]
) -> None:
    """Every value of these records (chunks with ``rows`` rows each) in range, with vectorised
    checks: sizes and sections non-negative and below 2^50, page hashes ending at the chunk's
    size, every section inside the chunk's checksummed bytes and sized as the schema says, ids
    distinct. The first bad record raises one FormatError (``where(k)`` names record k)."""
    size, page, covers = recs["size"], recs["page"], recs["covers"]
    rows = np.asarray(rows, np.int64)
    _fail(rows <= 0, lambda k: f"has {rows[k]} rows; every chunk has at least one", where)
    _fail((size < 0) | (size >= MAX_INT), lambda k: f"size {size[k]} is out of range", where)
    pow2 = (page & (page - 1)) == 0
    bad_page = (page != 0) & ((page < 4096) | (page > 16 << 20) | ~pow2)
    _fail(
        bad_page, lambda k: f"page size {page[k]} is not a power of two in [4 KiB, 16 MiB]", where
    )
    has = page > 0
    safe_page = np.where(has, page, 1)
    end = covers + 8 * (-(-covers // safe_page))
    unsummed = ~has & ((covers != 0) | (recs["digest"] != 0))
    _fail(unsummed, lambda k: "has a digest but no page size", where)
    bad_sums = has & ((covers < 0) | (covers >= MAX_INT) | (end != size))
    _fail(bad_sums, lambda k: f"page hashes end at byte {end[k]}, the chunk has {size[k]}", where)
    limit = np.where(has, covers, size)
    for i, col in enumerate(schema):
        _check_sections(recs, rows, limit, has, i, col, where)
    _check_ids(recs["id"], where)


def _check_sections(recs, rows, limit, has, i, col, where) -> None:
    """The sections of column ``col`` (at schema position ``i``) in every record."""
    name = col.name

    def inside(part: str) -> tuple[np.ndarray, np.ndarray]:
        sec = recs[record_field(i, part)]
        off, ln = sec[:, 0], sec[:, 1]
        bad = (off < 0) | (ln < 0) | (off >= MAX_INT) | (ln >= MAX_INT) | (off + ln > limit)
        _fail(
            bad,
            lambda k: (
                f"column {name!r} {part} section [{off[k]}, {off[k] + ln[k]}) lies "
                f"outside the chunk's {limit[k]} data bytes"
            ),
            where,
        )
        return off, ln

    _, ln = inside("data")
    if not col.is_var:
        rb = col.row_nbytes
        bad = (ln % rb != 0) | (ln // rb != rows)
        _fail(
            bad,
            lambda k: f"column {name!r} has {ln[k]} bytes, expected {rows[k]} rows x {rb}",
            where,
        )
        return
    if col.is_ragged:
        e = col.item_nbytes
        _fail(
            ln % e != 0,
            lambda k: (
                f"ragged column {name!r} has {ln[k]} bytes, not a whole number of {e}-byte elements"
            ),
            where,
        )
    _, oln = inside("offsets")
    _fail(
        oln != 8 * (rows + 1),
        lambda k: f"column {name!r} needs an offsets section of {8 * (rows[k] + 1)} bytes",
        where,
    )
    h = recs[record_field(i, "rowhash")]
    absent = (h[:, 0] == ABSENT[0]) & (h[:, 1] == ABSENT[1])
    present = ~absent
    if present.any():
        sub = recs[present]
        _check_rowhash(
            sub,
            rows[present],
            limit[present],
            has[present],
            i,
            name,
            lambda k: where(int(np.flatnonzero(present)[k])),
        )


def _check_rowhash(recs, rows, limit, has, i, name, where) -> None:
    """Present row-hash sections: ``8 x rows`` bytes inside the checksummed pages (offset and
    length bounded first, so their int64 sum cannot wrap)."""
    h = recs[record_field(i, "rowhash")]
    off, ln = h[:, 0], h[:, 1]
    out_of_range = (off < 0) | (ln < 0) | (off >= MAX_INT) | (ln >= MAX_INT)
    bad = ~has | out_of_range | (ln != 8 * rows) | (off + ln > limit)
    _fail(
        bad,
        lambda k: (
            f"column {name!r} row hashes must be {8 * rows[k]} bytes inside the checksummed pages"
        ),
        where,
    )


def _check_ids(ids: np.ndarray, where) -> None:
    """No chunk file named twice among these records."""
    if len(ids) < 2:
        return
    halves = np.ascontiguousarray(ids).view("<u8").reshape(-1, 2)
    order = np.lexsort((halves[:, 1], halves[:, 0]))
    s = halves[order]
    dup = np.flatnonzero((s[1:] == s[:-1]).all(axis=1))
    if dup.size:
        k = int(order[dup[0] + 1])
        raise FormatError(f"{where(k)}: the chunk is listed twice")


def _fail(mask: np.ndarray, what: Callable[[int], str], where: Callable[[int], str]) -> None:
    """Raise for the first record where ``mask`` holds."""
    if mask.any():
        k = int(np.argmax(mask))
        raise FormatError(f"{where(k)}: {what(k)}")
