"""Where names are resolved: ``Client`` (a root, local folder or fsspec URL, holding named tables,
Deeplake-style), ``ingest``, and the framework front doors ``pytorch`` / ``tensorflow`` that
accept a Table, a table name, a path or a URL."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

from .errors import TableNotFoundError
from .fetch import CacheOptions, FetchOptions
from .ingest import ingest_into
from .schema import Schema, validate_name
from .spec import with_spec_options
from .storage import Store, join_url
from .table import Rows, Table, open_table
from .vacuum import DEFAULT_GRACE_S, VacuumReport, vacuum_store
from .versions import table_exists
from .writer import DEFAULT_CHUNK_BYTES

__all__ = [
    "Client",
    "default_root",
    "ingest",
    "is_location",
    "is_ray_dataset",
    "jax",
    "pytorch",
    "resolve_table",
    "table_location",
    "tensorflow",
    "torch_sampler",
]


def default_root() -> str:
    """GPULOAD_ROOT if set, else a per-user local folder."""
    env = os.environ.get("GPULOAD_ROOT")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(base, "gpuload", "tables")


class Client:
    """Named tables under one root: ``Client().open_table("training_data")``."""

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        storage_options: Mapping[str, Any] | None = None,
        cache: CacheOptions | bool | str | None = None,
        fetch: FetchOptions | None = None,
    ) -> None:
        self.root = os.fspath(root) if root is not None else default_root()
        self.storage_options = dict(storage_options or {})
        self.cache = cache
        self.fetch = fetch

    def __repr__(self) -> str:
        return f"Client(root={self.root!r})"

    def table_url(self, name: str) -> str:
        """Where the named table lives."""
        return join_url(self.root, validate_name(name, "table"))

    def _store(self, name: str) -> Store:
        retry = self.fetch.retry if self.fetch is not None else None
        return Store(self.table_url(name), self.storage_options, retry)

    def open_table(self, name: str) -> Table:
        """Open a table by name; TableNotFoundError lists the tables that exist."""
        try:
            return Table.open(self.table_url(name), self.storage_options, self.cache, self.fetch)
        except TableNotFoundError:
            have = self.list_tables()
            raise TableNotFoundError(
                f"no table named {name!r} under {self.root}; tables here: {have or 'none'}"
            ) from None

    def exists(self, name: str) -> bool:
        return table_exists(self._store(name))

    def ingest(
        self,
        name: str,
        data: Any,
        mode: str = "create",
        schema: Schema | Mapping[str, Any] | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        progress: bool | None = None,
        *,
        image_format: str = "png",
        batches: bool | None = None,
    ) -> Table:
        """Write ``data`` as table ``name`` (mode "create", "append" or "overwrite") and open it.

        ``data``: a dict of columns, an iterable of row dicts or of column batches (dicts,
        RecordBatches, DataFrames; ``batches=True`` when they are only numeric arrays), a
        pyarrow Table, a pandas DataFrame, a Parquet file/folder, an image folder (class
        subfolders), WebDataset tar shards (``"shard-{000..009}.tar"``, a list, or
        ``gpuload.sources.WebDataset(..., columns=)``), or a Table. Image columns also take
        ``{"bytes", "path"}`` dicts, PIL images and uint8 arrays, encoded as ``image_format``
        says ("png" lossless by default, "jpeg", "keep": see ``gpuload.sources.images``).
        A ``ray.data.Dataset`` is written by Ray's workers and committed once as one version
        (``gpuload.ray.write_table``)."""
        return ingest(
            self.table_url(name),
            data,
            mode,
            schema,
            chunk_bytes,
            progress,
            self.storage_options,
            self.cache,
            self.fetch,
            image_format=image_format,
            batches=batches,
        )

    def list_tables(self) -> list[str]:
        """Names of the tables under the root."""
        root = Store(self.root, self.storage_options)
        names = []
        for entry in root.listdir():
            try:
                validate_name(entry, "table")
            except ValueError:
                continue
            if table_exists(Store(join_url(self.root, entry), self.storage_options)):
                names.append(entry)
        return names

    def vacuum(
        self, name: str, older_than: float = DEFAULT_GRACE_S, dry_run: bool = False
    ) -> VacuumReport:
        """Delete chunk files of table ``name`` that no committed manifest names (left by a
        killed writer) once they are older than ``older_than`` seconds (default 24 h; it must
        exceed the longest ingest that may be running)."""
        store = self._store(name)
        if not table_exists(store):
            raise TableNotFoundError(f"no table named {name!r} under {self.root}")
        return vacuum_store(store, name, older_than, dry_run)

    def delete_table(self, name: str) -> None:
        """Delete a table and all its versions."""
        store = self._store(name)
        if not table_exists(store):
            raise TableNotFoundError(f"no table named {name!r} under {self.root}")
        store.remove_tree()


def ingest(
    url: str | os.PathLike,
    data: Any,
    mode: str = "create",
    schema: Schema | Mapping[str, Any] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool | None = None,
    storage_options: Mapping[str, Any] | None = None,
    cache: CacheOptions | bool | str | None = None,
    fetch: FetchOptions | None = None,
    *,
    image_format: str = "png",
    batches: bool | None = None,
) -> Table:
    """Write ``data`` to the table at a path or URL and open the committed snapshot (the
    sources and options are ``Client.ingest``'s). A Ray Dataset is written by Ray's workers
    in parallel and committed once (``gpuload.ray.write_table``)."""
    store = Store(os.fspath(url), storage_options, fetch.retry if fetch is not None else None)
    label = os.path.basename(os.fspath(url).rstrip("/")) or os.fspath(url)
    if is_ray_dataset(data):
        from .adapters.ray import write_dataset

        manifest = write_dataset(
            data, store.url, label, mode, schema, chunk_bytes, storage_options, image_format
        )
        return Table(store, manifest, cache=cache, fetch=fetch)
    manifest = ingest_into(
        store,
        label,
        data,
        mode,
        schema,
        chunk_bytes,
        progress,
        image_format=image_format,
        batches=batches,
    )
    return Table(store, manifest, cache=cache, fetch=fetch)


def is_ray_dataset(data: Any) -> bool:
    """Whether ``data`` is a ``ray.data.Dataset``, told without importing Ray."""
    return type(data).__module__.startswith("ray.data") and hasattr(data, "write_datasink")


def is_location(arg: str) -> bool:
    """The one naming rule (API and command line alike): a table argument is a path or URL when
    it contains a path separator or ``://``, else the name of a table under the client's root
    (``--root``): ``"training_data"`` is a name, ``"./training_data"`` a folder."""
    return "://" in arg or "/" in arg or os.sep in arg


def table_location(
    arg: str, root: str | None, storage_options: Mapping[str, Any] | None = None
) -> str:
    """The URL a table argument names (see ``is_location``)."""
    if is_location(arg):
        return arg if "://" in arg else os.path.expanduser(arg)
    return Client(root, storage_options=storage_options).table_url(arg)


def resolve_table(table: Any, storage_options: Mapping[str, Any] | None = None) -> Table | Rows:
    """A Table from a Table, a table name (under the default Client root), a path or a URL; a
    subset of rows (``t[a:b]``, ``t.split()``) stays one (its front doors read only its rows)."""
    if isinstance(table, (Table, Rows)):
        if storage_options:
            raise ValueError("storage_options= applies when a table is opened by name or URL")
        return table
    if isinstance(table, os.PathLike):
        table = os.fspath(table)
    if not isinstance(table, str):
        raise TypeError(
            f"expected a gpuload Table, rows of one (t[a:b]), a table name, a path or a URL, "
            f"not {type(table).__name__}"
        )
    if is_location(table):
        return open_table(table_location(table, None), storage_options=storage_options)
    return Client(storage_options=storage_options).open_table(table)


@with_spec_options()
def pytorch(
    table: Any,
    transform: Callable | None = None,
    *,
    iterable: bool = False,
    pin_memory: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    **options: Any,
):
    """PyTorch access to a table (a Table, a name, a path or a URL): a map-style Dataset without
    ``batch_size`` (for torch's DataLoader), an IterableDataset with ``iterable=True`` (shuffles
    and shards itself), else gpuload's batched fast path (threads, prefetch, fused image ops).
    ``pin_memory=True`` (batched): page-locked CPU batches where CUDA exists (a no-op without)."""
    return resolve_table(table, storage_options).pytorch(
        transform, iterable=iterable, pin_memory=pin_memory, **options
    )


def torch_sampler(table: Any, *, storage_options: Mapping[str, Any] | None = None, **options: Any):
    """A resumable sampler for ``gpuload.pytorch(table)`` (the map-style dataset): seeded, a new
    order each epoch, this rank's share only (``rank``/``world_size`` or torch.distributed).
    ``StatefulDataLoader(ds, sampler=gpuload.torch_sampler(t, seed=0))`` (torchdata) resumes
    exactly, workers included; ``seed=None`` draws one that travels in the state. The options
    are ``Table.torch_sampler``'s."""
    return resolve_table(table, storage_options).torch_sampler(**options)


@with_spec_options()
def jax(
    table: Any,
    *,
    sharding: Any = None,
    storage_options: Mapping[str, Any] | None = None,
    **options: Any,
):
    """JAX access to a table (a Table, a name, a path or a URL): batches (``batch_size=``
    required) as dicts of ``jax.Array``, zero copy on the CPU; ``sharding=`` (a
    ``jax.sharding.Sharding``) lays each batch out across devices and hosts, each process
    loading only its share."""
    return resolve_table(table, storage_options).jax(sharding=sharding, **options)


def _front_door_signature(method: Callable, fn: Callable) -> inspect.Signature:
    """``fn(table, <method's options>, storage_options=None)``: the signature help() shows for
    a module-level front door that forwards to a Table method."""
    own = list(inspect.signature(method).parameters.values())[1:]  # without self
    first = inspect.Parameter("table", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    so = inspect.signature(fn).parameters["storage_options"]
    return inspect.Signature([first, *own, so])


torch_sampler.__signature__ = _front_door_signature(Table.torch_sampler, torch_sampler)  # type: ignore[attr-defined]


@with_spec_options()
def tensorflow(
    table: Any,
    *,
    input_context: Any = None,
    label: Any = None,
    storage_options: Mapping[str, Any] | None = None,
    **options: Any,
):
    """A ``tf.data.Dataset`` over a table (a Table, a name, a path or a URL): rows without
    ``batch_size`` (chain ``.batch()``), whole batches from the fast path with it; images
    channels-last; ``label=`` a column (or a tuple) for ``(features, label)`` elements, so
    ``model.fit(ds)`` needs no ``.map``."""
    return resolve_table(table, storage_options).tensorflow(
        input_context=input_context, label=label, **options
    )
