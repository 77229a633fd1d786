"""Coalescing byte-range reads: pure functions, tested on their own.

Reads are held as parallel arrays (a ReadPlan) so planning a batch of thousands of rows costs a
few numpy calls, not a Python object per row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Read", "ReadPlan", "Groups", "coalesce", "coalesce_plan"]


@dataclass(frozen=True)
class Read:
    """Read ``length`` bytes of ``file`` at ``start`` into the output buffer at ``dest``."""

    file: str
    start: int
    length: int
    dest: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class ReadPlan:
    """Many reads as arrays: read ``length[i]`` bytes of ``files[fidx[i]]`` at ``start[i]`` into
    the output at ``dest[i]``. ``files`` is a list, or a mapping from the numbers ``fidx``
    uses (a format-4 reader names only the chunks a plan reads)."""

    files: Sequence[str] | Mapping[int, str]
    fidx: np.ndarray
    start: np.ndarray
    length: np.ndarray
    dest: np.ndarray

    @classmethod
    def from_reads(cls, reads: Iterable[Read]) -> ReadPlan:
        reads = list(reads)
        files: list[str] = []
        index: dict[str, int] = {}
        fidx = np.empty(len(reads), np.int64)
        for i, r in enumerate(reads):
            k = index.get(r.file)
            if k is None:
                k = index[r.file] = len(files)
                files.append(r.file)
            fidx[i] = k
        return cls(
            files,
            fidx,
            np.fromiter((r.start for r in reads), np.int64, len(reads)),
            np.fromiter((r.length for r in reads), np.int64, len(reads)),
            np.fromiter((r.dest for r in reads), np.int64, len(reads)),
        )

    def __len__(self) -> int:
        return len(self.fidx)

    @property
    def end(self) -> np.ndarray:
        return self.start + self.length


@dataclass(frozen=True)
class Groups:
    """Coalesced requests over a plan: request g covers [gstart[g], gend[g]) of
    files[gfile[g]] and serves the plan's reads order[bounds[g]:bounds[g+1]] (sorted by start)."""

    gfile: np.ndarray
    gstart: np.ndarray
    gend: np.ndarray
    order: np.ndarray
    bounds: np.ndarray

    def __len__(self) -> int:
        return len(self.gfile)

    def members(self, g: int) -> np.ndarray:
        return self.order[self.bounds[g] : self.bounds[g + 1]]


def coalesce_plan(plan: ReadPlan, max_gap: int = 0, max_request: int = 1 << 26) -> Groups:
    """Merge reads of the same file whose gap is at most ``max_gap`` bytes into requests of at
    most ``max_request`` bytes (a single larger read is never split). Empty reads are dropped;
    overlapping reads share a request."""
    keep = np.flatnonzero(plan.length > 0)
    if keep.size == 0:
        z = np.zeros(0, np.int64)
        return Groups(z, z, z, z, np.zeros(1, np.int64))
    order = keep[np.lexsort((plan.start[keep], plan.fidx[keep]))]
    # Offsetting by file index makes one running maximum reset at every file boundary.
    big = np.int64(1) << np.int64(42)
    f = plan.fidx[order]
    s = plan.start[order] + f * big
    e = s + plan.length[order]
    run_end = np.maximum.accumulate(e)
    new = np.ones(len(order), dtype=bool)
    new[1:] = s[1:] - run_end[:-1] > max_gap
    first = np.flatnonzero(new)
    last = np.append(first[1:], len(order)) - 1
    bounds = list(first)
    span = run_end[last] - s[first]
    # Rare: a merged run longer than max_request is split greedily (only those runs loop).
    for k in np.flatnonzero(span > max_request):
        cur_start = int(s[first[k]])
        cur_end = int(e[first[k]])
        for i in range(int(first[k]) + 1, int(last[k]) + 1):
            if max(cur_end, int(e[i])) - cur_start > max_request:
                bounds.append(i)
                cur_start, cur_end = int(s[i]), int(e[i])
            else:
                cur_end = max(cur_end, int(e[i]))
    b = np.unique(np.asarray(bounds, np.int64))
    ends_idx = np.append(b[1:], len(order))
    # the end of group g is the max end over its members
    gend_shifted = np.maximum.reduceat(e, b)
    gfile = f[b]
    return Groups(
        gfile,
        s[b] - gfile * big,
        gend_shifted - gfile * big,
        order,
        np.append(b, ends_idx[-1]).astype(np.int64),
    )


def coalesce(
    reads: Iterable[Read], max_gap: int = 0, max_request: int = 1 << 26
) -> list[tuple[str, int, int, list[Read]]]:
    """The same merge over Read objects: a list of (file, start, end, reads served)."""
    reads = list(reads)
    plan = ReadPlan.from_reads(reads)
    g = coalesce_plan(plan, max_gap, max_request)
    return [
        (
            plan.files[int(g.gfile[k])],
            int(g.gstart[k]),
            int(g.gend[k]),
            [reads[i] for i in g.members(k)],
        )
        for k in range(len(g))
    ]
