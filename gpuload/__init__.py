"""gpuload: a GPU-first data loader for training.

table -> fetch -> decode -> ops/kernels -> collate -> export (DLPack) -> framework adapters.
Importing gpuload touches no GPU, starts no threads and imports no framework.
"""

from __future__ import annotations

from typing import Any

from .client import Client, ingest, jax, pytorch, tensorflow, torch_sampler
from .errors import (
    CommitConflictError,
    DecodeError,
    FetchError,
    FormatError,
    GpuloadError,
    SchemaError,
    TableExistsError,
    TableNotFoundError,
    UnsupportedOpError,
)
from .fetch import CacheOptions, FetchOptions, RetryPolicy
from .reader import TableReader
from .sampling import Shuffle, Tail
from .schema import Column, Schema
from .spec import DecodeOptions, LoaderSpec, OnError
from .table import Row, Rows, Table, open_table

__version__ = "0.1.0"

__all__ = [
    "CacheOptions",
    "Client",
    "Column",
    "DecodeOptions",
    "CommitConflictError",
    "DecodeError",
    "FetchError",
    "FetchOptions",
    "FormatError",
    "LoaderSpec",
    "OnError",
    "GpuloadError",
    "RetryPolicy",
    "Row",
    "Rows",
    "Schema",
    "SchemaError",
    "Shuffle",
    "Tail",
    "Table",
    "TableReader",
    "TableExistsError",
    "TableNotFoundError",
    "UnsupportedOpError",
    "ingest",
    "open_table",
    "ops",
    "jax",
    "pytorch",
    "tensorflow",
    "torch_sampler",
]


def __getattr__(name: str) -> Any:
    if name in ("ops", "ray", "sources", "ragged", "windows"):  # loaded on first use
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'gpuload' has no attribute {name!r}")
