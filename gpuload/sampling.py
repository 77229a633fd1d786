"""Sampling as pure functions of (seed, epoch, rank, worker): shuffle, sharding, resume.

A full shuffle is a keyed pseudo-random permutation (a Feistel network with cycle walking), so the
row at any position of an epoch is computed on demand in O(1) memory: streaming never holds an
O(rows) index, and resuming mid-epoch is just "start at position p". The block shuffle (for remote,
uncached tables) permutes chunk order and shuffles rows within windows of a few chunks, so reads
stay within a bounded set of chunks at a time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "derive_key",
    "Permutation",
    "EpochOrder",
    "Shard",
    "shard_for",
    "SHUFFLE_MODES",
    "Shuffle",
    "Tail",
    "coerce_enum",
    "RowSelection",
    "SubsetOrder",
]

SHUFFLE_MODES = ("none", "full", "block")
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


E = TypeVar("E", bound=Enum)


def coerce_enum(cls: type[E], value: Any, name: str) -> E:
    """``value`` as a member of ``cls`` (a member or its string value), else ValueError."""
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        allowed = " or ".join(repr(m.value) for m in cls)
        raise ValueError(f"{name} must be {allowed}, got {value!r}") from None


class Shuffle(Enum):
    """Row order of an epoch. ``AUTO`` (``shuffle=True``) is a full shuffle where reads are local
    or cached, a block shuffle (chunks in random order, rows shuffled within a window) for remote
    tables read without a cache."""

    NONE = "none"
    AUTO = "auto"
    FULL = "full"
    BLOCK = "block"

    @classmethod
    def coerce(cls, value: Any) -> Shuffle:
        if isinstance(value, cls):
            return value
        if value is True:
            return cls.AUTO
        if value is False or value is None:
            return cls.NONE
        if isinstance(value, str) and value in {m.value for m in cls}:
            return cls(value)
        raise ValueError(f"shuffle must be True, False, 'full' or 'block', got {value!r}")

    def resolve(self, cached: bool) -> str:
        """The concrete order ("none", "full" or "block") for a table read locally or not."""
        if self is Shuffle.AUTO:
            return "full" if cached else "block"
        return self.value


class Tail(Enum):
    """How ranks whose shares differ by a row are evened out: ``PAD`` repeats rows from the
    start (equal batch counts on every rank, as DistributedSampler), ``DROP`` drops the extra."""

    PAD = "pad"
    DROP = "drop"

    @classmethod
    def coerce(cls, value: Any) -> Tail:
        return coerce_enum(cls, value, "uneven")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def derive_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, epoch, salt...), order-sensitive."""
    h = np.uint64(0x243F6A8885A308D3)
    for p in parts:
        h = _mix64(np.uint64(h) ^ np.uint64(int(p) & 0xFFFFFFFFFFFFFFFF))
    return int(h)


_GOLDEN, _M1, _M2 = (
    np.uint64(0x9E3779B97F4A7C15),
    np.uint64(0xBF58476D1CE4E5B9),
    np.uint64(0x94D049BB133111EB),
)
_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)


def feistel(positions: np.ndarray, n: int, half: int, keys: np.ndarray) -> np.ndarray:
    """Keyed bijection of [0, n) at each position: a balanced Feistel network on 2*half bits
    (round function: splitmix64 of the right half xor the round key, as ``_mix64``), with cycle
    walking for values >= n. Vectorised uint64 arithmetic (wrapping), no compilation: every
    position goes through the rounds together; those that land >= n walk again."""
    mask, sh, un = np.uint64((1 << half) - 1), np.uint64(half), np.uint64(n)
    x = np.asarray(positions, dtype=np.int64).astype(np.uint64)
    out = np.empty(x.shape[0], dtype=np.int64)
    todo = np.arange(x.shape[0])
    with np.errstate(over="ignore"):
        while todo.size:
            left, right = x >> sh, x & mask
            for k in keys:
                z = right ^ k
                z += _GOLDEN
                z ^= z >> _S30
                z *= _M1
                z ^= z >> _S27
                z *= _M2
                z ^= z >> _S31
                z &= mask
                z ^= left
                left, right = right, z
            x = (left << sh) | right
            done = x < un
            out[todo[done]] = x[done].astype(np.int64)
            todo, x = todo[~done], x[~done]
    return out


class Permutation:
    """A keyed bijection of [0, n), evaluated on arrays of positions without materialising it.

    Numpy only (no JIT to load, so a first batch never waits for one): positions are computed
    in aligned blocks of ``BLOCK`` (vectorised, ~0.1-0.3 us a position; a per-batch call would
    pay numpy's per-call overhead on a few rows) and the last ``KEEP`` blocks are kept, so a
    loader reading an epoch in order computes each block once; scattered positions are computed
    directly. Memory: at most KEEP * BLOCK * 8 bytes, whatever n is."""

    ROUNDS = 6
    BLOCK = 1 << 12
    KEEP = 8

    def __init__(self, n: int, key: int) -> None:
        if n < 0:
            raise ValueError(f"permutation size must be >= 0, got {n}")
        self.n = int(n)
        bits = max(2, int(np.ceil(np.log2(max(n, 2)))))
        bits += bits % 2  # even split into two halves
        self.half = bits // 2
        self.keys = np.array([derive_key(key, r) for r in range(self.ROUNDS)], dtype=np.uint64)
        self._blocks: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"n": self.n, "half": self.half, "keys": self.keys}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._blocks = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, positions) -> np.ndarray:
        """Rows at the given positions (array-like of ints in [0, n))."""
        p = np.ascontiguousarray(positions, dtype=np.int64).reshape(-1)
        if not p.size:
            return np.empty(0, dtype=np.int64)
        lo, hi = int(p.min()), int(p.max())
        if lo < 0 or hi >= self.n:
            raise IndexError(f"positions out of range for a permutation of {self.n}")
        b0, b1 = lo // self.BLOCK, hi // self.BLOCK
        if b1 - b0 >= 2 and (b1 - b0 + 1) * self.BLOCK > 8 * p.size:  # scattered: compute them
            return feistel(p, self.n, self.half, self.keys)
        if b0 == b1:
            return self._block(b0)[p - b0 * self.BLOCK]
        table = np.concatenate([self._block(b) for b in range(b0, b1 + 1)])
        return table[p - b0 * self.BLOCK]

    def _block(self, b: int) -> np.ndarray:
        """The rows at positions [b * BLOCK, (b + 1) * BLOCK) (clipped to n), kept LRU."""
        with self._lock:
            rows = self._blocks.get(b)
            if rows is not None:
                self._blocks.move_to_end(b)
                return rows
        start = b * self.BLOCK
        stop = min(start + self.BLOCK, self.n)
        rows = feistel(np.arange(start, stop, dtype=np.int64), self.n, self.half, self.keys)
        rows.flags.writeable = False
        with self._lock:
            self._blocks[b] = rows
            while len(self._blocks) > self.KEEP:
                self._blocks.popitem(last=False)
        return rows


@dataclass(frozen=True)
class EpochOrder:
    """The order of rows in one epoch: ``rows(start, stop)`` gives the row indices at positions
    [start, stop). ``mode`` is "none", "full" (a uniform permutation) or "block" (chunk order
    shuffled, rows shuffled within windows of ``window_chunks`` chunks). ``chunk_rows``: rows
    per chunk (a sequence or an int64 array; only the block shuffle uses it)."""

    n: int
    mode: str = "none"
    seed: int = 0
    epoch: int = 0
    chunk_rows: Sequence[int] | np.ndarray = field(default=(), compare=False)
    window_chunks: int = 4

    def __post_init__(self) -> None:
        if self.mode not in SHUFFLE_MODES:
            raise ValueError(f"shuffle mode must be one of {SHUFFLE_MODES}, got {self.mode!r}")
        if self.mode == "block":
            if int(np.sum(np.asarray(self.chunk_rows, dtype=np.int64))) != self.n:
                raise ValueError("block shuffle needs chunk_rows summing to n")
            if self.window_chunks < 1:
                raise ValueError("window_chunks must be >= 1")
        key = derive_key(self.seed, self.epoch, 0x5EED)
        object.__setattr__(self, "_key", key)
        if self.mode == "full":
            object.__setattr__(self, "_perm", Permutation(self.n, key))
        elif self.mode == "block":
            rows = np.asarray(self.chunk_rows, dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
            nchunks = len(rows)
            corder = Permutation(nchunks, derive_key(key, 1))(np.arange(nchunks))
            prow = rows[corder]
            pcum = np.concatenate([[0], np.cumsum(prow)]).astype(np.int64)
            nwin = (nchunks + self.window_chunks - 1) // self.window_chunks
            wbound = pcum[np.minimum(np.arange(nwin + 1) * self.window_chunks, nchunks)]
            object.__setattr__(self, "_starts", starts)
            object.__setattr__(self, "_corder", corder)
            object.__setattr__(self, "_pcum", pcum)
            object.__setattr__(self, "_wbound", wbound)
            object.__setattr__(self, "_wperm", {})

    def __len__(self) -> int:
        return self.n

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.at(np.arange(start, stop, dtype=np.int64))

    def at(self, positions) -> np.ndarray:
        """Row indices at arbitrary positions of the epoch."""
        p = np.asarray(positions, dtype=np.int64)
        if self.mode == "none":
            if p.size and (p.min() < 0 or p.max() >= self.n):
                raise IndexError(f"positions out of range for {self.n} rows")
            return p.copy()
        if self.mode == "full":
            return self._perm(p)
        return self._block(p)

    def _block(self, p: np.ndarray) -> np.ndarray:
        if p.size and (p.min() < 0 or p.max() >= self.n):
            raise IndexError(f"positions out of range for {self.n} rows")
        wb = self._wbound
        win = np.searchsorted(wb, p, side="right") - 1
        out = np.empty_like(p)
        for w in np.unique(win):
            sel = win == w
            lo, hi = int(wb[w]), int(wb[w + 1])
            perm = self._wperm.get(w)
            if perm is None:
                perm = Permutation(hi - lo, derive_key(self._key, 2, int(w)))
                if len(self._wperm) > 64:
                    self._wperm.clear()
                self._wperm[w] = perm
            local = perm(p[sel] - lo) + lo  # position within the permuted-chunk sequence
            pc = np.searchsorted(self._pcum, local, side="right") - 1
            chunk = self._corder[pc]
            out[sel] = self._starts[chunk] + (local - self._pcum[pc])
        return out


@dataclass(frozen=True)
class Shard:
    """The positions [start, start + count) of an epoch order that one rank reads; with padding,
    positions past the end wrap around to the start (as torch's DistributedSampler does)."""

    start: int
    count: int
    total: int

    def positions(self, lo: int, hi: int) -> np.ndarray:
        """Epoch positions of this shard's local positions [lo, hi)."""
        if lo < 0 or hi > self.count or lo > hi:
            raise IndexError(f"local positions [{lo}, {hi}) outside this shard's {self.count}")
        p = np.arange(self.start + lo, self.start + hi, dtype=np.int64)
        return p % self.total if self.total else p


def shard_for(total: int, rank: int = 0, world: int = 1, uneven: Tail | str = Tail.PAD) -> Shard:
    """Rank ``rank`` of ``world``'s share of an epoch of ``total`` rows: contiguous, equal counts.

    ``uneven="pad"`` repeats rows from the start so every rank has ceil(total/world) rows;
    ``"drop"`` drops the tail so every rank has floor(total/world)."""
    if world < 1 or not (0 <= rank < world):
        raise ValueError(f"invalid rank {rank} for world size {world}")
    pad = Tail.coerce(uneven) is Tail.PAD
    per = -(-total // world) if pad else total // world
    if pad and total == 0:
        per = 0
    return Shard(start=rank * per, count=per, total=total)


class RowSelection:
    """A subset of a table's rows, as the user gave it: a slice, integer positions (negative
    count from the end) or a boolean mask. Resolved against a table by
    ``TableReader.select_rows``; shuffling, sharding and resume then run over the subset."""

    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        if isinstance(key, RowSelection):
            key = key.key
        elif isinstance(key, range):
            key = slice(key.start, key.stop, key.step)
        elif not isinstance(key, slice):
            arr = np.array(key)
            if arr.dtype != bool and arr.dtype.kind not in "iu":
                if arr.size or arr.ndim != 1:
                    raise TypeError(
                        f"indices must be integer row positions, a boolean mask or a slice, got "
                        f"an array of {arr.dtype}"
                    )
                arr = arr.astype(np.int64)
            if arr.ndim != 1:
                raise ValueError(f"indices must be one-dimensional, got shape {arr.shape}")
            arr.setflags(write=False)
            key = arr
        self.key = key

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RowSelection):
            return NotImplemented
        a, b = self.key, other.key
        if isinstance(a, slice) or isinstance(b, slice):
            return a == b
        return a.dtype == b.dtype and np.array_equal(a, b)

    def __hash__(self) -> int:
        k = self.key
        return hash((k.start, k.stop, k.step) if isinstance(k, slice) else k.tobytes())

    def __repr__(self) -> str:
        k = self.key
        if isinstance(k, slice):
            return f"RowSelection({k!r})"
        what = "mask" if k.dtype == bool else "rows"
        return f"RowSelection(<{len(k)} {what}>)"


@dataclass(frozen=True)
class SubsetOrder:
    """An epoch's order over a subset of rows: ``order`` permutes positions in the subset,
    ``rows`` maps them to the table's row numbers."""

    order: EpochOrder
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.order)

    def at(self, positions) -> np.ndarray:
        return self.rows[self.order.at(positions)]
