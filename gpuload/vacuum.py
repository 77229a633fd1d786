"""Vacuum: delete files of a table that no committed manifest names.

A writer killed before its commit (SIGKILL, power loss) leaves its chunk files behind: no
manifest names them, so readers never see them, but they take space. ``vacuum`` removes chunk
files the current manifest does not name, and leftover temporary manifest files, once they are
older than a grace period. The grace period is what keeps a writer that is still running safe
(its chunks are unnamed until it commits), so it must exceed the longest ingest; the default is
24 hours, as object-store "remove orphan files" jobs do. A writer also checks, just before its
commit, that all of its chunks still exist, so a too-short grace period fails that ingest
loudly instead of committing a manifest that names a deleted chunk.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

from .format import CHUNK_RE
from .storage import Store
from .table import read_manifest

__all__ = ["VacuumReport", "vacuum_store", "DEFAULT_GRACE_S"]

log = logging.getLogger("gpuload.vacuum")
DEFAULT_GRACE_S = 24 * 3600.0
_TMP_RE = re.compile(r"^(manifest\.json|v\d{12}\.json)\.tmp-[0-9a-f]{32}$")


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
    for name, size, mtime in store.list_files("chunks"):
        rel = f"chunks/{name}"
        if CHUNK_RE.match(rel):
            candidates.append((rel, size, mtime))
        else:
            log.warning("vacuum of %s: leaving unknown file %s alone", label, rel)
    for folder in ("", "versions"):
        for name, size, mtime in store.list_files(folder):
            if _TMP_RE.match(name):
                candidates.append((f"{folder}/{name}" if folder else name, size, mtime))
    named = {c.file for c in manifest.chunks}
    old, recent = [], []
    for rel, size, mtime in candidates:
        if rel in named:
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
            named = {c.file for c in latest.chunks}
            old = [(rel, size) for rel, size in old if rel not in named]
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
