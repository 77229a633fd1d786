"""The version log of a table: what makes a commit atomic and serialisable on every store.

``versions/v<N>.json`` files are the truth: a version is published by creating its file only if
it does not exist (gpuload.storage.Store.create_exclusive), so of two writers racing for the
same version exactly one wins. ``manifest.json`` is a pointer to the latest version, rewritten
after each commit; a reader starts there and moves forward while a newer version file exists,
so a writer that crashed (or was slow) between its commit and the pointer update loses nothing.
"""

from __future__ import annotations

import logging

from .errors import FetchError, FormatError, GpuloadError, TableNotFoundError
from .format import MANIFEST, Manifest, version_path
from .storage import Store

__all__ = [
    "read_manifest",
    "try_read_manifest",
    "create_version",
    "point_to",
    "table_exists",
    "read_version",
]

log = logging.getLogger("gpuload.versions")


def _read(store: Store, rel: str) -> bytes | None:
    """A file's bytes, or None when it does not exist."""
    try:
        return store.read_bytes(rel)
    except FileNotFoundError:
        return None
    except GpuloadError:
        raise
    except OSError as e:
        raise FetchError(f"reading {store.url_of(rel)} failed: {e}") from e


def read_version(store: Store, version: int) -> Manifest | None:
    """The manifest of one committed version, or None when that version does not exist."""
    rel = version_path(version)
    raw = _read(store, rel)
    if raw is None:
        return None
    m = Manifest.loads(raw, store.url_of(rel))
    if m.version != version:
        raise FormatError(f"{store.url_of(rel)}: holds version {m.version}, not {version}")
    return m


def read_manifest(store: Store) -> Manifest:
    """The latest committed manifest of the table at ``store``."""
    raw = _read(store, MANIFEST)
    if raw is not None:
        m = Manifest.loads(raw, store.url_of(MANIFEST))
    else:  # a first commit whose pointer was never written, or no table at all
        first = read_version(store, 1)
        if first is None:
            raise TableNotFoundError(f"no table at {store.url} (missing {MANIFEST})")
        m = first
    while True:
        newer = read_version(store, m.version + 1)
        if newer is None:
            return m
        m = newer


def try_read_manifest(store: Store) -> Manifest | None:
    """The latest manifest, or None when there is no table."""
    try:
        return read_manifest(store)
    except TableNotFoundError:
        return None


def table_exists(store: Store) -> bool:
    """True when a table has been committed at ``store``."""
    return store.exists(MANIFEST) or store.exists(version_path(1))


def create_version(store: Store, manifest: Manifest) -> bool:
    """Commit ``manifest`` as its version: True when this call created the version file, False
    when another writer committed that version first (nothing of this one is visible then)."""
    return store.create_exclusive(version_path(manifest.version), manifest.dumps())


def point_to(store: Store, manifest: Manifest) -> None:
    """Rewrite manifest.json to a committed version; best effort, since readers move forward
    from a stale pointer anyway."""
    try:
        store.write_atomic(MANIFEST, manifest.dumps())
    except (GpuloadError, OSError) as e:
        log.warning(
            "committed version %d of %s but could not update %s (%s); readers still find it",
            manifest.version,
            store.url,
            MANIFEST,
            e,
        )
