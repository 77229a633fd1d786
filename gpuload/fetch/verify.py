"""Verification of fetched bytes against the page checksums of their chunk files.

Reads are widened to whole pages, fetched, checked page by page, and only then copied to the
caller (or stored in the block cache). The page hash tables themselves are checked against the
digest in the manifest and kept in a bounded in-memory LRU.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from ..checksums import PageChecksums, bad_pages, hash_bytes
from ..errors import IntegrityError
from .ranges import ReadPlan

__all__ = ["PageTables", "widen", "integrity_error"]


def integrity_error(label: str, file: str, start: int, end: int, what: str) -> IntegrityError:
    """The one error for bytes that stay wrong after a refetch."""
    return IntegrityError(
        f"table {label!r}, chunk {file}, bytes [{start}, {end}): {what}; the bytes were fetched "
        "twice and did not match their checksum either time"
    )


class PageTables:
    """The verified page hash tables of a table's chunks (bounded LRU, thread-safe)."""

    def __init__(self, sums: Mapping[str, PageChecksums], limit_bytes: int = 64 << 20) -> None:
        self.sums = dict(sums)
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
        sums = self.sums[file]
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
        sums = self.sums[file]
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
