"""What the fetcher knows of each file it reads: its size, its page checksums, and whether its
real size was checked.

A manifest that lists every chunk hands all of it over up front (plain dicts). A chunk index
(format 4, ``gpuload.index``) hands over a ``resolve`` function instead: entries are looked up
when a file is first read and at most ``limit`` of them are kept (the least recently used go
first), so what the fetcher holds does not grow with the table. An evicted entry is looked up
again, never taken for a file without checksums.

Resolved entries remember the chunk numbers they were looked up for (a name that knows its
chunk, ``gpuload.index.ChunkFile``): a file named by another chunk's record is looked up again
and must be described exactly alike (size, page size, checked bytes, digest), or it is refused
with a FormatError naming both chunks. So a size check made under one record is never taken
for another record that claims the same file is larger."""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping

from ..checksums import PageChecksums
from ..errors import FormatError

__all__ = ["FileCatalog", "Resolver", "DEFAULT_LIMIT"]

# file -> (size, page checksums or None), or None for a file the snapshot does not have
Resolver = Callable[[str], "tuple[int, PageChecksums | None] | None"]
DEFAULT_LIMIT = 1 << 16  # entries kept when resolving (~10 MB)
_LIVE: weakref.WeakSet[FileCatalog] = weakref.WeakSet()  # catalogs whose lock a fork renews


def _after_fork_in_child() -> None:
    """Every catalog of a forked child gets a fresh lock: a parent thread may have held one at
    the fork, and no thread of the child would ever release it."""
    for catalog in list(_LIVE):
        catalog.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Entry:
    """One file: its size and checksums, whether its real size was checked, and the chunks
    whose records were found to describe it (None: not known by chunk)."""

    __slots__ = ("size", "sums", "checked", "chunks")

    def __init__(
        self, size: int | None, sums: PageChecksums | None, chunks: set[int] | None = None
    ) -> None:
        self.size, self.sums, self.checked, self.chunks = size, sums, False, chunks


class FileCatalog:
    """Sizes and page checksums by file name (thread-safe; a forked child renews the lock,
    ``_after_fork_in_child``)."""

    def __init__(
        self,
        sizes: Mapping[str, int] | None = None,
        checksums: Mapping[str, PageChecksums] | None = None,
        resolve: Resolver | None = None,
        limit: int = DEFAULT_LIMIT,
        label: str = "",
    ) -> None:
        self.resolve = resolve
        self.limit = max(1, int(limit)) if resolve is not None else None
        self.label = label
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        for f, n in (sizes or {}).items():
            self._entries[f] = _Entry(n, None)
        for f, c in (checksums or {}).items():
            self._entries.setdefault(f, _Entry(None, None)).sums = c
        self._any_sums = any(e.sums is not None for e in self._entries.values())
        self._lock = threading.Lock()
        _LIVE.add(self)

    def after_fork(self) -> None:
        """A forked child starts with a fresh lock (the parent's may have been held)."""
        self._lock = threading.Lock()

    def _entry(self, file: str) -> _Entry | None:
        """What is known of ``file``, resolved when not held (None: not a file of this
        snapshot); another chunk's record naming a held file is compared first."""
        chunk = _chunk_of(file)
        with self._lock:
            e = self._entries.get(file)
            if e is not None:
                if self.limit is not None:
                    self._entries.move_to_end(file)
                if chunk is None or e.chunks is None or chunk in e.chunks:
                    return e
        if e is not None:
            return self._same_chunk(file, e)
        if self.resolve is None:
            return None
        found = self.resolve(file)
        if found is None:
            return None
        with self._lock:
            e = self._entries.get(file)
            if e is None:
                e = self._entries[file] = _Entry(
                    found[0], found[1], None if chunk is None else {chunk}
                )
                while len(self._entries) > self.limit:
                    self._entries.popitem(last=False)
                return e
        return self._same_chunk(file, e)  # another thread resolved it meanwhile

    def _same_chunk(self, file: str, e: _Entry) -> _Entry | None:
        """``e`` for ``file``, once ``file``'s own record (when it names another chunk than
        those ``e`` was found for) describes it alike; FormatError when it does not."""
        chunk = _chunk_of(file)
        with self._lock:
            if chunk is None or e.chunks is None or chunk in e.chunks:
                return e
            first = min(e.chunks)
        found = self.resolve(file) if self.resolve is not None else None
        if found is None:
            return None
        if (found[0], found[1]) != (e.size, e.sums):
            raise FormatError(
                f"table {self.label!r}: chunks {first} and {chunk} both name the chunk file "
                f"{file} but describe it differently ({e.size} bytes, {_sums_text(e.sums)} vs "
                f"{found[0]} bytes, {_sums_text(found[1])})"
            )
        with self._lock:
            e.chunks.add(chunk)
        return e

    @property
    def has_checksums(self) -> bool:
        """Whether any file may carry checksums (always, when entries are resolved)."""
        return self._any_sums or self.resolve is not None

    def size(self, file: str) -> int | None:
        """The size the manifest gives ``file`` (None: unknown)."""
        e = self._entry(file)
        return None if e is None else e.size

    def sums(self, file: str) -> PageChecksums | None:
        """The page checksums of ``file`` (None: it has none, or it is unknown)."""
        e = self._entry(file)
        return None if e is None else e.sums

    def learn_size(self, file: str, size: int) -> None:
        """Remember the real size of a file the manifest did not size."""
        with self._lock:
            e = self._entries.get(file)
            if e is None:
                self._entries[file] = _Entry(size, None)
            elif e.size is None:
                e.size = size

    def checked(self, file: str) -> bool:
        """Whether ``file``'s real size was found equal to the manifest's (this process), for
        the record ``file`` comes from (another chunk's record naming it is compared first)."""
        with self._lock:
            e = self._entries.get(file)
        if e is None:
            return False
        e = self._same_chunk(file, e)
        return e is not None and e.checked

    def mark_checked(self, file: str) -> None:
        """Record that ``file``'s real size equals the manifest's."""
        with self._lock:
            e = self._entries.get(file)
            if e is not None:
                e.checked = True

    def snapshot(self) -> tuple[dict[str, int], dict[str, PageChecksums]]:
        """The sizes and checksums held now (all of them without a resolver)."""
        with self._lock:
            items = list(self._entries.items())
        sizes = {f: e.size for f, e in items if e.size is not None}
        sums = {f: e.sums for f, e in items if e.sums is not None}
        return sizes, sums


def _chunk_of(file: str) -> int | None:
    """The chunk number a file name carries (``gpuload.index.ChunkFile``), or None."""
    return getattr(file, "chunk", None)


def _sums_text(sums: PageChecksums | None) -> str:
    """Page checksums as an error message shows them."""
    if sums is None:
        return "no page checksums"
    return f"pages of {sums.page} over {sums.covers} bytes, digest {sums.digest:016x}"
