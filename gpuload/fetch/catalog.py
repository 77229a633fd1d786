"""What the fetcher knows of each file it reads: its size, its page checksums, and whether its
real size was checked.

A manifest that lists every chunk hands all of it over up front (plain dicts). A chunk index
(format 4, ``gpuload.index``) hands over a ``resolve`` function instead: entries are looked up
when a file is first read and at most ``limit`` of them are kept (the least recently used go
first), so what the fetcher holds does not grow with the table. An evicted entry is looked up
again, never taken for a file without checksums."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping

from ..checksums import PageChecksums

__all__ = ["FileCatalog", "Resolver", "DEFAULT_LIMIT"]

# file -> (size, page checksums or None), or None for a file the snapshot does not have
Resolver = Callable[[str], "tuple[int, PageChecksums | None] | None"]
DEFAULT_LIMIT = 1 << 16  # entries kept when resolving (~10 MB)


class FileCatalog:
    """Sizes and page checksums by file name (thread-safe)."""

    def __init__(
        self,
        sizes: Mapping[str, int] | None = None,
        checksums: Mapping[str, PageChecksums] | None = None,
        resolve: Resolver | None = None,
        limit: int = DEFAULT_LIMIT,
    ) -> None:
        self.resolve = resolve
        self.limit = max(1, int(limit)) if resolve is not None else None
        self._entries: OrderedDict[str, list] = OrderedDict()  # file -> [size, sums, checked]
        for f, n in (sizes or {}).items():
            self._entries[f] = [n, None, False]
        for f, c in (checksums or {}).items():
            e = self._entries.setdefault(f, [None, None, False])
            e[1] = c
        self._any_sums = any(e[1] is not None for e in self._entries.values())
        self._lock = threading.Lock()

    def after_fork(self) -> None:
        """A forked child starts with a fresh lock (the parent's may have been held)."""
        self._lock = threading.Lock()

    def _entry(self, file: str) -> list | None:
        with self._lock:
            e = self._entries.get(file)
            if e is not None:
                if self.limit is not None:
                    self._entries.move_to_end(file)
                return e
        if self.resolve is None:
            return None
        found = self.resolve(file)
        if found is None:
            return None
        with self._lock:
            e = self._entries.get(file)
            if e is None:
                e = self._entries[file] = [found[0], found[1], False]
                while len(self._entries) > self.limit:
                    self._entries.popitem(last=False)
            return e

    @property
    def has_checksums(self) -> bool:
        """Whether any file may carry checksums (always, when entries are resolved)."""
        return self._any_sums or self.resolve is not None

    def size(self, file: str) -> int | None:
        """The size the manifest gives ``file`` (None: unknown)."""
        e = self._entry(file)
        return None if e is None else e[0]

    def sums(self, file: str) -> PageChecksums | None:
        """The page checksums of ``file`` (None: it has none, or it is unknown)."""
        e = self._entry(file)
        return None if e is None else e[1]

    def learn_size(self, file: str, size: int) -> None:
        """Remember the real size of a file the manifest did not size."""
        with self._lock:
            e = self._entries.get(file)
            if e is None:
                self._entries[file] = [size, None, False]
            elif e[0] is None:
                e[0] = size

    def checked(self, file: str) -> bool:
        """Whether ``file``'s real size was found equal to the manifest's (this process)."""
        with self._lock:
            e = self._entries.get(file)
            return e is not None and e[2]

    def mark_checked(self, file: str) -> None:
        with self._lock:
            e = self._entries.get(file)
            if e is not None:
                e[2] = True

    def snapshot(self) -> tuple[dict[str, int], dict[str, PageChecksums]]:
        """The sizes and checksums held now (all of them without a resolver)."""
        with self._lock:
            items = list(self._entries.items())
        sizes = {f: e[0] for f, e in items if e[0] is not None}
        sums = {f: e[1] for f, e in items if e[1] is not None}
        return sizes, sums
