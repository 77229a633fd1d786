"""The batched fast path: whole batches assembled by a pool of threads, in order, with bounded
prefetch, seeded shuffling, rank sharding and exact mid-epoch resume.

    fetch (coalesced reads) -> decode + fused kernel (image ops) -> transform -> collate
    -> export (DLPack, by the framework adapter)

Framework-free: the adapters pass an ``export`` function that turns a numpy batch into tensors.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .collate import collate_rows
from .errors import TransformError
from .sampling import Shard, shard_for
from .schema import Column
from .table import Table
from .threads import DaemonThreadPool

__all__ = ["LoaderOptions", "Loader", "LoadedRow", "resolve_table"]

log = logging.getLogger("gpuload.loader")


def resolve_table(table: Any, storage_options: Mapping[str, Any] | None = None) -> Table:
    """A Table from a Table, a table name (under the default Client root), a path or a URL."""
    if isinstance(table, Table):
        return table
    if isinstance(table, os.PathLike):
        table = os.fspath(table)
    if not isinstance(table, str):
        raise TypeError(
            f"expected a gpuload Table, a table name, a path or a URL, not {type(table).__name__}"
        )
    from .client import Client
    from .table import open_table

    if "://" in table or os.sep in table or os.path.isdir(table):
        return open_table(table, storage_options=storage_options)
    return Client(storage_options=storage_options).open_table(table)


@dataclass(frozen=True)
class LoaderOptions:
    """How batches are cut and produced (grouped so constructors stay small)."""

    batch_size: int = 128
    shuffle: bool | str = False
    seed: int | None = None
    drop_last: bool = False
    columns: tuple[str, ...] | None = None
    prefetch: int = 2
    num_threads: int | None = None
    uneven: str = "pad"
    on_error: str = "raise"

    def __post_init__(self) -> None:
        if (
            not isinstance(self.batch_size, (int, np.integer))
            or isinstance(self.batch_size, bool)
            or self.batch_size <= 0
        ):
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.uneven not in ("pad", "drop"):
            raise ValueError(f"uneven must be 'pad' or 'drop', got {self.uneven!r}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.shuffle not in (True, False, "full", "block", "none"):
            raise ValueError(
                f"shuffle must be True, False, 'full' or 'block', got {self.shuffle!r}"
            )
        if self.columns is not None:
            object.__setattr__(
                self,
                "columns",
                tuple([self.columns] if isinstance(self.columns, str) else self.columns),
            )


class LoadedRow:
    """A row whose cells were already fetched as part of a batch: what ``transform`` receives.
    Same surface as Row: ``row[col]``, ``row.to_dict()``, ``row.index``, ``keys()``."""

    __slots__ = ("table", "index", "_values")

    def __init__(self, table: Table, index: int, values: dict[str, Any]) -> None:
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


def split_rows(table: Table, rows: np.ndarray, data: Mapping[str, Any]) -> list[LoadedRow]:
    """Per-row views of a column batch (numpy scalars for scalar columns)."""
    out = []
    cols = list(data.items())
    for i, r in enumerate(rows.tolist()):
        out.append(LoadedRow(table, r, {k: v[i] for k, v in cols}))
    return out


def apply_transform(
    table: Table,
    transform: Callable,
    rows: np.ndarray,
    data: Mapping[str, Any],
    on_error: str,
    stats: dict,
) -> list[Any]:
    """Run a per-row transform; an error names the table and row (or drops the row with
    on_error="skip", counted in stats["skipped"])."""
    out = []
    for row in split_rows(table, rows, data):
        try:
            out.append(transform(row))
        except Exception as e:
            if on_error == "skip":
                stats["skipped"] = stats.get("skipped", 0) + 1
                log.debug("transform failed on row %d of %s, skipped: %r", row.index, table.name, e)
                continue
            raise TransformError(
                f"transform raised on row {row.index} of table {table.name!r}: {type(e).__name__}: {e}"
            ) from e
    return out


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


@dataclass
class LoaderStats:
    """Counters a user can read while training (loader-bound vs compute-bound)."""

    batches: int = 0
    rows: int = 0
    skipped: int = 0
    wait_s: float = 0.0
    extra: dict = field(default_factory=dict)


class Loader:
    """Batches of a table, assembled ahead by threads. ``export`` turns a numpy batch (dict of
    arrays / byte lists) into framework tensors; ``image_stage`` (built per loader) decodes and
    transforms image columns in one fused kernel per batch."""

    def __init__(
        self,
        table: Table,
        options: LoaderOptions,
        *,
        transform: Callable | None = None,
        image_stage_factory: Callable[[Table, Sequence[Column], int, int], Any] | None = None,
        image_columns: Sequence[str] = (),
        rank: int = 0,
        world_size: int = 1,
        export: Callable[[Any], Any] | None = None,
    ) -> None:
        self.table = table
        self.options = options
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self.export = export or (lambda b: b)
        cols = table.schema.select(
            list(options.columns) if options.columns is not None else None, table.name
        )
        self.columns = [c.name for c in cols]
        self.image_columns = [c for c in image_columns]
        for c in self.image_columns:
            if c not in self.columns:
                raise ValueError(
                    f"image column {c!r} is not among the loaded columns {self.columns}"
                )
        self.plain_columns = [c for c in self.columns if c not in self.image_columns]
        # Batch-level parallelism. With image decode every core assembles a batch of its own
        # (decode and kernel release the GIL) plus one thread to overlap each batch's Python work
        # (headers, parameters, export): 3 threads measured best on 2 cores. Bytes-only batches
        # are Python-bound: one assembling thread (a second one contends for the GIL and made
        # shuffled reads slower); remote reads still run concurrently inside the fetcher.
        cores = os.cpu_count() or 1
        default = min(cores + 1, 16) if image_stage_factory is not None else 1
        threads = options.num_threads or default
        self.num_threads = threads
        self.window = max(options.prefetch, threads) + 1  # batches submitted ahead of the consumer
        self.slots = self.window + 2  # buffer sets: in flight + the one the user holds + one spare
        self._image_stage_factory = image_stage_factory
        self._image_stage = None
        self._epoch = 0
        self._start = 0  # shard-local position to start the next iteration at
        self._position = 0
        self._current: int | None = None  # the epoch being iterated
        self._stopped: tuple[int, int] | None = (
            None  # (epoch, position) where a consumer stopped early
        )
        self._pool: DaemonThreadPool | None = None
        self._draining: list[Future] = []
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self.stats = LoaderStats()

    # -- sizes -----------------------------------------------------------------------------
    def _shard(self) -> Shard:
        return shard_for(len(self.table), self.rank, self.world_size, self.options.uneven)

    def __len__(self) -> int:
        n = self._shard().count
        bs = self.options.batch_size
        return n // bs if self.options.drop_last else -(-n // bs)

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Use this epoch's order for the next iteration (as DistributedSampler.set_epoch).
        Without it, each new iteration is the next epoch."""
        self._epoch = int(epoch)
        self._start = 0
        self._stopped = None

    # -- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands: the next iteration resumes with exactly the rows not yet seen."""
        if self._current is not None:
            epoch, position = self._current, self._position
        elif self._stopped is not None:
            epoch, position = self._stopped
        else:
            epoch, position = self._epoch, self._start
        return {
            "version": 1,
            "epoch": epoch,
            "position": position,
            "seed": self.options.seed,
            "shuffle": self.options.shuffle,
            "batch_size": self.options.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_rows": len(self.table),
            "table_version": self.table.version,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()``: the same table, seed, shuffle and sharding are required."""
        for key, mine in (
            ("seed", self.options.seed),
            ("shuffle", self.options.shuffle),
            ("num_rows", len(self.table)),
            ("world_size", self.world_size),
            ("rank", self.rank),
        ):
            if state.get(key) != mine:
                raise ValueError(
                    f"cannot resume: the saved loader had {key}={state.get(key)!r}, this one has {mine!r}"
                )
        pos = int(state["position"])
        if pos < 0 or pos > self._shard().count:
            raise ValueError(
                f"cannot resume: position {pos} outside this rank's {self._shard().count} rows"
            )
        self._epoch = int(state["epoch"])
        self._start = pos
        self._current = None
        self._stopped = None

    # -- threads ---------------------------------------------------------------------------
    def _executor(self) -> DaemonThreadPool:
        if self._pid != os.getpid():  # after fork: the parent's threads do not exist here
            self._pool, self._image_stage, self._pid = None, None, os.getpid()
        if self._pool is None:
            self._pool = DaemonThreadPool(self.num_threads, thread_name_prefix="gpuload-loader")
        return self._pool

    def close(self) -> None:
        """Stop the worker threads (they restart on the next iteration)."""
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None and getattr(self, "_pid", None) == os.getpid():
            pool.shutdown(wait=False, cancel_futures=True)

    def _stage(self):
        """The image stage, built once (on first use, in this process) by whichever thread
        gets here first."""
        if self._image_stage is None and self._image_stage_factory is not None:
            with self._lock:
                if self._image_stage is None:
                    cols = [self.table.schema[c] for c in self.image_columns]
                    self._image_stage = self._image_stage_factory(
                        self.table, cols, self.options.batch_size, self.slots, self.num_threads
                    )
        return self._image_stage

    # -- one batch -------------------------------------------------------------------------
    def _assemble(self, ep: _Epoch, b: int) -> tuple[Any, int]:
        bs = self.options.batch_size
        lo = ep.start + b * bs
        hi = min(lo + bs, ep.shard.count)
        rows = ep.order.at(ep.shard.positions(lo, hi))
        data = self.table.read(rows, self.plain_columns) if self.plain_columns else {}
        keep = None
        images = {}
        stage = self._stage()
        if stage is not None:
            images, keep = stage.run(
                self.table,
                rows,
                slot=b % self.slots,
                epoch=ep.epoch,
                on_error=self.options.on_error,
            )
            if keep is not None:  # rows dropped by on_error="skip"
                self.stats.skipped += int(len(rows) - keep.sum())
                rows = rows[keep]
                data = {k: _take(v, keep) for k, v in data.items()}
        if self.transform is not None:
            extra: dict = {}
            outs = apply_transform(
                self.table, self.transform, rows, data, self.options.on_error, extra
            )
            self.stats.skipped += extra.get("skipped", 0)
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

    # -- iteration -------------------------------------------------------------------------
    def _begin(self) -> _Epoch:
        epoch = self._epoch
        shard = self._shard()
        order = self.table.epoch_order(self.options.shuffle, self.options.seed, epoch)
        start = self._start
        rest = shard.count - start
        bs = self.options.batch_size
        nb = rest // bs if self.options.drop_last else -(-rest // bs)
        self._start = 0
        return _Epoch(epoch, shard, order, start, max(0, nb))

    def __iter__(self) -> Iterator[Any]:
        import time

        self._drain()
        ep = self._begin()
        self._current, self._position, self._stopped = ep.epoch, ep.start, None
        pool = self._executor()
        pending: deque[tuple[int, Future]] = deque()
        next_b = 0
        try:
            while True:
                while next_b < ep.nbatches and len(pending) < self.window:
                    pending.append((next_b, pool.submit(self._assemble, ep, next_b)))
                    next_b += 1
                if not pending:
                    break
                b, fut = pending.popleft()
                t0 = time.perf_counter()
                batch, consumed = fut.result()
                out = self.export(batch)
                self.stats.wait_s += time.perf_counter() - t0
                self._position += consumed
                self.stats.batches += 1
                self.stats.rows += consumed
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
