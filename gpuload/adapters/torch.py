"""PyTorch front door: ``gpuload.pytorch(table, ...)``.

- no ``batch_size``: a map-style ``torch.utils.data.Dataset`` for ``DataLoader`` (random access
  served from coalesced, cached chunks; ``__getitems__`` reads a whole batch in one go; safe with
  fork, spawn and forkserver workers);
- ``iterable=True``: an ``IterableDataset`` that shuffles itself (seeded, per epoch) and shards
  itself across ranks and DataLoader workers;
- ``batch_size=N``: the batched fast path (threads, bounded prefetch, resume), yielding dicts of
  tensors without torch worker processes.
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
from ..loader import Loader, LoaderOptions, apply_transform, resolve_table, split_rows
from ..sampling import shard_for
from ..table import Table

__all__ = ["pytorch", "TorchDataset", "TorchIterableDataset", "TorchLoader"]


class TorchDataset(Dataset):
    """Map-style dataset: ``ds[i]`` is a dict of the row's columns (or ``transform(row)``)."""

    def __init__(
        self,
        table: Table,
        transform: Callable | None = None,
        columns: Sequence[str] | None = None,
        on_error: str = "raise",
    ) -> None:
        self.table = table
        self.transform = transform
        self.columns = list(columns) if columns is not None else None
        self.on_error = on_error
        table.schema.select(self.columns, table.name)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """A whole batch in one coalesced read (torch's DataLoader calls this when present)."""
        idx = np.asarray([self.table._normalize_index(i) for i in indices], dtype=np.int64)
        data = self.table.read(idx, self.columns)
        if self.transform is None:
            return [r.to_dict() for r in split_rows(self.table, idx, data)]
        stats: dict = {}
        return apply_transform(self.table, self.transform, idx, data, "raise", stats)


class TorchIterableDataset(IterableDataset):
    """Iterable dataset that shuffles itself (seeded, a new order per epoch) and shards itself
    across ranks and DataLoader workers: every row exactly once per epoch across all of them
    (with ``uneven="pad"``, the last rank's shortfall is padded from the start)."""

    def __init__(
        self,
        table: Table,
        transform: Callable | None = None,
        columns: Sequence[str] | None = None,
        shuffle: bool | str = False,
        seed: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        uneven: str = "pad",
        read_rows: int = 256,
    ) -> None:
        self.table = table
        self.transform = transform
        self.columns = list(columns) if columns is not None else None
        table.schema.select(self.columns, table.name)
        self.shuffle = shuffle
        self.seed = 0 if seed is None else int(seed)
        # resolved here, in the parent: a spawned worker would not see an initialised process group
        self.rank, self.world_size = resolve_rank_world(rank, world_size)
        self.uneven = uneven
        self.read_rows = read_rows
        self._epoch = 0
        self._explicit = False
        self._warned = False

    def set_epoch(self, epoch: int) -> None:
        """Use this epoch's order next (call it every epoch when workers are not persistent)."""
        self._epoch = int(epoch)
        self._explicit = True

    def __len__(self) -> int:
        return shard_for(len(self.table), self.rank, self.world_size, self.uneven).count

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self._epoch
        if not self._explicit:
            # No set_epoch: advance per iteration. In a persistent worker (or num_workers=0) this
            # copy lives across epochs, so every worker advances in step.
            self._epoch += 1
            if info is not None and epoch == 0 and not self._warned and self.shuffle:
                self._warned = True
                warnings.warn(
                    "gpuload: with non-persistent DataLoader workers, call dataset.set_epoch(e) each epoch "
                    "(or use persistent_workers=True), otherwise every epoch repeats the first order",
                    stacklevel=2,
                )
        order = self.table.epoch_order(self.shuffle, self.seed, epoch)
        shard = shard_for(len(self.table), self.rank, self.world_size, self.uneven)
        per = math.ceil(shard.count / nw) if shard.count else 0
        lo, hi = min(shard.count, wid * per), min(shard.count, (wid + 1) * per)
        for a in range(lo, hi, self.read_rows):
            b = min(hi, a + self.read_rows)
            rows = order.at(shard.positions(a, b))
            data = self.table.read(rows, self.columns)
            if self.transform is None:
                yield from (r.to_dict() for r in split_rows(self.table, rows, data))
            else:
                yield from apply_transform(self.table, self.transform, rows, data, "raise", {})


class TorchLoader:
    """The batched fast path for PyTorch: iterate for dicts of tensors; ``len()``, ``set_epoch``,
    ``state_dict()``/``load_state_dict()`` (exact mid-epoch resume), ``stats``."""

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

    @property
    def stats(self):
        return self.loader.stats

    @property
    def table(self) -> Table:
        return self.loader.table

    def close(self) -> None:
        self.loader.close()


def pytorch(
    table: Any,
    transform: Callable | None = None,
    *,
    batch_size: int | None = None,
    shuffle: bool | str = False,
    seed: int | None = None,
    drop_last: bool = False,
    columns: Sequence[str] | None = None,
    device: Any = "auto",
    image: Sequence[Any] | None = None,
    decoder: str = "auto",
    decode_options: Any = None,
    iterable: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    uneven: str = "pad",
    prefetch: int = 2,
    num_threads: int | None = None,
    on_error: str = "raise",
    storage_options: Mapping[str, Any] | None = None,
):
    """PyTorch access to a table (a Table, a name, a path or a URL); see the module docstring."""
    t = resolve_table(table, storage_options)
    if batch_size is None:
        if image is not None:
            raise ValueError("image= runs one fused kernel per batch: pass batch_size= to use it")
        if iterable:
            return TorchIterableDataset(
                t, transform, columns, shuffle, seed, rank, world_size, uneven
            )
        if shuffle:
            raise ValueError(
                "a map-style dataset does not shuffle itself: pass shuffle=True to torch's DataLoader, "
                "or use iterable=True / batch_size= for gpuload's own shuffling"
            )
        return TorchDataset(t, transform, columns, on_error)
    opts = LoaderOptions(
        batch_size,
        shuffle,
        seed,
        drop_last,
        tuple(columns) if columns else None,
        prefetch,
        num_threads,
        uneven,
        on_error,
    )
    dev = resolve_device(device)
    tdev = torch.device("cuda", dev.index) if dev.is_cuda else torch.device("cpu")
    r, w = resolve_rank_world(rank, world_size)
    image_columns, factory = (), None
    if image is not None:
        from ..pipeline import image_stage_factory

        image_columns, factory = image_stage_factory(
            t, image, decoder, dev, columns, options=decode_options, seed=seed
        )
    loader = Loader(
        t,
        opts,
        transform=transform,
        image_stage_factory=factory,
        image_columns=image_columns,
        rank=r,
        world_size=w,
        export=lambda b: to_torch(b, tdev),
    )
    return TorchLoader(loader, tdev)
