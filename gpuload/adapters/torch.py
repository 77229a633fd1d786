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
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..device import resolve_device
from ..distributed import resolve_rank_world
from ..export import to_torch
from ..loader import (
    Loader,
    apply_transform,
    draw_seed,
    make_loader,
    refuse_pointless_skip,
    split_rows,
)
from ..reader import TableReader
from ..sampling import shard_for
from ..spec import LoaderSpec, OnError, refuse_unused
from ..stats import LoaderStats

__all__ = ["torch_front_door", "TorchDataset", "TorchIterableDataset", "TorchLoader"]

MAP_STYLE = "the map-style dataset (no batch_size, iterable=False)"
ITERABLE = "the iterable dataset (iterable=True, no batch_size)"
ITERABLE_OPTIONS = (
    "columns",
    "shuffle",
    "seed",
    "epoch",
    "rank",
    "world_size",
    "uneven",
    "on_error",
)
TO_BATCHED = "pass batch_size= for gpuload's batched fast path, which honours every option"


def torch_front_door(
    table: TableReader,
    spec: LoaderSpec,
    transform: Callable | None = None,
    *,
    iterable: bool = False,
):
    """The dataset or loader a spec asks for (see the module docstring)."""
    if spec.batch_size is not None:
        if iterable:
            raise ValueError(
                "iterable=True yields rows for torch's DataLoader to batch; with batch_size= "
                "gpuload batches itself (drop iterable=True, or batch_size= for the DataLoader)"
            )
        dev = resolve_device(spec.device)
        tdev = torch.device("cuda", dev.index) if dev.is_cuda else torch.device("cpu")
        loader = make_loader(table, spec, transform=transform, export=lambda b: to_torch(b, tdev))
        return TorchLoader(loader, tdev)
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
        ("columns",),
        "torch's DataLoader does the rest of the work here (batching, order, workers); "
        f"{TO_BATCHED}, or iterable=True for {', '.join(ITERABLE_OPTIONS[1:])}",
    )
    return TorchDataset(table, transform, spec.columns)


class TorchDataset(Dataset):
    """Map-style dataset: ``ds[i]`` is a dict of the row's columns (or ``transform(row)``)."""

    def __init__(
        self,
        table: TableReader,
        transform: Callable | None = None,
        columns: Sequence[str] | None = None,
    ) -> None:
        self.table = table
        self.transform = transform
        self.columns = list(columns) if columns is not None else None
        table.schema.select(self.columns, table.name)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """A whole batch in one coalesced read (torch's DataLoader calls this when present)."""
        idx = np.asarray([self.table.row_index(i) for i in indices], dtype=np.int64)
        data = self.table.read(idx, self.columns)
        if self.transform is None:
            return [r.to_dict() for r in split_rows(self.table, idx, data)]
        return apply_transform(self.table, self.transform, idx, data, OnError.RAISE, [0])


class TorchIterableDataset(IterableDataset):
    """Iterable dataset that shuffles itself (seeded, a new order per epoch) and shards itself
    across ranks and DataLoader workers: every row exactly once per epoch across all of them
    (with ``uneven="pad"``, the last rank's shortfall is padded from the start)."""

    read_rows = 256  # rows fetched per read

    def __init__(self, table: TableReader, spec: LoaderSpec, transform: Callable | None = None):
        self.table = table
        self.transform = transform
        self.columns = list(spec.columns) if spec.columns is not None else None
        table.schema.select(self.columns, table.name)
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

    def set_epoch(self, epoch: int) -> None:
        """Use this epoch's order next (call it every epoch when workers are not persistent)."""
        self._epoch = int(epoch)
        self._explicit = True

    def __len__(self) -> int:
        return shard_for(len(self.table), self.rank, self.world_size, self.uneven).count

    def _next_epoch(self, in_worker: bool) -> int:
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
        return epoch

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        order = self.table.epoch_order(self.shuffle, self.seed, self._next_epoch(info is not None))
        shard = shard_for(len(self.table), self.rank, self.world_size, self.uneven)
        per = math.ceil(shard.count / nw) if shard.count else 0
        lo, hi = min(shard.count, wid * per), min(shard.count, (wid + 1) * per)
        for a in range(lo, hi, self.read_rows):
            rows = order.at(shard.positions(a, min(hi, a + self.read_rows)))
            data = self.table.read(rows, self.columns)
            if self.transform is None:
                yield from (r.to_dict() for r in split_rows(self.table, rows, data))
                continue
            skipped = [0]
            yield from apply_transform(
                self.table, self.transform, rows, data, self.on_error, skipped
            )
            self.skipped += skipped[0]


class TorchLoader:
    """The batched fast path for PyTorch: iterate for dicts of tensors (each pass is the next
    epoch); ``len()``, ``set_epoch``, ``state_dict()``/``load_state_dict()`` (exact mid-epoch
    resume), ``stats()``."""

    def __init__(self, loader: Loader, device: torch.device) -> None:
        self.loader = loader
        self.device = device

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

    def stats(self) -> LoaderStats:
        return self.loader.stats()

    @property
    def table(self) -> TableReader:
        return self.loader.table

    def close(self) -> None:
        self.loader.close()
