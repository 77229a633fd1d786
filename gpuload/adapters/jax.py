"""JAX front door: ``gpuload.jax(table, batch_size=..., sharding=None, ...)`` / ``Table.jax``.

Batches are dicts of ``jax.Array`` (bytes and text columns stay Python lists: JAX has no string
arrays), from the same batched loader as the other doors (one ``LoaderSpec``: shuffle, image
ops, subsets, resume):

- on the CPU, host batches reach JAX through DLPack without a copy (the loader's buffers are
  64-byte aligned); image batches made on the GPU reach it through DLPack on the device;
- without ``jax_enable_x64``, 64-bit columns become JAX's 32-bit types, as ``jnp.asarray``
  makes them (an integer that does not fit is an error, never a wrapped value);
- ``sharding=`` (a ``jax.sharding.Sharding``): each process loads only its share of the rows
  (``rank=jax.process_index()``, ``world_size=jax.process_count()`` unless given) and each
  batch is one global array laid out by the sharding across devices and hosts
  (``jax.make_array_from_process_local_data``): ``batch_size`` rows per process,
  ``batch_size * process_count`` in the global batch.

This module only converts: batching, order and resume live in ``loader.py``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from ..collate import BFloat16Bits
from ..device import resolve_device
from ..export import to_jax
from ..loader import Loader, LoaderFront, make_loader
from ..reader import TableReader
from ..spec import LoaderSpec

__all__ = ["JaxLoader", "jax_front_door"]


def jax_front_door(table: TableReader, spec: LoaderSpec, sharding: Any = None) -> JaxLoader:
    """The JAX loader ``spec`` asks for (``batch_size`` required: JAX trains on batches)."""
    if spec.batch_size is None:
        raise ValueError(
            "gpuload.jax(t, ...) needs batch_size=: it yields whole batches of jax.Array "
            "(batch_size rows per process; with sharding=, the global batch is "
            "batch_size * jax.process_count())"
        )
    if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
        raise TypeError(
            f"sharding must be a jax.sharding.Sharding (e.g. NamedSharding(mesh, "
            f"PartitionSpec('data'))), not {type(sharding).__name__}"
        )
    if (
        spec.rank is None
        and spec.world_size is None
        and (sharding is not None or jax.process_count() > 1)
    ):  # each JAX process loads its own share
        spec = spec.replace(rank=jax.process_index(), world_size=jax.process_count())
    dev = resolve_device(spec.device)
    target = _jax_device(dev) if dev.is_cuda else None
    if sharding is None:
        export = lambda b: to_jax(b, target)  # noqa: E731 - the loader's export hook
    else:
        export = _Global(sharding, jax.process_count())
    loader = make_loader(table, spec, export=export)
    loader.need_padded_ragged("gpuload.jax")
    return JaxLoader(loader, sharding)


def _jax_device(dev) -> Any:
    """The JAX device of gpuload's CUDA device ``dev`` (JAX must see the GPU too)."""
    try:
        return jax.devices("gpu")[dev.index]
    except (RuntimeError, IndexError) as e:
        raise RuntimeError(
            f"device={dev}: gpuload would make batches on {dev}, but JAX sees no such GPU "
            f"({e}); install jax with CUDA (pip install 'jax[cuda13]') or pass device='cpu'"
        ) from e


class _Global:
    """Export with a sharding: each array column becomes one global ``jax.Array`` from this
    process's rows (``make_array_from_process_local_data``)."""

    def __init__(self, sharding: Any, processes: int) -> None:
        self.sharding = sharding
        self.processes = processes

    def __call__(self, batch: Any) -> Any:
        if not isinstance(batch, dict):
            return self._one("batch", batch)
        return {k: self._one(k, v) for k, v in batch.items()}

    def _one(self, name: str, v: Any) -> Any:
        if isinstance(v, BFloat16Bits):
            v = _bfloat16(v)
        elif (isinstance(v, np.ndarray) and v.dtype.kind in "biuf") or hasattr(
            v, "__cuda_array_interface__"
        ):
            v = to_jax(v)  # zero copy on the host; 64-bit columns narrowed as elsewhere
        else:
            return v  # bytes / str lists
        shape = (int(v.shape[0]) * self.processes, *v.shape[1:])
        try:
            return jax.make_array_from_process_local_data(self.sharding, v, shape)
        except ValueError as e:
            raise ValueError(
                f"column {name!r}: a batch of {v.shape[0]} rows per process (global shape "
                f"{shape}) does not split over the sharding {self.sharding}: make batch_size "
                "a multiple of the devices on the batch axis, and pass drop_last=True if the "
                f"last batch is smaller ({e})"
            ) from e


def _bfloat16(v: BFloat16Bits) -> Any:
    """bfloat16 bit patterns as a bfloat16 array: a numpy view through ml_dtypes (JAX's own
    bfloat16 type) on the host, a bitcast on the device."""
    if isinstance(v.bits, np.ndarray):
        import ml_dtypes

        return v.bits.view(ml_dtypes.bfloat16)
    return to_jax(v)


class JaxLoader(LoaderFront):
    """The batched loader for JAX: iterate for dicts of ``jax.Array`` (each pass is the next
    epoch); ``len()``, ``set_epoch``, ``state_dict()``/``load_state_dict()`` (exact mid-epoch
    resume), ``stats()``; ``sharding`` as given."""

    def __init__(self, loader: Loader, sharding: Any = None) -> None:
        super().__init__(loader)
        self.sharding = sharding
