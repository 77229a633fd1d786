"""Episodes and time windows: which rows each sample of a windowed loader reads.

A windowed loader's samples are anchored at rows. For every windowed column a sample gathers the
rows at ``anchor + offset`` (``window=``, offsets in rows) or at the row nearest to the anchor's
timestamp plus an offset in seconds (``window_seconds=``, LeRobot's ``delta_timestamps``), always
inside the anchor's episode: an offset past either end of the episode repeats the edge row and is
marked in ``<column>_is_pad``. Episodes are runs of equal values in the ``episode=`` column
(each episode's rows contiguous, as LeRobot stores them); the index holds one start and end per
episode, built once per loader by reading the column chunk by chunk.

Everything here is a pure function of the table's episode (and timestamp) columns and the
anchor rows, so shuffling, sharding and resume run over anchors exactly as over plain rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import SchemaError
from .reader import TableReader

__all__ = ["WindowSpec", "Episodes", "WindowIndex", "BatchWindows", "PAD_SUFFIX"]

PAD_SUFFIX = "_is_pad"
MAX_WINDOW = 1 << 16  # offsets per column: a bound on what one sample may gather
_READ_ROWS = 1 << 16  # rows of the episode/timestamp columns read at a time


def _ints(col: str, offsets: Any) -> tuple[int, ...]:
    if isinstance(offsets, (str, bytes)) or not isinstance(offsets, Iterable):
        raise TypeError(f"window[{col!r}] must be a range or a sequence of row offsets")
    out = []
    for o in offsets:
        if isinstance(o, (bool, np.bool_)) or not isinstance(o, (int, np.integer)):
            raise TypeError(f"window[{col!r}]: row offsets are integers, got {o!r}")
        out.append(int(o))
    return _checked(col, out, "window")


def _floats(col: str, offsets: Any) -> tuple[float, ...]:
    if isinstance(offsets, (str, bytes)) or not isinstance(offsets, Iterable):
        raise TypeError(f"window_seconds[{col!r}] must be a sequence of offsets in seconds")
    out = []
    for o in offsets:
        if isinstance(o, (bool, np.bool_)) or not isinstance(o, (int, float, np.number)):
            raise TypeError(f"window_seconds[{col!r}]: offsets are numbers, got {o!r}")
        if not math.isfinite(float(o)):
            raise ValueError(f"window_seconds[{col!r}]: offset {o!r} is not finite")
        out.append(float(o))
    return _checked(col, out, "window_seconds")


def _checked(col: str, out: list, what: str) -> tuple:
    if not isinstance(col, str):
        raise TypeError(f"{what} keys are column names, got {col!r}")
    if not out:
        raise ValueError(f"{what}[{col!r}] has no offsets")
    if len(out) > MAX_WINDOW:
        raise ValueError(f"{what}[{col!r}]: {len(out)} offsets, at most {MAX_WINDOW}")
    return tuple(out)


@dataclass(frozen=True)
class WindowSpec:
    """What a windowed loader gathers: the episode column, row offsets per column (``rows``),
    offsets in seconds per column (``seconds``, matched to ``timestamp`` within
    ``tolerance_s``), and whether anchors whose window leaves the episode are dropped."""

    episode: str
    rows: tuple[tuple[str, tuple[int, ...]], ...] = ()
    seconds: tuple[tuple[str, tuple[float, ...]], ...] = ()
    timestamp: str = "timestamp"
    tolerance_s: float = 1e-4
    drop_incomplete: bool = False

    @classmethod
    def build(
        cls,
        episode: Any,
        window: Mapping[str, Any] | None,
        window_seconds: Mapping[str, Any] | None,
        timestamp: Any,
        tolerance_s: Any,
        drop_incomplete: Any,
    ) -> WindowSpec:
        """Validate the loader options once (types, offsets, no column windowed twice)."""
        if not isinstance(episode, str):
            raise TypeError(f"episode= names the episode column, got {episode!r}")
        for name, m in (("window", window), ("window_seconds", window_seconds)):
            if m is not None and not isinstance(m, Mapping):
                raise TypeError(f"{name}= maps column names to offsets, got {type(m).__name__}")
        rows = tuple((c, _ints(c, o)) for c, o in (window or {}).items())
        secs = tuple((c, _floats(c, o)) for c, o in (window_seconds or {}).items())
        if not rows and not secs:
            raise ValueError(
                f"episode={episode!r} needs window= (offsets in rows) or window_seconds= "
                "(offsets in seconds) naming the columns to gather around each anchor row"
            )
        both = {c for c, _ in rows} & {c for c, _ in secs}
        if both:
            raise ValueError(f"{sorted(both)} given in both window= and window_seconds=")
        if not isinstance(timestamp, str):
            raise TypeError(f"timestamp= names the timestamp column, got {timestamp!r}")
        tol = float(tolerance_s)
        if not (math.isfinite(tol) and tol >= 0):
            raise ValueError(f"tolerance_s must be a finite number >= 0, got {tolerance_s!r}")
        if not isinstance(drop_incomplete, (bool, np.bool_)):
            raise TypeError(f"drop_incomplete must be True or False, got {drop_incomplete!r}")
        return cls(episode, rows, secs, timestamp, tol, bool(drop_incomplete))

    @property
    def columns(self) -> tuple[str, ...]:
        """The windowed columns, in the order given."""
        return tuple(c for c, _ in self.rows) + tuple(c for c, _ in self.seconds)

    def length(self, column: str) -> int:
        """Offsets (frames per sample) of a windowed column."""
        for c, o in self.rows + self.seconds:
            if c == column:
                return len(o)
        raise KeyError(column)


@dataclass(frozen=True)
class Episodes:
    """The episode runs of a table: ``starts[k]``..``ends[k]`` (exclusive) are the rows of run k,
    whose episode value is ``values[k]``; one run per episode (checked)."""

    starts: np.ndarray
    ends: np.ndarray
    values: np.ndarray

    @classmethod
    def from_table(cls, table: TableReader, column: str) -> Episodes:
        """Read ``column`` chunk by chunk (memory: one read plus one entry per episode)."""
        col = table.schema.column(column, table.name)
        if col.kind != "scalar" or col.np_dtype.kind not in "iu":
            raise SchemaError(
                f"table {table.name!r}: episode column {column!r} must hold integer scalars "
                f"(episode ids), it is {col.type_string()}"
            )
        starts, values, last = [], [], None
        n = len(table)
        for lo in range(0, n, _READ_ROWS):
            v = np.asarray(table.read(np.arange(lo, min(n, lo + _READ_ROWS)), [column])[column])
            v = v.astype(np.int64)
            change = np.flatnonzero(v[1:] != v[:-1]) + 1
            if last is None or v[0] != last:
                change = np.concatenate([[0], change])
            starts.append(change + lo)
            values.append(v[change])
            last = v[-1]
        s = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        vals = np.concatenate(values) if values else np.zeros(0, np.int64)
        ends = np.append(s[1:], n).astype(np.int64)
        ep = cls(s.astype(np.int64), ends, vals)
        ep.check_contiguous(table.name, column)
        return ep

    def check_contiguous(self, table: str, column: str) -> None:
        """Refuse an episode whose rows are split into several runs (a window would cross)."""
        order = np.argsort(self.values, kind="stable")
        v = self.values[order]
        dup = np.flatnonzero(v[1:] == v[:-1])
        if dup.size:
            a, b = order[dup[0]], order[dup[0] + 1]
            raise SchemaError(
                f"table {table!r}: episode {int(v[dup[0]])} of column {column!r} is in rows "
                f"{self.starts[a]}-{self.ends[a] - 1} and {self.starts[b]}-{self.ends[b] - 1}: "
                "the rows of an episode must be contiguous (write the table sorted by episode)"
            )

    def of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first row, end row) of the episode of each row."""
        k = np.searchsorted(self.starts, rows, side="right") - 1
        return self.starts[k], self.ends[k]


@dataclass
class BatchWindows:
    """The rows one batch gathers for one windowed column: ``targets`` (B, K) table rows (the
    edge row where padded) and ``pad`` (B, K), True where the offset left the episode."""

    targets: np.ndarray
    pad: np.ndarray

    def unique(self) -> tuple[np.ndarray, np.ndarray]:
        """(distinct rows, (B, K) positions of each target among them): read each row once."""
        rows, inv = np.unique(self.targets, return_inverse=True)
        return rows, inv.reshape(self.targets.shape)


@dataclass
class WindowIndex:
    """A table's episodes (and timestamps, for offsets in seconds), ready to map anchor rows
    to the rows of their windows."""

    spec: WindowSpec
    table: str
    episodes: Episodes
    timestamps: np.ndarray | None = None
    _cols: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, table: TableReader, spec: WindowSpec) -> WindowIndex:
        """Check the windowed columns exist and index the episodes (and timestamps)."""
        for c in spec.columns:
            table.schema.column(c, table.name)
        episodes = Episodes.from_table(table, spec.episode)
        ts = None
        if spec.seconds:
            ts = _timestamps(table, spec.timestamp, episodes)
        return cls(spec, table.name, episodes, ts)

    def complete(self, n: int) -> np.ndarray:
        """Boolean mask of the rows whose every window lies inside their episode
        (``drop_incomplete=True`` keeps only these as anchors)."""
        rows = np.arange(n, dtype=np.int64)
        s, e = self.episodes.of(rows)
        ok = np.ones(n, bool)
        for _, off in self.spec.rows:
            ok &= (rows + min(off) >= s) & (rows + max(off) < e)
        if self.spec.seconds:
            ts, tol = self.timestamps, self.spec.tolerance_s
            for _, off in self.spec.seconds:
                ok &= (ts[rows] + min(off) >= ts[s] - tol) & (
                    ts[rows] + max(off) <= ts[e - 1] + tol
                )
        return ok

    def gather(self, anchors: np.ndarray) -> dict[str, BatchWindows]:
        """The window of every windowed column for a batch of anchor rows."""
        anchors = np.asarray(anchors, np.int64)
        s, e = self.episodes.of(anchors)
        out: dict[str, BatchWindows] = {}
        for col, off in self.spec.rows:
            t = anchors[:, None] + np.asarray(off, np.int64)[None, :]
            pad = (t < s[:, None]) | (t >= e[:, None])
            out[col] = BatchWindows(np.clip(t, s[:, None], e[:, None] - 1), pad)
        for col, off in self.spec.seconds:
            out[col] = self._by_time(col, anchors, s, e, np.asarray(off, np.float64))
        return out

    def _by_time(self, col: str, anchors, s, e, off: np.ndarray) -> BatchWindows:
        ts, tol = self.timestamps, self.spec.tolerance_s
        B, K = len(anchors), len(off)
        targets = np.empty((B, K), np.int64)
        pad = np.empty((B, K), bool)
        for i in range(B):
            a, lo, hi = int(anchors[i]), int(s[i]), int(e[i])
            ep = ts[lo:hi]
            want = ts[a] + off
            j = np.clip(np.searchsorted(ep, want), 1, max(1, hi - lo - 1))
            if hi - lo == 1:
                j = np.zeros(K, np.int64)
            else:
                j = np.where(np.abs(ep[j - 1] - want) <= np.abs(ep[j] - want), j - 1, j)
            outside = (want < ep[0] - tol) | (want > ep[-1] + tol)
            miss = ~outside & (np.abs(ep[j] - want) > tol)
            if miss.any():
                k = int(np.flatnonzero(miss)[0])
                raise ValueError(
                    f"table {self.table!r}, row {a}: window_seconds[{col!r}] offset {off[k]:g} s "
                    f"asks for timestamp {want[k]:.6f}, and the nearest row of its episode "
                    f"(row {lo + int(j[k])}, {ep[j[k]]:.6f}) is more than tolerance_s="
                    f"{tol:g} away: the data cannot serve this window (use offsets on the "
                    "frame grid, or a larger tolerance_s)"
                )
            targets[i] = lo + j
            pad[i] = outside
        return BatchWindows(targets, pad)


def _timestamps(table: TableReader, column: str, episodes: Episodes) -> np.ndarray:
    """The timestamp column as float64 (8 bytes a row), checked non-decreasing in each episode."""
    col = table.schema.column(column, table.name)
    if col.kind != "scalar" or col.np_dtype.kind not in "iuf":
        raise SchemaError(
            f"table {table.name!r}: timestamp column {column!r} must hold numeric scalars "
            f"(seconds), it is {col.type_string()}"
        )
    n = len(table)
    ts = np.empty(n, np.float64)
    for lo in range(0, n, _READ_ROWS):
        hi = min(n, lo + _READ_ROWS)
        ts[lo:hi] = np.asarray(table.read(np.arange(lo, hi), [column])[column], np.float64)
    if not np.isfinite(ts).all():
        bad = int(np.flatnonzero(~np.isfinite(ts))[0])
        raise SchemaError(f"table {table.name!r}, row {bad}: timestamp {ts[bad]} is not finite")
    step = np.diff(ts)
    inside = np.ones(max(0, n - 1), bool)
    inside[episodes.starts[1:] - 1] = False  # the step from one episode to the next
    back = np.flatnonzero(inside & (step < 0))
    if back.size:
        r = int(back[0]) + 1
        raise SchemaError(
            f"table {table.name!r}, row {r}: timestamp {ts[r]} goes back in time within its "
            f"episode (row {r - 1}: {ts[r - 1]}); windows in seconds need ordered timestamps"
        )
    return ts


def stack_window(values: Any, index: np.ndarray) -> Any:
    """A column's values for a batch's windows: ``values`` hold each distinct row once,
    ``index`` (B, K) picks them; arrays become (B, K, ...), lists become lists of lists."""
    if isinstance(values, np.ndarray):
        return values[index]
    return [[values[j] for j in row] for row in index.tolist()]


def window_columns(spec: WindowSpec, loaded: Sequence[str]) -> None:
    """Refuse a windowed column that the loader does not load."""
    missing = [c for c in spec.columns if c not in loaded]
    if missing:
        raise ValueError(
            f"window columns {missing} are not among the loaded columns {list(loaded)}; "
            "add them to columns="
        )
