"""gpuload.ray: Ray Data front doors.

    import gpuload.ray
    ds.write_datasink(gpuload.ray.TableSink("training_data", mode="append"))
    t = gpuload.ray.write_table(ds, "s3://bucket/t", storage_options=...)   # -> gpuload Table
    ds = gpuload.ray.read_table("training_data", columns=["image", "label"])  # -> ray Dataset

A table argument follows gpuload's one naming rule: a path or URL when it contains ``/`` or
``://``, else a table under ``root`` (default: the Client default, ``$GPULOAD_ROOT``). A write
publishes ONE new version whatever the number of tasks, through the same commit protocol as
``ingest``; how, and how retries and failures are handled: ``gpuload.adapters.ray``.
Importing this module does not import Ray: the classes and functions do, when used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .client import Client, is_location, table_location
from .fetch import CacheOptions, FetchOptions
from .reader import TableReader
from .schema import Schema
from .storage import Store
from .table import Table, open_table
from .writer import DEFAULT_CHUNK_BYTES

# TableSink and TableSource are built on first access (module __getattr__), importing Ray then
__all__ = ["TableSink", "TableSource", "read_table", "write_table"]  # noqa: F822


def _location(table: str | os.PathLike, root: str | None, storage_options) -> tuple[str, str]:
    """(url, label) of a table argument under the naming rule."""
    arg = os.fspath(table)
    url = table_location(arg, root, storage_options)
    label = arg if not is_location(arg) else (os.path.basename(arg.rstrip("/")) or arg)
    return url, label


def write_table(
    ds: Any,
    table: str | os.PathLike,
    mode: str = "create",
    *,
    schema: Schema | Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    root: str | None = None,
    image_format: str = "png",
    cache: CacheOptions | bool | str | None = None,
    fetch: FetchOptions | None = None,
    ray_remote_args: Mapping[str, Any] | None = None,
    concurrency: int | None = None,
) -> Table:
    """Write the Ray Dataset ``ds`` as one new version of ``table`` ("create", "append" or
    "overwrite") from Ray's workers, and open the committed snapshot. Rows are in the order
    of Ray's write tasks (task index), then of their blocks; ``schema`` as for ``ingest``
    (else inferred by each task from its first block, and required to agree)."""
    from .adapters.ray import write_dataset

    url, label = _location(table, root, storage_options)
    manifest = write_dataset(
        ds,
        url,
        label,
        mode,
        schema,
        chunk_bytes,
        storage_options,
        image_format,
        ray_remote_args=ray_remote_args,
        concurrency=concurrency,
    )
    store = Store(url, storage_options, fetch.retry if fetch is not None else None)
    return Table(store, manifest, cache=cache, fetch=fetch)


def read_table(
    table: Any,
    columns: list[str] | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    root: str | None = None,
    cache: CacheOptions | bool | str | None = None,
    fetch: FetchOptions | None = None,
    override_num_blocks: int | None = None,
    ray_remote_args: Mapping[str, Any] | None = None,
    concurrency: int | None = None,
) -> Any:
    """A ``ray.data.Dataset`` of a table (a Table, a name, a path or a URL): its latest version
    when opened by name or URL, read by tasks over contiguous chunk ranges through gpuload's
    fetcher (coalesced, verified). Blocks are pyarrow tables: images and bytes as binary, text
    as string, scalars as numbers, fixed-shape arrays as Ray tensors, ragged columns as lists."""
    import ray.data

    from .adapters.ray import TableSource

    source = TableSource(_open(table, storage_options, root, cache, fetch), columns)
    return ray.data.read_datasource(
        source,
        override_num_blocks=override_num_blocks,
        ray_remote_args=dict(ray_remote_args or {}),
        concurrency=concurrency,
    )


def _open(table: Any, storage_options, root, cache, fetch) -> TableReader:
    """The snapshot ``read_table`` reads, as ``gpuload.open_table`` / ``Client`` open it."""
    if isinstance(table, TableReader):
        if storage_options or root:
            raise ValueError("storage_options= and root= apply when a table is opened by name")
        return table
    if not isinstance(table, (str, os.PathLike)):
        raise TypeError(
            f"expected a gpuload Table, a table name, a path or a URL, not {type(table).__name__}"
        )
    arg = os.fspath(table)
    if is_location(arg):
        return open_table(table_location(arg, None), storage_options, cache, fetch)
    return Client(root, storage_options, cache, fetch).open_table(arg)


def _table_sink_class() -> type:
    """``TableSink``: the adapters' Ray Datasink, taking a table name or location. Built on
    first use so that importing this module does not import Ray."""
    from .adapters.ray import TableSink as _Sink

    class TableSink(_Sink):
        """``ds.write_datasink(gpuload.ray.TableSink(table, mode=...))``: ``ds`` as one new
        version of ``table`` (a name under ``root``, a path or a URL); after the write,
        ``sink.manifest`` is the committed version. Options as ``write_table``'s."""

        def __init__(
            self,
            table: str | os.PathLike,
            mode: str = "create",
            *,
            schema: Schema | Mapping[str, Any] | None = None,
            storage_options: Mapping[str, Any] | None = None,
            chunk_bytes: int = DEFAULT_CHUNK_BYTES,
            root: str | None = None,
            image_format: str = "png",
        ) -> None:
            url, label = _location(table, root, storage_options)
            super().__init__(
                url,
                mode,
                schema=schema,
                storage_options=storage_options,
                chunk_bytes=chunk_bytes,
                image_format=image_format,
                label=label,
            )

    TableSink.__module__ = __name__  # pickled by reference, as gpuload.ray.TableSink
    return TableSink


def __getattr__(name: str) -> Any:
    if name == "TableSink":
        cls = _table_sink_class()
    elif name == "TableSource":
        from .adapters.ray import TableSource as cls
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = cls
    return cls
