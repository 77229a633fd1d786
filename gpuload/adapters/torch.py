"""PyTorch front door: ``gpuload.pytorch(table, ...)`` / ``Table.pytorch(...)``.

- no ``batch_size``: a map-style ``torch.utils.data.Dataset`` for ``DataLoader`` (random access
  served from coalesced, cached chunks; ``__getitems__`` reads a whole batch in one go; safe with
  fork, spawn and forkserver workers);
- ``iterable=True``: an ``IterableDataset`` that shuffles itself (seeded, per epoch) and shards
  itself across ranks and DataLoader workers;
- ``batch_size=N``: the batched fast path (threads, bounded prefetch, resume), yielding dicts of
  tensors without torch worker processes.

Each mode honours every option it accepts and refuses the others, naming the mode that would
honour them. This module only converts: batching, order and resume live in ``loader.py``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from ..device import resolve_device
from ..distributed import resolve_rank_world
from ..export import to_torch
from ..loader import (
    Loader,
    LoaderFront,
    draw_seed,
    make_loader,
    read_columns,
    refuse_pointless_skip,
    split_rows,
    subset_digest,
    transformed,
    window_anchors,
)
from ..reader import TableReader
from ..sampling import SubsetOrder, shard_for
from ..spec import WINDOW_OPTIONS, LoaderSpec, OnError, refuse_unused

__all__ = [
    "torch_front_door",
    "torch_sampler",
    "torch_spec",
    "TorchDataset",
    "TorchIterableDataset",
    "TorchLoader",
    "TorchSampler",
]

MAP_STYLE = "the map-style dataset (no batch_size, iterable=False)"
ITERABLE = "the iterable dataset (iterable=True, no batch_size)"
ITERABLE_OPTIONS = (
    "columns",
    "indices",
    "shuffle",
    "seed",
    "epoch",
    "rank",
    "world_size",
    "uneven",
    "on_error",
)
TO_BATCHED = "pass batch_size= for gpuload's batched fast path, which honours every option"


# torch DataLoader options, and what gpuload's batched loader uses instead
TORCH_NAMES = {
    "num_workers": "num_threads=",
    "prefetch_factor": "prefetch=",
    "persistent_workers": "nothing (its threads live as long as the loader)",
}


def torch_spec(options: Mapping[str, Any]) -> LoaderSpec:
    """The LoaderSpec of a torch front door's options; torch's DataLoader option names get one
    clear error saying what gpuload uses instead, and why."""
    used = [n for n in TORCH_NAMES if n in options]
    if used:
        instead = "; ".join(f"{n} -> {TORCH_NAMES[n]}" for n in used)
        raise TypeError(
            f"{', '.join(f'{n}={options[n]!r}' for n in used)}: gpuload's batched loader "
            f"(batch_size=) assembles batches on threads in this process, not in worker "
            f"processes, so it takes other options ({instead}). For torch's DataLoader with "
            f"worker processes, leave out batch_size= and pass these to "
            f"DataLoader(gpuload.pytorch(t), ...)"
        )
    return LoaderSpec(**options)


def torch_front_door(
    table: TableReader,
    spec: LoaderSpec,
    transform: Callable | None = None,
    *,
    iterable: bool = False,
    pin_memory: bool = False,
):
    """The dataset or loader a spec asks for (see the module docstring).

    ``pin_memory=True`` (batched path) is for batches made on the host: they come as
    page-locked CPU tensors, as from ``DataLoader(pin_memory=True)``, with ``device="auto"``
    too (on a GPU machine it then keeps them on the host instead of moving them to the GPU);
    with ``device="cuda"`` and no image ops they are pinned and copied to the GPU from there,
    asynchronously. Image ops on the GPU make their batches there: pin_memory is refused.
    Without CUDA there is nothing to pin for and batches are as usual."""
    if spec.batch_size is not None:
        if iterable:
            raise ValueError(
                "iterable=True yields rows for torch's DataLoader to batch; with batch_size= "
                "gpuload batches itself (drop iterable=True, or batch_size= for the DataLoader)"
            )
        dev = resolve_device(spec.device)
        tdev = torch.device("cuda", dev.index) if dev.is_cuda else torch.device("cpu")
        copy_to = None  # where pinned batches are then copied to (None: they stay on the host)
        if pin_memory and dev.is_cuda:
            if spec.image is not None:
                raise ValueError(
                    "pin_memory=True pins host batches for fast copies to the GPU; with "
                    f"image= ops and device={spec.device!r} the batches are made on the GPU "
                    "already (pass device='cpu' to make them on the host and pin them)"
                )
            if _auto(spec.device):
                tdev = torch.device("cpu")  # host batches, pinned, as DataLoader(pin_memory=True)
            else:
                copy_to = tdev  # device="cuda" asked for: copied from the pinned batch
        pin = pin_memory and torch.cuda.is_available()  # without CUDA: nothing to pin for

        def export(b):
            if not pin:
                return to_torch(b, tdev)
            return _pinned(to_torch(b, None), copy_to)

        return TorchLoader(make_loader(table, spec, transform=transform, export=export), tdev)
    if pin_memory:
        raise ValueError(
            "pin_memory=True: gpuload's datasets hand rows to torch's DataLoader, which pins "
            "batches itself: pass pin_memory=True to DataLoader(...)"
        )
    if iterable:
        refuse_unused(spec, ITERABLE, ITERABLE_OPTIONS, TO_BATCHED)
        if transform is None:
            refuse_pointless_skip(spec)
        return TorchIterableDataset(table, spec, transform)
    if spec.shuffle.value != "none":
        raise ValueError(
            "a map-style dataset does not shuffle itself: pass shuffle=True to torch's DataLoader "
            "(or sampler=...), or use iterable=True / batch_size= for gpuload's own shuffling"
        )
    refuse_unused(
        spec,
        MAP_STYLE,
        ("columns", "indices", "episode", *WINDOW_OPTIONS),
        "torch's DataLoader does the rest of the work here (batching, order, workers); "
        f"{TO_BATCHED}, or iterable=True for {', '.join(ITERABLE_OPTIONS[2:])}",
    )
    subset = table.select_rows(spec.indices) if spec.indices is not None else None
    return TorchDataset(table, transform, spec.columns, subset=subset, spec=spec)


SAMPLER_OPTIONS = ("shuffle", "seed", "epoch", "rank", "world_size", "uneven", "indices")


def torch_sampler(table: TableReader, spec: LoaderSpec) -> TorchSampler:
    """The resumable sampler for a map-style dataset over the same table (or rows of it)."""
    refuse_unused(
        spec,
        "torch_sampler (indices for torch's DataLoader)",
        SAMPLER_OPTIONS,
        "columns, batching and the rest belong to the dataset and the DataLoader",
    )
    subset = table.select_rows(spec.indices) if spec.indices is not None else None
    return TorchSampler(table, subset, spec)


def _auto(device: Any) -> bool:
    """Whether ``device`` leaves the choice to gpuload ("auto" or None)."""
    return device is None or (isinstance(device, str) and device == "auto")


def _pinned(batch: Any, copy_to: torch.device | None = None) -> Any:
    """CPU tensors of a batch copied into page-locked memory (what DataLoader(pin_memory=True)
    does), so ``.to("cuda", non_blocking=True)`` overlaps the copy; with ``copy_to``, that copy
    is made here (asynchronously, on the current stream)."""
    if isinstance(batch, torch.Tensor):
        if batch.device.type != "cpu":
            return batch
        pinned = batch.pin_memory()
        return pinned if copy_to is None else pinned.to(copy_to, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _pinned(v, copy_to) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_pinned(v, copy_to) for v in batch)
    return batch


class TorchDataset(Dataset):
    """Map-style dataset: ``ds[i]`` is a dict of the row's columns (or ``transform(row)``);
    over a ``subset`` of rows (from ``select_rows``), ``ds[i]`` is the subset's i-th row. With
    windows (``spec.episode``), ``ds[i]`` is the window anchored at row i (``(K, ...)`` values
    and ``<column>_is_pad``); with ``drop_incomplete`` only complete windows are counted."""

    def __init__(
        self,
        table: TableReader,
        transform: Callable | None = None,
        columns: Sequence[str] | None = None,
        subset: np.ndarray | None = None,
        spec: LoaderSpec | None = None,
    ) -> None:
        self.table = table
        self.transform = transform
        self.columns = list(columns) if columns is not None else None
        self.subset = subset
        loaded = [c.name for c in table.schema.select(self.columns, table.name)]
        self.windows = None
        if spec is not None and spec.windows is not None:
            self.windows, self.subset = window_anchors(table, spec, loaded, subset)
            self.columns = loaded

    def __len__(self) -> int:
        return len(self.subset) if self.subset is not None else len(self.table)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """A whole batch in one coalesced read (torch's DataLoader calls this when present)."""
        if self.subset is None:
            idx = self.table.select_rows(np.asarray(indices, dtype=np.int64))
        else:
            idx = self.subset[_positions(indices, len(self.subset), self.table.name)]
        if self.windows is not None:
            data = read_columns(self.table, idx, self.columns, self.windows.gather(idx))
        else:
            data = self.table.read(idx, self.columns)
        if self.transform is None:
            return [r.to_dict() for r in split_rows(self.table, idx, data)]
        outs = transformed(self.table, self.transform, idx, data, OnError.RAISE, [0])
        return [out for _, out in outs]


def _positions(indices: Sequence[int], n: int, name: str) -> np.ndarray:
    """Positions in a subset of ``n`` rows (negative count from the end); IndexError outside."""
    pos = np.asarray(indices, dtype=np.int64)
    pos = np.where(pos < 0, pos + n, pos)
    bad = np.flatnonzero((pos < 0) | (pos >= n))
    if bad.size:
        raise IndexError(f"index {indices[bad[0]]} out of range for {n} rows of table {name!r}")
    return pos


def _refuse_other(state: Mapping[str, Any], identity: Mapping[str, Any], what: str) -> None:
    """ValueError unless a saved state was made over the same rows, shuffle and sharding."""
    for key, mine in identity.items():
        if state.get(key) != mine:
            raise ValueError(
                f"cannot resume: the saved {what} had {key}={state.get(key)!r}, this one has "
                f"{mine!r}"
            )


class TorchIterableDataset(IterableDataset):
    """Iterable dataset that shuffles itself (seeded, a new order per epoch) and shards itself
    across ranks and DataLoader workers: every row exactly once per epoch across all of them
    (with ``uneven="pad"``, the last rank's shortfall is padded from the start).

    ``state_dict()`` / ``load_state_dict()`` resume exactly: in this process, or per worker
    through torchdata's StatefulDataLoader (which saves and restores each worker's copy)."""

    read_rows = 256  # rows fetched per read

    def __init__(self, table: TableReader, spec: LoaderSpec, transform: Callable | None = None):
        self.table = table
        self.transform = transform
        self.columns = list(spec.columns) if spec.columns is not None else None
        table.schema.select(self.columns, table.name)
        self.subset = table.select_rows(spec.indices) if spec.indices is not None else None
        self.shuffle = spec.shuffle
        # resolved here, in the parent: a spawned worker would not see an initialised process group
        self.rank, self.world_size = resolve_rank_world(spec.rank, spec.world_size)
        # drawn here, in the parent, so every worker agrees (and every rank: see draw_seed)
        self.seed = spec.seed if spec.seed is not None else draw_seed(self.world_size)
        self.uneven = spec.uneven
        self.on_error = spec.on_error
        self.skipped = 0
        self._epoch = spec.epoch or 0
        self._explicit = spec.epoch is not None
        self._warned = False
        self._at: list[int] | None = None  # [epoch, position in this copy's share] while iterating
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Use this epoch's order next (call it every epoch when workers are not persistent).
        After ``load_state_dict``, setting the saved epoch keeps the resume position."""
        self._epoch = int(epoch)
        self._explicit = True
        if self._resume is not None and self._resume[0] != self._epoch:
            self._resume = None

    def _shard(self):
        total = len(self.subset) if self.subset is not None else len(self.table)
        return shard_for(total, self.rank, self.world_size, self.uneven)

    def __len__(self) -> int:
        return self._shard().count

    def _next_epoch(self, in_worker: bool) -> tuple[int, int]:
        """(epoch, start position) of the pass that begins now."""
        if self._resume is not None:
            (epoch, start), self._resume = self._resume, None
            self._epoch = epoch + 1
            return epoch, start
        epoch = self._epoch
        if not self._explicit:
            # No set_epoch: advance per iteration. In a persistent worker (or num_workers=0) this
            # copy lives across epochs, so every worker advances in step.
            self._epoch += 1
            if in_worker and epoch == 0 and not self._warned and self.shuffle.value != "none":
                self._warned = True
                warnings.warn(
                    "gpuload: with non-persistent DataLoader workers, call dataset.set_epoch(e) "
                    "each epoch (or use persistent_workers=True), otherwise every epoch repeats "
                    "the first order",
                    stacklevel=3,
                )
        return epoch, 0

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start = self._next_epoch(info is not None)
        order = self.table.epoch_order(self.shuffle, self.seed, epoch, self.subset)
        shard = self._shard()
        per = math.ceil(shard.count / nw) if shard.count else 0
        lo, hi = min(shard.count, wid * per), min(shard.count, (wid + 1) * per)
        self._at = at = [epoch, start]
        for a in range(min(hi, lo + start), hi, self.read_rows):
            rows = order.at(shard.positions(a, min(hi, a + self.read_rows)))
            data = self.table.read(rows, self.columns)
            if self.transform is None:
                for r in split_rows(self.table, rows, data):
                    at[1] += 1
                    yield r.to_dict()
                continue
            skipped, base = [0], at[1]
            for i, out in transformed(
                self.table, self.transform, rows, data, self.on_error, skipped
            ):
                at[1] = base + i + 1
                yield out
            at[1] = base + len(rows)
            self.skipped += skipped[0]
        self._at = None

    def state_dict(self) -> dict[str, Any]:
        """Where this copy stands (plain JSON): the pass under way and the rows of its share
        already handed out, or the next pass."""
        epoch, pos = self._at if self._at is not None else (self._epoch, 0)
        if self._resume is not None:
            epoch, pos = self._resume
        return {"epoch": epoch, "position": pos, "seed": self.seed, **self._identity()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The next pass continues the saved one after the rows it had handed out."""
        _refuse_other(state, self._identity(), "dataset")
        self.seed = int(state["seed"])
        self._resume = (int(state["epoch"]), int(state["position"]))
        self._at = None

    def _identity(self) -> dict[str, Any]:
        total = len(self.subset) if self.subset is not None else len(self.table)
        return {
            "num_rows": total,
            "subset": subset_digest(self.subset),
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle": self.shuffle.value,
        }


class TorchLoader(LoaderFront):
    """The batched fast path for PyTorch: iterate for dicts of tensors (each pass is the next
    epoch); ``len()``, ``set_epoch``, ``state_dict()``/``load_state_dict()`` (exact mid-epoch
    resume), ``stats()``."""

    def __init__(self, loader: Loader, device: torch.device) -> None:
        super().__init__(loader)
        self.device = device

    def __getitem__(self, index: Any) -> Any:
        raise TypeError(
            "gpuload.pytorch(t, batch_size=N) is already a loader: iterate it (for batch in "
            "loader) and it batches, shuffles and prefetches on its own threads. To use torch's "
            "DataLoader instead, leave out batch_size= (gpuload.pytorch(t) is a map-style "
            "Dataset; iterable=True an IterableDataset) and give the DataLoader batch_size="
        )


class TorchSampler(Sampler[int]):
    """Indices for a map-style gpuload dataset: seeded, a new order each epoch, this rank's share
    only (DDP-aware), and resumable. ``StatefulDataLoader(ds, sampler=...)`` (torchdata)
    checkpoints and resumes it exactly, workers included; with torch's plain ``DataLoader``,
    ``sampler.state_dict()`` counts the indices handed out, which equals the rows delivered
    without worker processes (workers fetch ahead).

    A completed pass moves the sampler to the next epoch; ``set_epoch`` picks one (as
    ``DistributedSampler``). Creating an iterator changes nothing (DataLoader creates more than
    one per pass), and a pass stopped early is not an epoch: the next pass repeats its order."""

    chunk = 4096  # positions ordered per step

    def __init__(self, table: TableReader, subset: np.ndarray | None, spec: LoaderSpec) -> None:
        self.table = table
        self.subset = subset
        self.shuffle = spec.shuffle
        self.rank, self.world_size = resolve_rank_world(spec.rank, spec.world_size)
        self.seed = spec.seed if spec.seed is not None else draw_seed(self.world_size)
        self.uneven = spec.uneven
        self._epoch = spec.epoch or 0  # the epoch the next pass uses
        self._resume = 0  # and the position it starts at (set by load_state_dict)
        self._active: _SamplerIterator | None = None  # the pass under way
        self._total = len(subset) if subset is not None else len(table)
        self._shard = shard_for(self._total, self.rank, self.world_size, self.uneven)

    def __len__(self) -> int:
        return self._shard.count

    def set_epoch(self, epoch: int) -> None:
        """Use this epoch's order next. After ``load_state_dict``, setting the saved epoch keeps
        the resume position (a training loop calls ``set_epoch(e)`` at every epoch's start)."""
        if int(epoch) != self._epoch:
            self._resume = 0
        self._epoch, self._active = int(epoch), None

    def __iter__(self) -> _SamplerIterator:
        return _SamplerIterator(self, self._epoch, self._resume)

    def positions(self, epoch: int, lo: int, hi: int) -> np.ndarray:
        """Dataset positions at this rank's epoch positions [lo, hi)."""
        order = self.table.epoch_order(self.shuffle, self.seed, epoch, self.subset)
        order = order.order if isinstance(order, SubsetOrder) else order
        return order.at(self._shard.positions(lo, hi))

    def state_dict(self) -> dict[str, Any]:
        """Where the next index comes from: the pass under way and how many indices it has
        handed out (or the next pass), with the seed; plain JSON."""
        it = self._active
        epoch, yielded = (it.epoch, it.yielded) if it is not None else (self._epoch, self._resume)
        return {"epoch": epoch, "yielded": yielded, "seed": self.seed, **self._identity()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The next pass continues the saved one after the indices it had handed out."""
        self._check(state)
        self._epoch, self._resume = int(state["epoch"]), int(state["yielded"])
        self.seed, self._active = int(state["seed"]), None

    def _identity(self) -> dict[str, Any]:
        return {
            "num_rows": self._total,
            "rank": self.rank,
            "world_size": self.world_size,
            "subset": subset_digest(self.subset),
            "shuffle": self.shuffle.value,
        }

    def _check(self, state: Mapping[str, Any]) -> None:
        _refuse_other(state, self._identity(), "sampler")
        if not 0 <= int(state.get("yielded", 0)) <= self._shard.count:
            raise ValueError(f"cannot resume: yielded={state.get('yielded')!r} out of range")


class _SamplerIterator:
    """One pass of a TorchSampler. Stateful on its own too: torchdata's StatefulDataLoader
    snapshots sampler iterators alongside their sampler."""

    def __init__(self, sampler: TorchSampler, epoch: int, yielded: int) -> None:
        self.sampler, self.epoch, self.yielded = sampler, epoch, yielded
        self._buf: list[int] = []

    def __iter__(self) -> _SamplerIterator:
        return self

    def __next__(self) -> int:
        s = self.sampler
        if not self._buf:
            n = len(s)
            if self.yielded >= n:
                if s._active is self:  # a completed pass: the sampler moves to the next epoch
                    s._epoch, s._resume, s._active = self.epoch + 1, 0, None
                raise StopIteration
            hi = min(n, self.yielded + s.chunk)
            self._buf = s.positions(self.epoch, self.yielded, hi).tolist()[::-1]
        s._active = self
        self.yielded += 1
        return self._buf.pop()

    def state_dict(self) -> dict[str, Any]:
        s = self.sampler
        return {"epoch": self.epoch, "yielded": self.yielded, "seed": s.seed, **s._identity()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the saved pass after the indices it had handed out."""
        s = self.sampler
        s.load_state_dict(state)
        self.epoch, self.yielded, self._buf = s._epoch, s._resume, []
