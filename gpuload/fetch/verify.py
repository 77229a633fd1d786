"""Verification of fetched bytes against the page checksums of their chunk files.

Reads are widened to whole pages, fetched, checked page by page, and only then copied to the
caller (or stored in the block cache). The page hash tables themselves are checked against the
digest in the manifest and kept in a bounded in-memory LRU.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from ..checksums import PageChecksums, bad_pages, hash_bytes
from ..errors import IntegrityError
from .ranges import Groups, ReadPlan

__all__ = ["PageTables", "widen", "integrity_error", "contiguous", "DirectLayout"]


def integrity_error(label: str, file: str, start: int, end: int, what: str) -> IntegrityError:
    """The one error for bytes that stay wrong after a refetch (``file`` and ``span`` say
    where, for callers that name more than the byte range)."""
    err = IntegrityError(
        f"table {label!r}, chunk {file}, bytes [{start}, {end}): {what}; the bytes were fetched "
        "twice and did not match their checksum either time"
    )
    err.file, err.span = file, (start, end)  # type: ignore[attr-defined]
    return err


class PageTables:
    """The verified page hash tables of a table's chunks (bounded LRU, thread-safe);
    ``sums(file)`` gives a chunk's page checksums."""

    def __init__(self, sums: Callable[[str], PageChecksums], limit_bytes: int = 64 << 20) -> None:
        self.sums = sums
        self._tables: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._limit = limit_bytes
        self._lock = threading.Lock()

    def get(self, file: str) -> np.ndarray | None:
        with self._lock:
            t = self._tables.get(file)
            if t is not None:
                self._tables.move_to_end(file)
            return t

    def accept(self, file: str, raw) -> np.ndarray | None:
        """Keep a hash table read from the file when its digest matches; None when it does not."""
        sums = self.sums(file)
        if len(raw) != sums.table_length or hash_bytes(raw) != sums.digest:
            return None
        table = np.frombuffer(bytes(raw), dtype="<u8")
        with self._lock:
            if file not in self._tables:
                self._tables[file] = table
                self._bytes += table.nbytes
                while self._bytes > self._limit and len(self._tables) > 1:
                    _, old = self._tables.popitem(last=False)
                    self._bytes -= old.nbytes
        return table

    def bad(self, file: str, table: np.ndarray, start: int, data) -> list[int]:
        """Pages of ``data`` (file bytes [start, start + len), page-aligned) that do not match;
        bytes past the pages (the hash table itself) must equal the verified table."""
        sums = self.sums(file)
        end = start + len(data)
        mv = memoryview(data).cast("B")
        cut = max(0, min(end, sums.covers) - start)
        out = bad_pages(mv[:cut], start, sums, table) if cut else []
        if end > sums.covers:
            lo = max(start, sums.covers) - sums.covers
            if bytes(mv[cut:]) != table.tobytes()[lo : lo + len(mv) - cut]:
                out.append(sums.pages)  # the "page" after the last: the hash table region
        return out


def widen(plan: ReadPlan, page: np.ndarray, covers: np.ndarray) -> ReadPlan:
    """The plan's reads widened to whole pages (``page`` and ``covers`` per read: the page size
    and checksummed length of its file); ``dest`` is left as in the plan (callers copy from the
    widened reads)."""
    start = plan.start - plan.start % page
    end = np.minimum(-(-plan.end // page) * page, covers)
    return ReadPlan(plan.files, plan.fidx, start, np.maximum(end - start, 0), plan.dest)


def contiguous(plan: ReadPlan, m: np.ndarray) -> bool:
    """True when reads ``m`` (in file order) follow each other in the file and in the output."""
    if len(m) < 2:
        return True
    s, ln, d = plan.start[m], plan.length[m], plan.dest[m]
    return bool(np.all(s[1:] == s[:-1] + ln[:-1]) and np.all(d[1:] == d[:-1] + ln[:-1]))


class DirectLayout:
    """Long contiguous groups of a verified local read: inner pages land in the output, the
    first and last page in scratch; what is copied out of scratch once verified."""

    def __init__(self, plan: ReadPlan, groups: Groups, view: memoryview, scratch: memoryview):
        self.plan, self.view, self.scratch = plan, view, scratch
        self.gstart, self.gend = groups.gstart.tolist(), groups.gend.tolist()
        self.bounds, self.order = groups.bounds.tolist(), groups.order.tolist()
        self.used = 0
        self.groups: list[int] = []
        self.fds: list[int] = []
        self.page: list[int] = []
        self.iov: list[list[memoryview]] = []
        self.pages: list[list[memoryview]] = []  # per group: the bytes of each page
        self.want: list[list[int]] = []  # per group: each page's expected hash
        self.copies: list[tuple[int, memoryview]] = []  # (output offset, verified bytes)

    def _take(self, n: int) -> memoryview:
        part = self.scratch[self.used : self.used + n]
        self.used += n
        return part

    def add(self, g: int, fd: int, table: np.ndarray, sums: PageChecksums) -> int:
        """Lay out group ``g`` (at least 3 pages); returns its index in this layout."""
        gs, ge, page = self.gstart[g], self.gend[g], sums.page
        m = self.order[self.bounds[g] : self.bounds[g + 1]]
        p0, p1 = gs // page, -(-ge // page)
        s0, d0 = int(self.plan.start[m[0]]), int(self.plan.dest[m[0]])
        span = int(self.plan.length[m].sum())
        first, last = self._take(page), self._take(ge - (p1 - 1) * page)
        inner = self.view[d0 + gs + page - s0 : d0 + (p1 - 1) * page - s0]
        self.groups.append(g)
        self.fds.append(fd)
        self.page.append(page)
        self.want.append(table[p0:p1].tolist())
        self.iov.append([first, inner, last])
        self.pages.append(
            [first] + [inner[k * page : (k + 1) * page] for k in range(p1 - p0 - 2)] + [last]
        )
        for piece, at in ((first, gs), (last, (p1 - 1) * page)):
            lo, hi = max(at, s0), min(at + len(piece), s0 + span)
            if hi > lo:
                self.copies.append((d0 + lo - s0, piece[lo - at : hi - at]))
        return len(self.groups) - 1

    def bad_pages(self, k: int) -> list[int]:
        """Page numbers (in the file) of laid-out group ``k`` whose hash does not match."""
        h = hash_bytes
        p0 = self.gstart[self.groups[k]] // self.page[k]
        return [p0 + i for i, (v, w) in enumerate(zip(self.pages[k], self.want[k])) if h(v) != w]

    def bad(self) -> list[int]:
        """Laid-out groups with any page whose hash does not match."""
        h = hash_bytes
        return [
            k
            for k, (ps, want) in enumerate(zip(self.pages, self.want))
            if [h(v) for v in ps] != want
        ]

    def copy_out(self) -> None:
        view = self.view
        for d, src in self.copies:
            view[d : d + len(src)] = src
