"""gpuload: a GPU-first data loader for training.

table -> fetch -> decode -> ops/kernels -> collate -> export (DLPack) -> framework adapters.
Importing gpuload touches no GPU, starts no threads and imports no framework.
"""

from __future__ import annotations

from typing import Any

from .client import Client, ingest
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
from .pipeline import DecodeOptions
from .schema import Column, Schema
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
    "GpuloadError",
    "RetryPolicy",
    "Row",
    "Rows",
    "Schema",
    "SchemaError",
    "Table",
    "TableExistsError",
    "TableNotFoundError",
    "UnsupportedOpError",
    "ingest",
    "open_table",
    "ops",
    "pytorch",
    "tensorflow",
]


def pytorch(table: Any, *args: Any, **kwargs: Any):
    """A PyTorch dataset over a table (or the batched fast path when ``batch_size`` is given)."""
    from .adapters.torch import pytorch as _pytorch

    return _pytorch(table, *args, **kwargs)


def tensorflow(table: Any, *args: Any, **kwargs: Any):
    """A tf.data.Dataset over a table."""
    from .adapters.tensorflow import tensorflow as _tensorflow

    return _tensorflow(table, *args, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "ops":
        import importlib

        return importlib.import_module(".ops", __name__)
    raise AttributeError(f"module 'gpuload' has no attribute {name!r}")
