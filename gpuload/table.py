"""The public table: a read-only snapshot with rows (``t[i]``, ``t[a:b]``) and batch streams
(``t.batches``, ``t.pytorch``, ``t.tensorflow``), over the reader at the bottom of the read path.
Framework adapters are imported only when a framework front door is used."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .fetch import CacheOptions, FetchOptions
from .loader import Loader, make_loader
from .reader import ColumnValues, TableReader
from .schema import Column
from .spec import LoaderSpec, with_spec_options

__all__ = ["Table", "Row", "Rows", "open_table"]


def open_table(
    url: str | os.PathLike,
    storage_options: Mapping[str, Any] | None = None,
    cache: CacheOptions | bool | str | None = None,
    fetch: FetchOptions | None = None,
) -> Table:
    """Open the table stored at a local path or fsspec URL (s3://, gs://, https://, memory://...)."""
    return Table.open(os.fspath(url), storage_options=storage_options, cache=cache, fetch=fetch)


class Table(TableReader):
    """A read-only snapshot of a table: ``t[i]`` is a Row, ``t[a:b]`` / ``t[[...]]`` / a boolean
    mask are Rows; ``batches``, ``pytorch`` and ``tensorflow`` stream it. Picklable."""

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return Row(self, self.row_index(key))
        if isinstance(key, str):
            raise TypeError(
                f"table[{key!r}]: index rows with integers, slices or lists; "
                f"read a column with table.batches(columns=[{key!r}]) or table[:][{key!r}]"
            )
        return Rows(self, self.select_rows(key))

    def split(self, fractions: Sequence[float], seed: int = 0) -> list[Rows]:
        """Disjoint subsets for train/val/test: ``t.split([0.8, 0.1, 0.1], seed=0)``. Each row
        goes to one part, drawn by a seeded permutation (the same seed gives the same parts on
        every machine); ``fractions`` sum to 1 (or are row counts summing to ``len(t)``). Each
        part keeps its rows in table order (fast to read); loaders shuffle it."""
        return [Rows(self, rows) for rows in split_rows_by(len(self), fractions, seed)]

    def __iter__(self) -> Iterator[Row]:
        for i in range(len(self)):
            yield Row(self, i)

    # -- streams (the same options as every front door: gpuload.LoaderSpec) -------------------
    @with_spec_options(exclude=("batch_size",))
    def batches(self, batch_size: int, **options: Any) -> Loader:
        """Iterate over the table in batches: dicts of column -> list of bytes/str or stacked
        numpy array (framework-free). Returns the loader: each pass over it is the next epoch;
        ``len()``, ``set_epoch``, ``state_dict()``/``load_state_dict()``, ``stats()``."""
        spec = LoaderSpec(batch_size=batch_size, **options)
        if spec.image is None and "device" in spec.given():
            raise ValueError(
                f"device={spec.device!r}: t.batches() returns host numpy arrays; device= picks "
                "where image= ops run, and none were given"
            )
        return make_loader(self, spec)

    @with_spec_options()
    def pytorch(
        self,
        transform: Callable | None = None,
        *,
        iterable: bool = False,
        pin_memory: bool = False,
        **options: Any,
    ):
        """PyTorch access (``gpuload.pytorch(self, ...)``): a map-style Dataset without
        ``batch_size``, an IterableDataset with ``iterable=True``, else the batched fast path.
        ``pin_memory=True`` (batched, CPU batches): page-locked batches where CUDA exists, for
        fast copies to the GPU; without CUDA there is nothing to pin for and batches are as
        usual."""
        from .adapters.torch import torch_front_door, torch_spec

        spec = torch_spec(options)
        return torch_front_door(self, spec, transform, iterable=iterable, pin_memory=pin_memory)

    @with_spec_options()
    def jax(self, *, sharding: Any = None, **options: Any):
        """JAX access (``gpuload.jax(self, ...)``): batches as dicts of ``jax.Array``, zero copy
        on the CPU; ``sharding=`` lays each batch out across devices and hosts (see
        ``gpuload.adapters.jax``)."""
        from .adapters.jax import jax_front_door

        return jax_front_door(self, LoaderSpec(**options), sharding=sharding)

    def torch_sampler(
        self,
        *,
        shuffle: bool | str = True,
        seed: int | None = None,
        epoch: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        uneven: str = "pad",
        indices: Any = None,
    ):
        """``gpuload.torch_sampler(self, ...)``: resumable indices for ``gpuload.pytorch(self)``
        with torch's DataLoader or torchdata's StatefulDataLoader (shuffled by default, as
        torch's RandomSampler and DistributedSampler)."""
        from .adapters.torch import torch_sampler

        spec = LoaderSpec(shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                          world_size=world_size, uneven=uneven, indices=indices)  # fmt: skip
        return torch_sampler(self, spec)

    @with_spec_options()
    def tensorflow(self, *, input_context: Any = None, label: Any = None, **options: Any):
        """A ``tf.data.Dataset`` (``gpuload.tensorflow(self, ...)``): rows without ``batch_size``,
        whole batches from the fast path with it; images channels-last; ``label=`` a column (or
        a tuple of columns) for ``(features, label)`` elements that ``model.fit`` takes."""
        from .adapters.tensorflow import tf_front_door

        return tf_front_door(self, LoaderSpec(**options), input_context=input_context, label=label)


class Row:
    """One row of a table, read lazily: ``row[col]`` fetches that cell."""

    __slots__ = ("table", "index")

    def __init__(self, table: Table, index: int) -> None:
        self.table = table
        self.index = index

    def __getitem__(self, column: str) -> Any:
        col = self.table.schema.column(column, self.table.name)
        return _cell(self.table.read_column(np.array([self.index], dtype=np.int64), col), col)

    def to_dict(self, columns: Sequence[str] | None = None) -> dict[str, Any]:
        """A new mutable dict of all (or the named) columns of this row."""
        data = self.table.read([self.index], columns)
        return {name: _cell(v, self.table.schema[name]) for name, v in data.items()}

    async def get_async(self, column: str) -> Any:
        """``await row.get_async(col)``: fetch a cell without blocking the event loop."""
        return await self.table.get_async(self.index, column)

    def keys(self) -> list[str]:
        return self.table.columns

    def __iter__(self):
        return iter(self.table.columns)

    def __contains__(self, column: object) -> bool:
        return column in self.table.schema

    def __repr__(self) -> str:
        return f"Row({self.table.name!r}, {self.index})"


def _cell(values: ColumnValues, col: Column) -> Any:
    v = values[0]
    if col.kind in ("array", "ragged"):
        return np.array(v)  # an owned copy, not a view into the batch buffer
    return v


class Rows:
    """Several rows (from a slice or a list of indices): ``rows[col]`` reads a column."""

    def __init__(self, table: Table, indices: np.ndarray) -> None:
        self.table = table
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.table.read(self.indices, [key])[key]
        if isinstance(key, (int, np.integer)):
            n = len(self.indices)
            j = int(key) + n if key < 0 else int(key)
            if not 0 <= j < n:
                raise IndexError(f"index {key} out of range for {n} rows")
            return Row(self.table, int(self.indices[j]))
        return Rows(self.table, self.indices[key])

    def __iter__(self) -> Iterator[Row]:
        for i in self.indices:
            yield Row(self.table, int(i))

    def to_dict(self, columns: Sequence[str] | None = None) -> dict[str, ColumnValues]:
        return self.table.read(self.indices, columns)

    def __repr__(self) -> str:
        return f"Rows({self.table.name!r}, {len(self)} rows)"

    # -- the same streams as a table's, over these rows only ----------------------------------
    def _subset(self, options: dict[str, Any]) -> dict[str, Any]:
        if options.get("indices") is not None:
            raise ValueError(
                "indices= selects rows of a table; these are already a subset (t[...] or "
                "t.split()): index the table once, or index these rows (rows[...])"
            )
        return {**options, "indices": self.indices}

    @with_spec_options(exclude=("batch_size", "indices"))
    def batches(self, batch_size: int, **options: Any) -> Loader:
        """``Table.batches`` over these rows only (shuffle, shards and resume included)."""
        return self.table.batches(batch_size, **self._subset(options))

    @with_spec_options(exclude=("indices",))
    def pytorch(
        self,
        transform: Callable | None = None,
        *,
        iterable: bool = False,
        pin_memory: bool = False,
        **options: Any,
    ):
        """``Table.pytorch`` over these rows only."""
        return self.table.pytorch(
            transform, iterable=iterable, pin_memory=pin_memory, **self._subset(options)
        )

    @with_spec_options(exclude=("indices",))
    def jax(self, *, sharding: Any = None, **options: Any):
        """``Table.jax`` over these rows only."""
        return self.table.jax(sharding=sharding, **self._subset(options))

    def torch_sampler(self, **options: Any):
        """``Table.torch_sampler`` over these rows only (for ``gpuload.pytorch(rows)``)."""
        return self.table.torch_sampler(**self._subset(options))

    @with_spec_options(exclude=("indices",))
    def tensorflow(self, *, input_context: Any = None, label: Any = None, **options: Any):
        """``Table.tensorflow`` over these rows only."""
        return self.table.tensorflow(
            input_context=input_context, label=label, **self._subset(options)
        )


def split_rows_by(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Row numbers of each part of ``n`` rows split by ``fractions`` (or counts), sorted."""
    from .sampling import Permutation, derive_key

    parts = [float(f) for f in fractions]
    if not parts or any(not np.isfinite(f) or f < 0 for f in parts):
        raise ValueError(f"split fractions must be non-negative numbers, got {list(fractions)}")
    if all(float(f).is_integer() for f in parts) and sum(parts) == n and n != 1:
        counts = [int(f) for f in parts]
    elif abs(sum(parts) - 1.0) <= 1e-6:
        exact = [f * n for f in parts]
        counts = [int(np.floor(x)) for x in exact]
        # the rounding remainder: a row each to the parts with the largest fractions left over
        # (so a part asked for 0 rows gets none)
        by_rest = sorted(range(len(parts)), key=lambda i: counts[i] - exact[i])
        for i in by_rest[: n - sum(counts)]:
            counts[i] += 1
    else:
        raise ValueError(
            f"split fractions must sum to 1 (or be row counts summing to {n}), got {list(fractions)}"
        )
    order = Permutation(n, derive_key(int(seed), 0x5917))(np.arange(n, dtype=np.int64))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [np.sort(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
