"""Vacuum: delete files of a table that no live snapshot needs.

Two kinds of chunk files are unnamed by the current manifest: those a killed writer left (no
manifest ever named them) and those an overwrite replaced (older versions name them, and a
reader that opened one of those versions still reads them). ``vacuum`` removes both once they
are older than a grace period: an unnamed file by its modification time, a replaced chunk by the
time the version that dropped it was committed. The grace period is what keeps a writer that is
still running (its chunks are unnamed until it commits) and a reader of an older snapshot safe,
so it must exceed the longest ingest and the longest epoch; the default is 24 hours, as
object-store "remove orphan files" jobs do. A writer also checks, just before its commit, that
all of its chunks still exist, so a too-short grace period fails that ingest loudly instead of
committing a manifest that names a deleted chunk.

Format-4 tables have index segments (``index/<32 hex>.idx``) too: a segment is named by the
versions whose roots list it, and it goes by the same rules as a chunk (unnamed: by its age;
replaced, by a merge or an overwrite: once the version that dropped it is past the grace
period). The chunks a format-4 version names are read from its segments.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

from .errors import GpuloadError
from .format import CHUNK_RE, SEGMENT_RE, Manifest
from .index import files_named
from .storage import Store
from .versions import read_manifest, read_version

__all__ = ["VacuumReport", "vacuum_store", "DEFAULT_GRACE_S"]

log = logging.getLogger("gpuload.vacuum")
DEFAULT_GRACE_S = 24 * 3600.0
_TMP_RE = re.compile(r"(manifest\.json|v\d{12}\.json)\.tmp-[0-9a-f]{32}")


@dataclass(frozen=True)
class VacuumReport:
    """What a vacuum removed (or, with ``dry_run``, would remove) and what it kept."""

    table: str
    removed: tuple[str, ...]
    bytes_removed: int
    recent: tuple[str, ...]  # unnamed but younger than the grace period: maybe a live writer's
    dry_run: bool

    def __str__(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        return (
            f"{self.table}: {verb} {len(self.removed)} unreferenced files "
            f"({self.bytes_removed} bytes); kept {len(self.recent)} younger than the grace period"
        )


def vacuum_store(
    store: Store,
    label: str,
    older_than: float = DEFAULT_GRACE_S,
    dry_run: bool = False,
    now: float | None = None,
) -> VacuumReport:
    """Remove the table's chunk files that its current manifest does not name, and leftover
    temporary manifest files, when older than ``older_than`` seconds."""
    if not older_than >= 0:
        raise ValueError(
            f"vacuum of {label!r}: older_than must be >= 0 seconds, got {older_than!r}"
        )
    manifest = read_manifest(store)  # TableNotFoundError / FormatError name the table
    now = time.time() if now is None else now
    candidates: list[tuple[str, int, float | None]] = []
    for folder, pattern in (("chunks", CHUNK_RE), ("index", SEGMENT_RE)):
        for name, size, mtime in store.list_files(folder):
            rel = f"{folder}/{name}"
            if pattern.fullmatch(rel):
                candidates.append((rel, size, mtime))
            else:
                log.warning("vacuum of %s: leaving unknown file %s alone", label, rel)
    for folder in ("", "versions"):
        for name, size, mtime in store.list_files(folder):
            if _TMP_RE.fullmatch(name):
                candidates.append((f"{folder}/{name}" if folder else name, size, mtime))
    memo: dict[str, list[str]] = {}  # chunk names of each segment read (versions share them)
    named = _needed(store, manifest, now, older_than, label, memo)
    old, recent = [], []
    for rel, size, mtime in candidates:
        if named is None and _table_file(rel):
            recent.append(rel)
            continue
        if named is not None and rel in named:
            continue
        # an unknown age counts as recent unless the caller asked for everything (older_than=0)
        if older_than == 0 or (mtime is not None and now - mtime >= older_than):
            old.append((rel, size))
        else:
            recent.append(rel)
    if old and not dry_run:
        # A commit may have landed since the manifest was read: never delete what it names.
        latest = read_manifest(store)
        if latest.version != manifest.version:
            named = _needed(store, latest, now, older_than, label, memo)
            old = [
                (rel, size)
                for rel, size in old
                if not (_table_file(rel) and (named is None or rel in named))
            ]
        for rel, _ in old:
            store.remove(rel)
    removed = tuple(rel for rel, _ in old)
    report = VacuumReport(
        table=label,
        removed=removed,
        bytes_removed=sum(size for _, size in old),
        recent=tuple(recent),
        dry_run=dry_run,
    )
    log.info("%s", report)
    return report


def _table_file(rel: str) -> bool:
    """Chunks and index segments: what versions name (unlike temporary manifests)."""
    return rel.startswith(("chunks/", "index/"))


def _needed(
    store: Store,
    latest: Manifest,
    now: float,
    older_than: float,
    label: str,
    memo: dict[str, list[str]],
) -> set[str] | None:
    """Chunk and segment files a live snapshot may still read: those of the latest version and
    of every version replaced less than ``older_than`` seconds ago (a reader may hold one of
    those); None when one of those versions cannot be read (then nothing may go)."""
    named = files_named(store, latest, label, memo)
    newer = latest
    for v in range(latest.version - 1, 0, -1):
        if now - newer.updated >= older_than:
            break  # version v was replaced before the grace period: nobody may read it now
        m = _recent_files(store, v, label, memo)
        if m is None:  # replaced within the grace period but unreadable: keep every chunk
            return None
        named.update(m[1])
        newer = m[0]
    return named


def _recent_files(
    store: Store, v: int, label: str, memo: dict[str, list[str]]
) -> tuple[Manifest, set[str]] | None:
    """Version ``v`` (replaced within the grace period) and every file it names; None, with
    a warning, when it or one of its segments cannot be read: a live reader of it may need
    files nobody can list, so none may go."""
    try:
        m = read_version(store, v)
        if m is not None:
            return m, files_named(store, m, label, memo)
        reason = "its version file is missing"
    except GpuloadError as e:  # a missing or damaged segment, a damaged version file
        reason = str(e)
    log.warning(
        "vacuum of %s: version %d cannot be read (%s), so the files a live reader of it may "
        "need are unknown; nothing is removed",
        label,
        v,
        reason,
    )
    return None
