"""The systems a benchmark compares, one small module each, behind string-keyed registries
(fsspec's shape: a read-only mapping of names to ``"module:function"`` targets, imported only
when a child process runs one, so a peer's import cost never leaks into another measurement).

- ``TASKS``: what a child process runs (``python -m gpuload.bench.child TASK JSON``);
- ``DECODERS``: decode-only steps for the ``decode`` task, by ``method``;
- ``LOADERS``: end-to-end loaders (decode + augmentation into tensors) for the ``e2e``,
  ``train`` and ``startup`` tasks, by ``kind`` (``gpuload_plain``: the fast path without
  image ops, for ``startup``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["DECODERS", "LOADERS", "TASKS", "load"]

_G = "gpuload.bench.systems.gpuload"
_DL = "gpuload.bench.systems.deeplake"
_PIL = "gpuload.bench.systems.pil"
_GPU = "gpuload.bench.systems.gpu"

TASKS: Mapping[str, str] = MappingProxyType(
    {
        "ingest": f"{_G}:ingest",
        "stream": f"{_G}:stream",
        "fast": f"{_G}:fast",
        "dataloader": f"{_G}:dataloader",
        "deeplake_ingest": f"{_DL}:ingest",
        "deeplake_stream": f"{_DL}:stream",
        "deeplake_dataloader": f"{_DL}:dataloader",
        "decode": "gpuload.bench.child:decode",
        "kernel": f"{_G}:kernel",
        "e2e": "gpuload.bench.child:e2e",
        "train": "gpuload.bench.child:train",
        "startup": "gpuload.bench.child:startup",
        "gpu_nvjpeg": f"{_GPU}:nvjpeg_decode",
        "gpu_torchvision_decode": f"{_GPU}:torchvision_decode",
        "gpu_kernel": f"{_GPU}:cuda_kernel",
        "gpu_h2d": f"{_GPU}:h2d",
        "gpu_e2e": f"{_GPU}:gpuload_e2e",
        "gpu_torchvision_e2e": f"{_GPU}:torchvision_e2e",
    }
)

DECODERS: Mapping[str, str] = MappingProxyType(
    {
        "raw_libjpeg": "gpuload.bench.systems.libjpeg:decode_step",
        "pil": f"{_PIL}:decode_step",
        "pil_pool": f"{_PIL}:pool_decode_step",
        "gpuload": f"{_G}:decode_step",
    }
)

LOADERS: Mapping[str, str] = MappingProxyType(
    {
        "gpuload": f"{_G}:fast_path_loader",
        "gpuload_plain": f"{_G}:plain_loader",
        "gpuload_tf": f"{_G}:tensorflow_loader",
        "gpuload_jax": f"{_G}:jax_loader",
        "gpuload_dataloader": f"{_G}:dataloader_loader",
        "torch_pil": f"{_PIL}:torch_pil_loader",
        "deeplake": f"{_DL}:e2e_loader",
        "dali": "gpuload.bench.systems.dali:e2e_loader",
    }
)


def load(registry: Mapping[str, str], name: str, what: str) -> Callable[..., Any]:
    """The function registered under ``name`` (imported now); ValueError naming the choices."""
    target = registry.get(name)
    if target is None:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(sorted(registry))}")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
