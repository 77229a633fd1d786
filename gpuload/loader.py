"""The batched loader: whole batches assembled by a pool of threads, in order, with bounded
prefetch, seeded shuffling, rank sharding and exact mid-epoch resume.

    read (coalesced, verified) -> image stage (decode + fused kernel) -> transform -> collate
    -> export (DLPack, by the framework adapter)

Framework-free: the adapters pass an ``export`` function that turns a numpy batch into tensors.
``make_loader(reader, spec, ...)`` is the one place a Loader and its image stage are built.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from .collate import collate_rows
from .device import resolve_device
from .distributed import resolve_rank_world
from .errors import TransformError
from .image_stage import ImageStageFactory, image_stage_factory
from .ragged import pad_ragged
from .reader import TableReader
from .sampling import Shard, Shuffle, shard_for
from .spec import LoaderSpec, OnError
from .stats import LoaderStats, StageClock
from .threads import DaemonThreadPool
from .windows import PAD_SUFFIX, BatchWindows, WindowIndex, stack_window, window_columns

__all__ = [
    "Loader",
    "LoaderFront",
    "LoadedRow",
    "make_loader",
    "draw_seed",
    "refuse_pointless_skip",
    "subset_digest",
    "transformed",
    "read_columns",
    "window_anchors",
    "LENGTH_SUFFIX",
]

log = logging.getLogger("gpuload.loader")

LENGTH_SUFFIX = "_length"  # the lengths of a padded ragged column (pad_ragged=)

STATE_VERSION = 2


def draw_seed(world_size: int = 1) -> int:
    """The seed for ``seed=None``: a random 63-bit one in a single process (recorded in the
    loader's state, so a resume needs no seed); 0 when several ranks share the epoch, which
    must agree on one order without talking to each other (as torch's DistributedSampler)."""
    if world_size > 1:
        return 0
    return int.from_bytes(os.urandom(8), "little") >> 1


def subset_digest(rows: np.ndarray | None) -> str | None:
    """A short fingerprint of a row subset, kept in loader states so a resume over other rows
    is refused (None: the whole table)."""
    if rows is None:
        return None
    return hashlib.blake2b(
        np.ascontiguousarray(rows, np.int64).tobytes(), digest_size=8
    ).hexdigest()


def refuse_pointless_skip(spec: LoaderSpec) -> None:
    """on_error="skip" leaves out rows whose image cannot be decoded or whose transform raises;
    with neither it would be accepted and do nothing. (Read and integrity errors always raise:
    skipping them would hide damage.)"""
    if spec.on_error is OnError.SKIP:
        raise ValueError(
            "on_error='skip' skips rows whose image cannot be decoded or whose transform raises, "
            "and this loader has neither (no image= ops, no transform)"
        )


def make_loader(
    reader: TableReader,
    spec: LoaderSpec,
    *,
    transform: Callable | None = None,
    export: Callable[[Any], Any] | None = None,
) -> Loader:
    """Build the batched loader a spec asks for: rank and world resolved, the seed drawn when
    none was given, the image stage prepared (it is built in the loader's process on first use).
    ``spec.batch_size`` is required; ``decoder``/``decode_options`` need ``image`` ops."""
    if spec.batch_size is None:
        raise ValueError("a batched loader needs batch_size=")
    if spec.image is None:
        unused = [n for n in ("decoder", "decode_options") if n in spec.given()]
        if unused:
            raise ValueError(f"{', '.join(unused)} only apply to image= ops, and none were given")
        if transform is None:
            refuse_pointless_skip(spec)
    rank, world = resolve_rank_world(spec.rank, spec.world_size)
    factory, image_columns = None, ()
    if spec.image is not None:
        image_columns, factory = image_stage_factory(
            reader,
            spec.image,
            spec.decoder,
            resolve_device(spec.device),
            spec.columns,
            options=spec.decode_options,
        )
    return Loader(
        reader,
        spec,
        transform=transform,
        image_stage=factory,
        image_columns=image_columns,
        rank=rank,
        world_size=world,
        export=export,
    )


def window_anchors(
    reader: TableReader, spec: LoaderSpec, columns: Sequence[str], subset: np.ndarray | None
) -> tuple[WindowIndex, np.ndarray | None]:
    """The episode index of a windowed spec, and the anchor rows: with ``drop_incomplete``
    the rows (of ``subset``, when given) whose every window lies inside their episode."""
    ws = spec.windows
    for c in (ws.episode, *ws.columns):
        reader.schema.column(c, reader.name)  # SchemaError naming the table and its columns
    window_columns(ws, columns)
    clash = [c + PAD_SUFFIX for c in ws.columns if c + PAD_SUFFIX in columns]
    if clash:
        raise ValueError(f"columns {clash} would be shadowed by the windows' pad masks")
    index = WindowIndex.build(reader, ws)
    if ws.drop_incomplete:
        ok = index.complete(len(reader))
        subset = np.flatnonzero(ok) if subset is None else subset[ok[subset]]
    return index, subset


def read_columns(
    table: TableReader,
    rows: np.ndarray,
    columns: Sequence[str],
    wins: Mapping[str, BatchWindows] | None,
) -> dict[str, Any]:
    """``columns`` of ``rows``; with windows, a windowed column is read once per distinct row
    its windows need and comes as (B, K, ...) (lists of lists for bytes and text), with its
    ``<column>_is_pad`` mask (B, K)."""
    if wins is None:
        return table.read(rows, list(columns)) if columns else {}
    flat = [c for c in columns if c not in wins]
    data = table.read(rows, flat) if flat else {}
    for c in columns:
        if c in wins:
            distinct, index = wins[c].unique()
            data[c] = stack_window(table.read(distinct, [c])[c], index)
    for c, w in wins.items():
        data[c + PAD_SUFFIX] = w.pad
    return data


class LoadedRow:
    """A row whose cells were already fetched as part of a batch: what ``transform`` receives.
    Same surface as Row: ``row[col]``, ``row.to_dict()``, ``row.index``, ``keys()``."""

    __slots__ = ("table", "index", "_values")

    def __init__(self, table: TableReader, index: int, values: dict[str, Any]) -> None:
        self.table = table
        self.index = index
        self._values = values

    def __getitem__(self, column: str) -> Any:
        try:
            return self._values[column]
        except KeyError:
            self.table.schema.column(column, self.table.name)  # unknown column: the usual error
            raise KeyError(
                f"column {column!r} was not loaded (columns={list(self._values)})"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """A new mutable dict of the loaded columns (arrays are copies)."""
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self._values.items()}

    def keys(self) -> list[str]:
        return list(self._values)

    def __iter__(self):
        return iter(self._values)

    def __contains__(self, column: object) -> bool:
        return column in self._values

    def __repr__(self) -> str:
        return f"LoadedRow({self.table.name!r}, {self.index})"


def split_rows(table: TableReader, rows: np.ndarray, data: Mapping[str, Any]) -> list[LoadedRow]:
    """Per-row views of a column batch (numpy scalars for scalar columns)."""
    out = []
    cols = list(data.items())
    for i, r in enumerate(rows.tolist()):
        out.append(LoadedRow(table, r, {k: v[i] for k, v in cols}))
    return out


def transformed(
    table: TableReader,
    transform: Callable,
    rows: np.ndarray,
    data: Mapping[str, Any],
    on_error: OnError,
    skipped: list[int],
) -> Iterator[tuple[int, Any]]:
    """(position in ``rows``, transform(row)) for each row; an error names the table and row
    (or drops the row with on_error="skip", counted in ``skipped[0]``)."""
    for i, row in enumerate(split_rows(table, rows, data)):
        try:
            out = transform(row)
        except Exception as e:
            if on_error is OnError.SKIP:
                skipped[0] += 1
                log.debug("transform failed on row %d of %s, skipped: %r", row.index, table.name, e)
                continue
            raise TransformError(
                f"transform raised on row {row.index} of table {table.name!r}: {type(e).__name__}: {e}"
            ) from e
        yield i, out


def collate_outputs(outputs: Sequence[Any]) -> Any:
    """Collate transform outputs: dicts by key, tuples/lists by position, else a list."""
    if not outputs:
        return {}
    first = outputs[0]
    if isinstance(first, Mapping):
        return collate_rows(outputs)
    if isinstance(first, (tuple, list)):
        cols = collate_rows([{i: v for i, v in enumerate(o)} for o in outputs])
        return (
            type(first)(cols[i] for i in range(len(first)))
            if isinstance(first, tuple)
            else [cols[i] for i in range(len(first))]
        )
    return collate_rows([{0: o} for o in outputs])[0]


@dataclass
class _Epoch:
    epoch: int
    shard: Shard
    order: Any
    start: int
    nbatches: int
    ahead: int = 0  # the first batch whose blocks the read-ahead has not fully started
    sections: int = 0  # the first batch whose sections the read-ahead has not asked for
    want: int = 0  # the read-ahead goes on up to this batch (exclusive)
    planning: Future | None = None  # the read-ahead's task, while it runs


class Loader:
    """Batches of a table, assembled ahead by threads. Each pass over one loader is the next
    epoch (as with torch's DataLoader); ``set_epoch`` picks one; ``state_dict`` resumes exactly.
    Built by ``make_loader``."""

    READ_AHEAD = 8  # batches whose cache blocks a remote table downloads ahead
    REMOTE_THREADS = 4  # assembling threads for bytes-only batches of an uncached remote table

    def __init__(
        self,
        reader: TableReader,
        spec: LoaderSpec,
        *,
        transform: Callable | None = None,
        image_stage: ImageStageFactory | None = None,
        image_columns: Sequence[str] = (),
        rank: int = 0,
        world_size: int = 1,
        export: Callable[[Any], Any] | None = None,
    ) -> None:
        if spec.batch_size is None:
            raise ValueError("a batched loader needs batch_size=")
        self.table = reader
        self.spec = spec
        self.batch_size: int = spec.batch_size
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self.export = export or (lambda b: b)
        self.seed = spec.seed if spec.seed is not None else draw_seed(world_size)
        # the rows every epoch runs over: a subset (spec.indices), else the whole table
        self.subset = reader.select_rows(spec.indices) if spec.indices is not None else None
        cols = reader.schema.select(list(spec.columns) if spec.columns else None, reader.name)
        self.columns = [c.name for c in cols]
        self.image_columns = list(image_columns)
        for c in self.image_columns:
            if c not in self.columns:
                raise ValueError(
                    f"image column {c!r} is not among the loaded columns {self.columns}"
                )
        self.plain_columns = [c for c in self.columns if c not in self.image_columns]
        self.ragged_columns = self._ragged(reader, spec, transform)
        self.windows: WindowIndex | None = None
        if spec.windows is not None:
            self.windows, self.subset = window_anchors(reader, spec, self.columns, self.subset)
        # Batch-level parallelism. With image decode every core assembles a batch of its own
        # (decode and kernel release the GIL) plus one thread to overlap each batch's Python work
        # (headers, parameters, export): 3 threads measured best on 2 cores. Bytes-only batches
        # are Python-bound: one assembling thread (a second one contends for the GIL and made
        # shuffled reads slower, local or from the block cache); remote reads still run
        # concurrently inside the fetcher, and a cached remote table reads ahead (_read_ahead).
        # A remote table read without the cache waits on the network for every batch: there
        # REMOTE_THREADS batches are fetched at once (2.1k -> 4.0k rows/s at 20 ms a request).
        cores = os.cpu_count() or 1
        if image_stage is not None:
            default = min(cores + 1, 16)
        else:
            default = 1 if reader.is_cached else self.REMOTE_THREADS
        self.num_threads = spec.num_threads or default
        # batches submitted ahead of the consumer, and the output buffer sets they cycle
        # through: those in flight + the one the user holds + one spare
        self.prefetch_depth = max(spec.prefetch, self.num_threads) + 1
        self.ring_size = self.prefetch_depth + 2
        self._stage_factory = image_stage
        self._stage = None
        self._slot = 0  # the output slot of the next batch submitted
        self._epoch = spec.epoch or 0
        self._start = 0  # shard-local position to start the next iteration at
        self._position = 0
        self._current: int | None = None  # the epoch being iterated
        self._stopped: tuple[int, int] | None = None  # (epoch, position) of an early stop
        self._pool: DaemonThreadPool | None = None
        self._ahead: DaemonThreadPool | None = None  # the read-ahead's thread (remote, cached)
        self._draining: list[Future] = []
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._clock = StageClock()
        self._counts = {"batches": 0, "rows": 0, "skipped": 0}
        self._first_batch_s: float | None = None
        if image_stage is not None:  # compile the kernel while the caller gets ready to iterate
            image_stage.warm_up()

    # -- sizes -----------------------------------------------------------------------------
    @property
    def total_rows(self) -> int:
        """Rows in one epoch across all ranks: the subset's, else the table's."""
        return len(self.subset) if self.subset is not None else len(self.table)

    def shard(self) -> Shard:
        """This rank's share of an epoch."""
        return shard_for(self.total_rows, self.rank, self.world_size, self.spec.uneven)

    @property
    def num_rows(self) -> int:
        """Rows this rank reads per epoch (with ``uneven="pad"``, padded rows included)."""
        return self.shard().count

    def __len__(self) -> int:
        n = self.num_rows
        bs = self.batch_size
        return n // bs if self.spec.drop_last else -(-n // bs)

    @property
    def image_plan(self) -> Any:
        """The compiled image ops every image column shares (output shape and dtype), or None
        without image ops or when columns have ops of their own (see ``image_plans``)."""
        return self._stage_factory.plan if self._stage_factory is not None else None

    @property
    def image_plans(self) -> dict[str, Any]:
        """Each transformed image column's compiled ops."""
        return dict(self._stage_factory.plans) if self._stage_factory is not None else {}

    def window_length(self, column: str) -> int:
        """Rows a sample gathers from ``column`` (its leading dimension after the batch's), or
        0 when the column is not windowed."""
        ws = self.spec.windows
        return ws.length(column) if ws is not None and column in ws.columns else 0

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Use this epoch's order for the next iteration (as DistributedSampler.set_epoch).
        Without it, each new iteration is the next epoch. After ``load_state_dict``, setting
        the saved epoch keeps the resume position (training loops call it every epoch)."""
        if int(epoch) != self._epoch:
            self._start = 0
        self._epoch = int(epoch)
        self._stopped = None

    def stats(self) -> LoaderStats:
        """Counters and per-stage seconds so far (see ``LoaderStats``)."""
        stage = self._stage
        stages = self._clock.snapshot()
        return LoaderStats(
            **self._counts,
            wait_s=stages["wait"],
            time_to_first_batch_s=self._first_batch_s,
            stages=stages,
            images=stage.counters() if stage is not None else {},
        )

    # -- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands, as plain JSON: the next iteration resumes with exactly the
        rows not yet seen. The seed is included (also a drawn one), so a resume needs none."""
        if self._current is not None:
            epoch, position = self._current, self._position
        elif self._stopped is not None:
            epoch, position = self._stopped
        else:
            epoch, position = self._epoch, self._start
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "position": position,
            "seed": self.seed,
            "shuffle": self.spec.shuffle.value,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_rows": self.total_rows,
            "subset": subset_digest(self.subset),
            "windows": self._windows_key(),
            "table_version": self.table.version,
        }

    def _windows_key(self) -> str | None:
        """What a sample is (episode column and windows), for a resume to check."""
        ws = self.spec.windows
        if ws is None:
            return None
        return hashlib.sha256(repr(ws).encode()).hexdigest()[:16]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()``: the same table, shuffle and sharding are required, and
        the same seed unless this loader was built without one (it then takes the saved one)."""
        if not isinstance(state, Mapping) or "position" not in state or "epoch" not in state:
            raise ValueError("cannot resume: not a gpuload loader state (no epoch/position)")
        checks = [
            ("shuffle", Shuffle.coerce(state.get("shuffle")), self.spec.shuffle),
            ("num_rows", state.get("num_rows"), self.total_rows),
            ("subset", state.get("subset"), subset_digest(self.subset)),
            ("windows", state.get("windows"), self._windows_key()),
            ("world_size", state.get("world_size"), self.world_size),
            ("rank", state.get("rank"), self.rank),
        ]
        if self.spec.seed is not None:
            checks.append(("seed", state.get("seed"), self.seed))
        for key, saved, mine in checks:
            if saved != mine:
                shown = saved.value if isinstance(saved, Shuffle) else saved
                mine = mine.value if isinstance(mine, Shuffle) else mine
                raise ValueError(
                    f"cannot resume: the saved loader had {key}={shown!r}, this one has {mine!r}"
                )
        pos = int(state["position"])
        if pos < 0 or pos > self.num_rows:
            raise ValueError(
                f"cannot resume: position {pos} outside this rank's {self.num_rows} rows"
            )
        if state.get("seed") is not None:
            self.seed = int(state["seed"])
        self._epoch = int(state["epoch"])
        self._start = pos
        self._current = None
        self._stopped = None

    # -- threads ---------------------------------------------------------------------------
    def _executor(self) -> DaemonThreadPool:
        if self._pid != os.getpid():  # after fork: the parent's threads do not exist here
            self._pool, self._ahead, self._stage, self._pid = None, None, None, os.getpid()
        if self._pool is None:
            self._pool = DaemonThreadPool(self.num_threads, thread_name_prefix="gpuload-loader")
        return self._pool

    def close(self) -> None:
        """Stop the worker threads (they restart on the next iteration)."""
        if self._pid == os.getpid():
            for pool in (self._pool, self._ahead):
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._ahead = None

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            for pool in (getattr(self, "_pool", None), getattr(self, "_ahead", None)):
                if pool is not None:
                    pool.shutdown(wait=False, cancel_futures=True)

    def image_stage(self):
        """The image stage, built once (on first use, in this process) by whichever thread
        gets here first; None without image ops."""
        if self._stage is None and self._stage_factory is not None:
            with self._lock:
                if self._stage is None:
                    cols = [self.table.schema[c] for c in self.image_columns]
                    frames = {c: self.window_length(c) for c in self.image_columns}
                    self._stage = self._stage_factory(
                        self.table,
                        cols,
                        self.batch_size,
                        self.ring_size,
                        self.num_threads,
                        frames={c: k for c, k in frames.items() if k},
                    )
        return self._stage

    # -- one batch -------------------------------------------------------------------------
    def _assemble(self, ep: _Epoch, b: int, slot: int, alone: bool = False) -> tuple[Any, int]:
        bs, clock = self.batch_size, self._clock
        lo = ep.start + b * bs
        hi = min(lo + bs, ep.shard.count)
        rows = ep.order.at(ep.shard.positions(lo, hi))
        wins = self.windows.gather(rows) if self.windows is not None else None
        with clock.time("read"):
            data = self._read_plain(rows, wins)
        images: dict = {}
        stage = self.image_stage()
        if stage is not None:
            images, keep = stage.run(
                self.table,
                rows,
                slot=slot,
                seed=self.seed,
                epoch=ep.epoch,
                on_error=self.spec.on_error,
                clock=clock,
                windows=wins,
                alone=alone,
            )
            if alone:
                stage.release_solo()
            if keep is not None:  # rows dropped by on_error="skip"
                self._count("skipped", int(len(rows) - keep.sum()))
                rows = rows[keep]
                data = {k: _take(v, keep) for k, v in data.items()}
        if self.spec.pad_ragged is not False:
            data = self._pad_ragged(data)
        if self.transform is not None:
            with clock.time("transform"):
                skipped = [0]
                outs = [
                    out
                    for _, out in transformed(
                        self.table, self.transform, rows, data, self.spec.on_error, skipped
                    )
                ]
                self._count("skipped", skipped[0])
            with clock.time("collate"):
                batch = collate_outputs(outs)
                if isinstance(batch, dict):
                    batch.update(images)
        else:
            batch = dict(data)
            batch.update(images)
        if isinstance(batch, dict):
            batch = {c: batch[c] for c in self.columns if c in batch} | {
                k: v for k, v in batch.items() if k not in self.columns
            }
        return batch, hi - lo

    def _read_plain(self, rows: np.ndarray, wins: dict[str, BatchWindows] | None) -> dict:
        """The batch's columns that are not decoded here (windowed ones as (B, K, ...))."""
        return read_columns(self.table, rows, self.plain_columns, wins)

    def _ragged(self, reader: TableReader, spec: LoaderSpec, transform: Any) -> list[str]:
        """The loaded ragged columns; refuse ``pad_ragged`` where it would do nothing."""
        ragged = [c for c in self.plain_columns if reader.schema[c].is_ragged]
        if spec.pad_ragged is False:
            return ragged
        if not ragged:
            raise ValueError(
                f"pad_ragged={spec.pad_ragged!r}: none of the loaded columns is ragged"
            )
        clash = [c + LENGTH_SUFFIX for c in ragged if c + LENGTH_SUFFIX in self.columns]
        if clash:
            raise ValueError(f"columns {clash} would be shadowed by pad_ragged's lengths")
        if transform is not None:
            raise ValueError(
                "pad_ragged= pads whole batches; a per-row transform gets each row's array "
                "(pad in the transform, or leave out transform=)"
            )
        return ragged

    def _pad_ragged(self, data: dict[str, Any]) -> dict[str, Any]:
        """Ragged columns as (B, [K,] L, *inner) arrays and ``<column>_length`` (``pad_ragged``)."""
        pr = self.spec.pad_ragged
        max_len = None if pr is True else int(pr)
        for c in self.ragged_columns:
            col, v = self.table.schema[c], data[c]
            k = self.window_length(c)
            flat = [a for row in v for a in row] if k else v
            try:
                padded, lengths = pad_ragged(flat, col.shape, col.np_dtype, max_len)
            except ValueError as e:
                raise ValueError(f"table {self.table.name!r}, column {c!r}: {e}") from None
            if k:
                padded = padded.reshape(len(v), k, *padded.shape[1:])
                lengths = lengths.reshape(len(v), k)
            data[c], data[c + LENGTH_SUFFIX] = padded, lengths
        return data

    def need_padded_ragged(self, door: str) -> None:
        """Refuse ragged columns left as lists where ``door`` needs whole arrays (TF, JAX)."""
        if self.ragged_columns and self.spec.pad_ragged is False:
            raise ValueError(
                f"{door} needs arrays of one shape per batch, and columns "
                f"{self.ragged_columns} are ragged: pass pad_ragged=True (pad each batch to its "
                "longest row) or pad_ragged=N (a fixed length), or leave them out with columns="
            )

    def _batch_rows(self, ep: _Epoch, k: int) -> np.ndarray:
        """The rows batch ``k`` reads: its anchors and, with windows, every row of theirs."""
        lo = ep.start + k * self.batch_size
        rows = ep.order.at(ep.shard.positions(lo, min(lo + self.batch_size, ep.shard.count)))
        if self.windows is None:
            return rows
        wins = self.windows.gather(rows)
        return np.unique(np.concatenate([rows, *(w.targets.ravel() for w in wins.values())]))

    def _read_ahead(self, ep: _Epoch, b: int) -> None:
        """Remote tables with the block cache: have the blocks (and the sections read whole)
        of the ``READ_AHEAD`` batches from batch ``b`` on downloaded, so their round trips
        overlap the batches being assembled. Planned on a thread of its own, so the loop
        handing out batches never waits on a round trip."""
        if not self.table.prefetches:
            return
        ep.want = min(b + self.READ_AHEAD, ep.nbatches)
        if ep.planning is None or ep.planning.done():
            if self._ahead is None:
                self._ahead = DaemonThreadPool(1, thread_name_prefix="gpuload-readahead")
            ep.planning = self._ahead.submit(self._plan_ahead, ep)

    def _plan_ahead(self, ep: _Epoch) -> None:
        """Start the downloads of batches ``ep.ahead`` to ``ep.want``, each planned once (the
        fetcher skips blocks cached or in flight); stops at the first batch its bound on
        downloads outstanding leaves incomplete, taken up again at the next batch. A failure
        is left to the batch that needs the same bytes to raise."""
        rows = self._batch_rows
        try:
            # first what the batches read whole (offsets, small columns), all at once: their
            # blocks are what planning the rest waits for
            for k in range(max(ep.ahead, ep.sections), ep.want):  # each batch's once
                self.table.prefetch_sections(rows(ep, k), self.columns)
            ep.sections = max(ep.sections, ep.want)
            while ep.ahead < ep.want:
                if not self.table.prefetch(rows(ep, ep.ahead), self.columns):
                    return
                ep.ahead += 1
        except Exception as e:  # noqa: BLE001 - the batch reading these rows reports it
            log.debug("read-ahead of batch %d failed: %s", ep.ahead, e)

    def _count(self, key: str, n: int) -> None:
        if n:
            with self._lock:
                self._counts[key] += n

    # -- iteration -------------------------------------------------------------------------
    def _begin(self) -> _Epoch:
        epoch = self._epoch
        shard = self.shard()
        order = self.table.epoch_order(self.spec.shuffle, self.seed, epoch, self.subset)
        start = self._start
        rest = shard.count - start
        bs = self.batch_size
        nb = rest // bs if self.spec.drop_last else -(-rest // bs)
        self._start = 0
        return _Epoch(epoch, shard, order, start, max(0, nb))

    def __iter__(self) -> Iterator[Any]:
        started = time.perf_counter()
        self._drain()
        ep = self._begin()
        self._current, self._position, self._stopped = ep.epoch, ep.start, None
        pool = self._executor()
        pending: deque[tuple[int, Future]] = deque()
        next_b = 0
        try:
            while True:
                # the loader's very first batch is assembled alone, with the cores to itself
                depth = 1 if self._first_batch_s is None else self.prefetch_depth
                while next_b < ep.nbatches and len(pending) < depth:
                    # output slots rotate across epochs, so a new epoch's first batches do not
                    # land in the slots of the last ones (still held by the consumer)
                    slot, self._slot = self._slot, (self._slot + 1) % self.ring_size
                    job = pool.submit(self._assemble, ep, next_b, slot, depth == 1)
                    pending.append((next_b, job))
                    next_b += 1
                    self._read_ahead(ep, next_b)
                if not pending:
                    break
                _, fut = pending.popleft()
                t0 = time.perf_counter()
                batch, consumed = fut.result()
                t1 = time.perf_counter()
                out = self.export(batch)
                t2 = time.perf_counter()
                self._clock.add("wait", t1 - t0)
                self._clock.add("export", t2 - t1)
                if self._first_batch_s is None:
                    self._first_batch_s = t2 - started
                self._position += consumed
                with self._lock:
                    self._counts["batches"] += 1
                    self._counts["rows"] += consumed
                yield out
            # the epoch is complete: the next iteration is the next epoch, from its start
            self._epoch = ep.epoch + 1
            self._current = None
        finally:
            if self._current is not None:
                # Stopped early: state_dict() still says where (to checkpoint and resume with
                # load_state_dict); a new iteration is a new epoch, as with torch's DataLoader.
                self._stopped = (ep.epoch, self._position)
                self._epoch = ep.epoch + 1
                self._current = None
            ep.want = 0  # the read-ahead stops at its next batch
            for _, fut in pending:
                fut.cancel()
            # Batches already running are not waited for here, so an error or Ctrl-C reaches
            # the caller at once; the next iteration waits for them before reusing buffers.
            self._draining = [fut for _, fut in pending if not fut.cancelled()]

    def _drain(self) -> None:
        """Wait for batches still running from an iteration that stopped early."""
        draining, self._draining = self._draining, []
        if self._pid != os.getpid():
            return  # a forked child: those threads (and their buffers) were the parent's
        for fut in draining:
            try:
                fut.result()
            except BaseException:  # noqa: BLE001 - the consumer has gone; nothing to report to
                log.debug("a prefetched batch failed after the consumer stopped", exc_info=True)


def _take(v: Any, keep: np.ndarray) -> Any:
    if isinstance(v, np.ndarray):
        return v[keep]
    return [x for x, k in zip(v, keep) if k]


class LoaderFront:
    """What a framework's batched loader shows of the ``Loader`` behind it (iterate for
    batches, each pass the next epoch; ``len()``, ``set_epoch``, ``state_dict()`` /
    ``load_state_dict()`` for exact mid-epoch resume, ``stats()``, ``close()``); the adapters
    add their framework's parts."""

    def __init__(self, loader: Loader) -> None:
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def stats(self):
        return self.loader.stats()

    @property
    def table(self) -> TableReader:
        return self.loader.table

    def close(self) -> None:
        self.loader.close()
