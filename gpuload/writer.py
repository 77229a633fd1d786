"""Writing tables: chunks first, then one atomic, serialisable commit.

A crashed or interrupted writer leaves the previous snapshot fully readable: its chunks are new,
uniquely named files that no manifest names until the commit, which creates the next version's
file only if no other writer created it first (gpuload.versions). An append that loses that race
rebases onto the winner's version and tries again (appends commute); a create, an overwrite or a
schema change that loses it raises CommitConflictError. A commit never reports success with
another writer's rows gone, and never deletes chunks: replaced ones stay for live readers until
``vacuum`` removes them after its grace period.

The two halves are separable, so the chunks of one version may come from many processes (the
Ray sink, ``gpuload.adapters.ray``): ``ChunkWriter`` writes chunk files and returns their
``ChunkInfo`` (plain data, ``ChunkInfo.to_json``), touching no manifest; ``start_version``
records the version a write starts from; ``TableWriter(..., base=that version)`` plus
``stage(chunks)`` commits chunks written elsewhere through the same protocol as its own.

A commit whose table would hold more than ``gpuload.index.index_threshold()`` chunks (4,096 by
default), or that appends to a table that already has one, publishes a format-4 root: its new
chunks' records go into one new index segment, written before the root (gpuload.index).
"""

from __future__ import annotations

import logging
import random
import re
import time
import uuid
from collections.abc import Iterable, Mapping

import numpy as np

from .checksums import DEFAULT_PAGE_BYTES, PageChecksums, hash_bytes, page_hashes
from .errors import CommitConflictError, FormatError, SchemaError, TableExistsError
from .format import (
    ALIGN,
    INDEXED_SINCE,
    ChunkInfo,
    Manifest,
    Section,
    check_chunks,
    version_path,
    written_version,
)
from .index import SegmentWriter, chunks_present, index_threshold
from .schema import Column, Schema
from .storage import Store
from .versions import create_version, point_to, try_read_manifest

__all__ = [
    "ChunkWriter",
    "TableWriter",
    "DEFAULT_CHUNK_BYTES",
    "MODES",
    "merge_codecs",
    "same_columns",
    "start_version",
]

log = logging.getLogger("gpuload.writer")
DEFAULT_CHUNK_BYTES = 32 << 20
MODES = ("create", "append", "overwrite")
MAX_COMMIT_TRIES = 200  # appends rebase on each lost race; each lost race means another's win
_PAD = bytes(ALIGN)
_PREFIX_RE = re.compile(r"[0-9a-f]{0,16}")
_UNREAD = object()  # TableWriter(base=...) not given: read the latest version


def start_version(store: Store, mode: str, label: str) -> Manifest | None:
    """The latest version a write in ``mode`` starts from (None: no table yet). A create of a
    table that exists raises TableExistsError here, before anything is written."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    base = try_read_manifest(store)
    _refuse_existing(mode, base, label)
    return base


def _refuse_existing(mode: str, base: Manifest | None, label: str) -> None:
    if mode == "create" and base is not None:
        raise TableExistsError(
            f"table {label!r} already exists (version {base.version}); "
            "use mode='append' or mode='overwrite'"
        )


class ChunkWriter:
    """Writes validated column batches as new chunk files, cut at row boundaries once they reach
    ``chunk_bytes``. The files are invisible to readers until a commit names them; this class
    knows no manifest. ``name_prefix`` (up to 16 hex digits) starts every chunk's random name,
    so the chunks of one distributed write can be found by name (the rest is random)."""

    def __init__(
        self,
        store: Store,
        schema: Schema,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        label: str | None = None,
        name_prefix: str = "",
    ) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        if not _PREFIX_RE.fullmatch(name_prefix):
            raise ValueError(f"name_prefix must be 0-16 lowercase hex digits, got {name_prefix!r}")
        self.store = store
        self.schema = schema
        self.label = label or store.url
        self.chunk_bytes = int(chunk_bytes)
        self.name_prefix = name_prefix
        self.chunks: list[ChunkInfo] = []  # written so far, in row order
        self.rows_written = 0
        self._reset_buffers()

    def _reset_buffers(self) -> None:
        self._parts: dict[str, list] = {c.name: [] for c in self.schema}
        self._lens: dict[str, list] = {c.name: [] for c in self.schema if c.is_var}
        self._buffered_rows = 0
        self._buffered_bytes = 0

    # -- writing ---------------------------------------------------------------------------
    def write(self, batch: Mapping[str, object], n: int) -> None:
        """Append ``n`` rows given as validated column values (list of bytes or numpy array).
        Chunks are cut at row boundaries as soon as they reach ``chunk_bytes``."""
        if n == 0:
            return
        row_bytes = np.zeros(n, dtype=np.int64)
        lens = {}
        for col in self.schema:
            if col.is_var:
                lens[col.name] = np.fromiter(
                    (len(x) for x in batch[col.name]), dtype=np.int64, count=n
                )
                row_bytes += lens[col.name]
            else:
                row_bytes += col.row_nbytes
        cum = np.cumsum(row_bytes)
        lo = 0
        while lo < n:
            base = int(cum[lo - 1]) if lo else 0
            room = self.chunk_bytes - self._buffered_bytes
            # first row index at which the chunk reaches its target size
            cut = int(np.searchsorted(cum, base + room, side="left")) + 1
            hi = min(n, max(cut, lo + 1))
            for col in self.schema:
                v = batch[col.name]
                if col.is_var:
                    self._parts[col.name].extend(v[lo:hi])
                    self._lens[col.name].append(lens[col.name][lo:hi])
                else:
                    self._parts[col.name].append(np.ascontiguousarray(v[lo:hi], dtype=col.np_dtype))
            self._buffered_bytes += int(cum[hi - 1]) - base
            self._buffered_rows += hi - lo
            if self._buffered_bytes >= self.chunk_bytes:
                self.flush()
            lo = hi

    def flush(self) -> None:
        """Write the buffered rows as one chunk file (not yet visible to readers)."""
        if self._buffered_rows == 0:
            return
        rows = self._buffered_rows
        parts: list = []
        pos = 0
        data: dict[str, Section] = {}
        offsets: dict[str, Section] = {}
        rowhash: dict[str, Section] = {}

        def add(buf) -> Section:
            nonlocal pos
            pad = (-pos) % ALIGN
            if pad:
                parts.append(_PAD[:pad])
                pos += pad
            mv = memoryview(buf).cast("B")
            parts.append(mv)
            sec = Section(pos, len(mv))
            pos += len(mv)
            return sec

        for col in self.schema:
            if col.is_var:
                lens = (
                    np.concatenate(self._lens[col.name])
                    if self._lens[col.name]
                    else np.zeros(0, np.int64)
                )
                offs = np.zeros(rows + 1, dtype="<i8")
                np.cumsum(lens, out=offs[1:])
                values = self._parts[col.name]
                data[col.name] = add(b"".join(values))
                offsets[col.name] = add(offs.tobytes())
                hashes = np.fromiter(map(hash_bytes, values), dtype="<u8", count=rows)
                rowhash[col.name] = add(hashes.tobytes())
            else:
                arr = (
                    np.concatenate(self._parts[col.name])
                    if self._parts[col.name]
                    else np.zeros(0, col.np_dtype)
                )
                data[col.name] = add(arr.tobytes())
        covers = pos + (-pos) % ALIGN
        if covers > pos:
            parts.append(_PAD[: covers - pos])
        hashes = page_hashes(parts, DEFAULT_PAGE_BYTES).tobytes()
        sums = PageChecksums(DEFAULT_PAGE_BYTES, covers, hash_bytes(hashes))
        parts.append(hashes)
        name = f"chunks/{self.name_prefix}{uuid.uuid4().hex[len(self.name_prefix) :]}.chunk"
        size = self.store.write_new(name, parts)
        self.chunks.append(ChunkInfo(name, rows, size, data, offsets, sums, rowhash))
        self.rows_written += rows
        self._reset_buffers()

    def discard(self) -> None:
        """Delete the chunk files written so far (best effort: one that cannot be removed is
        logged and left for ``vacuum``) and drop the buffered rows."""
        for c in self.chunks:
            try:
                self.store.remove(c.file)
            except OSError as e:
                log.warning(
                    "could not remove uncommitted chunk %s of %s: %s", c.file, self.label, e
                )
        self.chunks.clear()
        self._reset_buffers()


class TableWriter:
    """Buffers validated column batches into chunks and commits them, with any chunks staged from
    other processes, as one new version on top of ``base``."""

    def __init__(
        self,
        store: Store,
        schema: Schema,
        mode: str = "create",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        label: str | None = None,
        *,
        base: Manifest | None | object = _UNREAD,
    ) -> None:
        """``base``: the version this write started from (``start_version``; None for no
        table); read now when not given."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.store = store
        self.label = label or store.url
        self.mode = mode
        self._chunks = ChunkWriter(store, schema, chunk_bytes, self.label)
        if base is _UNREAD:
            base = start_version(store, mode, self.label)
        _refuse_existing(mode, base, self.label)  # type: ignore[arg-type]
        self.base: Manifest | None = base  # type: ignore[assignment]
        if mode == "append" and self.base is not None:
            _check_same_schema(self.base.schema, schema, self.label)
            schema = _merge_codecs(self.base.schema, schema)
        self.schema = self._chunks.schema = schema
        self._staged: list[ChunkInfo] = []  # written elsewhere, committed with this writer's
        self._segments: SegmentWriter | None = None  # the index side of a format-4 commit
        self._clean_segments: set[str] = set()  # base segments naming none of the staged chunks
        self._theirs: set[str] = set()  # staged chunks a base version names: never removed
        self._published = False  # a version naming this writer's chunks exists
        self._keep_chunks = False  # whether one exists is unknown
        self._closed = False
        store.makedirs()

    @property
    def chunk_bytes(self) -> int:
        return self._chunks.chunk_bytes

    @property
    def rows_written(self) -> int:
        """Rows in the chunks this writer wrote and staged."""
        return self._chunks.rows_written + sum(c.rows for c in self._staged)

    @property
    def _new_chunks(self) -> list[ChunkInfo]:
        """Every chunk this commit publishes, in row order: staged ones, then its own."""
        return [*self._staged, *self._chunks.chunks]

    @property
    def may_have_published(self) -> bool:
        """True once a version naming these chunks exists or may exist: then nothing of this
        write may be deleted."""
        return self._published or self._keep_chunks

    def write(self, batch: Mapping[str, object], n: int) -> None:
        """Append ``n`` rows given as validated column values (list of bytes or numpy array).
        Chunks are cut at row boundaries as soon as they reach ``chunk_bytes``."""
        if self._closed:
            raise RuntimeError("writer is closed")
        self._chunks.write(batch, n)

    def flush(self) -> None:
        """Write the buffered rows as one chunk file (not yet visible to readers)."""
        self._chunks.flush()

    def stage(self, chunks: Iterable[ChunkInfo]) -> None:
        """Add chunks written into this table's store by other processes (``ChunkWriter``) to
        this commit, in order. Their sections are validated against the schema at commit; from
        here on they are this writer's: ``abort`` and a conflicting commit remove them."""
        if self._closed:
            raise RuntimeError("writer is closed")
        self._staged.extend(chunks)

    # -- commit ----------------------------------------------------------------------------
    def commit(self, schema: Schema | None = None, metadata: Mapping | None = None) -> Manifest:
        """Publish all written rows as a new version in one atomic step. ``schema`` may refine
        the writer's schema (e.g. image codecs observed while writing); its columns must match."""
        self.flush()
        if schema is not None:
            if _layout(schema) != _layout(self.schema):
                raise SchemaError(
                    f"commit of {self.label!r}: the schema's columns changed while writing"
                )
            self.schema = schema
        self._check_chunks_exist()
        base = self.base
        for attempt in range(MAX_COMMIT_TRIES):
            manifest = self._manifest_on(base, metadata)
            if self._publish(manifest):
                self._tidy_segments(manifest)
                return manifest
            latest = try_read_manifest(self.store)
            self._check_rebase(base, latest)
            base = latest
            time.sleep(random.uniform(0, min(0.2, 0.002 * (attempt + 1))))
        self.abort()
        raise CommitConflictError(
            f"table {self.label!r}: lost the commit race {MAX_COMMIT_TRIES} times in a row to "
            "other writers; nothing of this write was committed; retry it"
        )

    def _publish(self, manifest: Manifest) -> bool:
        """Create the version; from the moment it exists this writer's chunks are the table's
        and are never removed (not by abort, not by Ctrl-C during the pointer update)."""
        try:
            won = create_version(self.store, manifest)
        except CommitConflictError:
            raise  # a definite answer: the version is someone else's
        except BaseException as e:  # noqa: BLE001 - resolved below, then re-raised if unknown
            won = self._after_unknown(manifest, e)
        if won:
            self._published = self._closed = True
            point_to(self.store, manifest)
        return won

    def _after_unknown(self, manifest: Manifest, err: BaseException) -> bool:
        """A create that raised may still have landed (a PUT whose answer was lost): look. Until
        that is known the chunks are kept (vacuum removes them if nothing names them)."""
        self._keep_chunks = True
        if not isinstance(err, Exception):
            raise err  # Ctrl-C: do not wait on storage now
        rel = version_path(manifest.version)
        try:
            there = self.store.read_bytes(rel)
        except FileNotFoundError:
            self._keep_chunks = False  # it did not land: the chunks are ours to remove
            raise err from None
        except Exception:  # noqa: BLE001 - still unknown: keep the chunks, report the first error
            log.warning(
                "the commit of version %d of %s may or may not have landed; its chunks are kept",
                manifest.version,
                self.label,
            )
            raise err from None
        self._keep_chunks = False
        return there == manifest.dumps()

    def _check_chunks_exist(self) -> None:
        """A vacuum with a grace period shorter than this write may have removed chunks that no
        manifest named yet: never publish a manifest naming a missing chunk."""
        if not self._new_chunks:
            return
        have = {f"chunks/{n}" for n, _, _ in self.store.list_files("chunks")}
        missing = [c.file for c in self._new_chunks if c.file not in have]
        if missing:
            self.abort()
            raise CommitConflictError(
                f"table {self.label!r}: {len(missing)} chunk(s) written by this commit "
                f"disappeared before it (first: {missing[0]}; was `gpuload vacuum` run with "
                "a grace period shorter than this ingest?); nothing was committed; retry it"
            )

    def _check_rebase(self, base: Manifest | None, latest: Manifest | None) -> None:
        """After a lost race: an append moves onto the winner's version when the columns still
        match; anything else (create, overwrite, a changed schema) conflicts."""
        before = base.version if base else 0
        now = latest.version if latest else 0
        reason = None
        if self.mode != "append":
            reason = f"this {self.mode} started from version {before}"
        elif latest is None:
            reason = "the table was deleted meanwhile"
        elif _layout(latest.schema) != _layout(self.schema):
            reason = f"its columns changed to {latest.schema.describe()}"
        if reason is not None:
            self.abort()
            raise CommitConflictError(
                f"table {self.label!r} changed while writing (version {before} -> {now}; "
                f"{reason}); nothing of this write was committed; retry it"
            )
        log.debug("append to %s rebased from version %d onto %d", self.label, before, now)

    def _manifest_on(self, base: Manifest | None, metadata: Mapping | None) -> Manifest:
        """The manifest this write commits on top of ``base`` (the latest version it knows):
        a JSON chunk list, or a format-4 root once the table passes the index threshold (its
        segments are written here, before anything is published)."""
        append = base is not None and self.mode == "append"
        schema = _merge_codecs(base.schema, self.schema) if append else self.schema
        meta = {**(base.schema.metadata if append else {}), **(metadata or {})}
        if meta:
            schema = Schema(schema.columns, {**schema.metadata, **meta})
        now = time.time()
        common = {
            "table_id": base.table_id if append else uuid.uuid4().hex,
            "version": (base.version if base else 0) + 1,
            "schema": schema,
            "created": base.created if append else now,
            "updated": now,
        }
        new = self._new_chunks
        on = base if append else None
        if _writes_index(on, len(new)):
            segments = self._segment_writer(schema, new)  # checks the new chunks first
            self._refuse_known(on)
            root = segments.root_on(on)
            manifest = Manifest(chunks=(), format_version=INDEXED_SINCE, index=root, **common)
        else:
            self._refuse_known(on)
            chunks = (tuple(base.chunks) if append else ()) + tuple(new)  # type: ignore[union-attr]
            manifest = Manifest(chunks=chunks, format_version=written_version(schema), **common)
        manifest.validate(f"new manifest of {self.label!r}")
        return manifest

    def _segment_writer(self, schema: Schema, new: list[ChunkInfo]) -> SegmentWriter:
        """The index side of this commit, made once: the new chunks checked against the schema
        and turned into records."""
        if self._segments is None:
            check_chunks(schema, new, f"new chunks of {self.label!r}")
            self._segments = SegmentWriter(self.store, schema, self.label, new)
        return self._segments

    def _refuse_known(self, base: Manifest | None) -> None:
        """Staged chunks that ``base`` (what this commit appends to) names already would repeat
        its rows: a FormatError, and ``abort`` leaves them (they are the table's). This
        writer's own chunks have new random names (created exclusively where the store can)
        and are not looked up; a format-4 base is read a block of records at a time, each of
        its segments once per writer."""
        if base is None or not self._staged:
            return
        files = [c.file for c in self._staged]
        if base.index is None:
            staged = set(files)
            known = {c.file: i for i, c in enumerate(base.chunks) if c.file in staged}
        else:
            known = chunks_present(self.store, base, self.label, files, self._clean_segments)
        if not known:
            return
        self._theirs.update(known)
        file, chunk = next(iter(known.items()))
        raise FormatError(
            f"commit of {self.label!r}: staged chunk {file} is listed twice: version "
            f"{base.version} of the table already has it as chunk {chunk} ({len(known)} of "
            f"the {len(files)} staged chunks are already in the table and are left in place); "
            "nothing was committed"
        )

    def _tidy_segments(self, manifest: Manifest) -> None:
        """After a commit: remove the segments this writer wrote for attempts that lost."""
        if self._segments is not None:
            named = {s.file for s in manifest.index.segments} if manifest.index else set()
            self._segments.discard(keep=named)

    def abort(self) -> None:
        """Delete the chunks this writer wrote or staged; the committed table is untouched.
        Chunks of a version this writer published, or may have published, are never deleted."""
        if not self.may_have_published:
            self._chunks.chunks[:0] = [c for c in self._staged if c.file not in self._theirs]
            self._chunks.discard()
            if self._segments is not None:
                self._segments.discard()
        self._chunks.chunks.clear()
        self._chunks._reset_buffers()
        self._staged.clear()
        self._closed = True


def _writes_index(base: Manifest | None, new_chunks: int) -> bool:
    """Whether a commit of ``new_chunks`` on top of ``base`` (None: a new table) publishes a
    format-4 root: the base has one already, or the table would pass the threshold."""
    if base is not None and base.is_indexed:
        return True
    return (base.num_chunks if base else 0) + new_chunks > index_threshold()


def _layout(schema: Schema) -> list[tuple]:
    """What must match for rows to be appended: names, kinds, dtypes and shapes, in order."""
    return [(c.name, c.kind, c.dtype, c.shape) for c in schema]


def _check_same_schema(existing: Schema, new: Schema, label: str) -> None:
    old_names, new_names = existing.names, new.names
    missing = [n for n in old_names if n not in new_names]
    extra = [n for n in new_names if n not in old_names]
    if missing or extra:
        parts = []
        if extra:
            parts.append(f"unknown column(s) {extra}")
        if missing:
            parts.append(f"missing column(s) {missing}")
        raise SchemaError(
            f"appending to table {label!r}: {'; '.join(parts)}; the table has {old_names}"
        )
    for c in existing:
        n = new[c.name]
        if (c.kind, c.dtype, c.shape) != (n.kind, n.dtype, n.shape):
            raise SchemaError(
                f"appending to table {label!r}: column {c.name!r} is {c.type_string()}, "
                f"the new data is {n.type_string()}"
            )


def _merge_codecs(existing: Schema, new: Schema) -> Schema:
    cols: list[Column] = []
    for c in existing:
        n = new[c.name]
        codec = c.codec
        if c.kind == "image" and n.codec != c.codec:
            codec = "mixed" if (c.codec and n.codec) else (c.codec or n.codec)
        cols.append(Column(c.name, c.kind, c.dtype, c.shape, codec, c.metadata))
    return Schema(tuple(cols), existing.metadata)


def same_columns(a: Schema, b: Schema) -> bool:
    """Whether rows of schema ``b`` may be committed into a table of schema ``a``: the same
    names, kinds, dtypes and shapes, in order (image codecs and metadata aside)."""
    return _layout(a) == _layout(b)


def merge_codecs(existing: Schema, new: Schema) -> Schema:
    """``existing`` with each image column's codec widened by ``new``'s ("mixed" when they
    differ); both must have the same columns."""
    return _merge_codecs(existing, new)
