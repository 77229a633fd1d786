"""TensorFlow front door: ``gpuload.tensorflow(table, ...)`` -> a ``tf.data.Dataset`` of dicts
with a proper ``element_spec``. Bytes, image and text columns arrive as ``tf.string``; images
made by ``image=`` ops come channels-last (NHWC, what Keras layers expect) unless the ops hold an
``ops.ToLayout``. ``label="label"`` (or a tuple of columns) yields ``(features, label)``
elements, so ``model.fit(ds)`` works without a ``.map``: a lone feature column as itself, several
as a dict. When gpuload shards (``input_context`` or rank/world), the dataset's auto-shard
policy is OFF, so ``tf.distribute`` does not shard it again. A gpuload error (a corrupt image,
a bad checksum) iterated in Python comes back as itself (DecodeError, IntegrityError, ...; TF's
error its cause); inside graphs (``model.fit``, a chained ``.map``) TF's own error stays, its
message naming table, row and column.

What it copies: tf.data's generator boundary copies every batch into TF's own tensors, and image
batches made on the GPU come back to the host first (``copy_to_host``). For a custom training
loop, ``ds.as_device_iterator()`` yields the same batches as TF tensors through DLPack with no
copy (on the GPU for GPU-made images).

Without ``batch_size`` it yields rows (chain ``.batch()``): whole internal batches of
``ROW_READ`` rows cross the Python/TF boundary and TF splits them (``unbatch``; no Python call per
row), a counter inside TF keeping ``state_dict()`` exact to the row. With ``batch_size`` it yields
whole batches from gpuload's fast path (threads, prefetch, decode and fused image ops). Shuffling and
sharding (``input_context`` from ``tf.distribute``, or rank/world) happen inside gpuload, seeded
and different every epoch (each pass over the dataset is the next epoch). The dataset carries
``state_dict()``, ``load_state_dict()``, ``set_epoch()`` and ``stats()`` of its loader, and
``ds.handle``: the same methods on an object that outlives ``.map()``/``.prefetch()`` chains, whose
``track(chain)`` counts what the end of the chain delivered, so a resume is exact even with
prefetching after gpuload.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from ..errors import GpuloadError
from ..export import to_tensorflow
from ..loader import LENGTH_SUFFIX, Loader, make_loader
from ..reader import TableReader
from ..schema import Column
from ..spec import WINDOW_OPTIONS, LoaderSpec, refuse_unused
from ..windows import PAD_SUFFIX

__all__ = ["tf_front_door", "column_spec", "TFHandle"]

ROWS = "a dataset of rows (no batch_size)"
ROW_OPTIONS = (
    "columns",
    "indices",
    "shuffle",
    "seed",
    "epoch",
    "uneven",
    "prefetch",
    "num_threads",
    "rank",
    "world_size",
    "episode",
    *WINDOW_OPTIONS,
    "pad_ragged",
)
ROW_READ = 256  # rows per internal batch when the dataset yields rows

_TF_DTYPES = {
    "bool": tf.bool,
    "int8": tf.int8,
    "int16": tf.int16,
    "int32": tf.int32,
    "int64": tf.int64,
    "uint8": tf.uint8,
    "uint16": tf.uint16,
    "uint32": tf.uint32,
    "uint64": tf.uint64,
    "float16": tf.float16,
    "float32": tf.float32,
    "float64": tf.float64,
    "bfloat16": tf.bfloat16,
}


def column_spec(col: Column, batch: int | None = None, batched: bool = False) -> tf.TensorSpec:
    """The TensorSpec of a column (with a leading batch dimension when ``batched``)."""
    lead = (batch,) if batched else ()
    if col.is_var:
        return tf.TensorSpec(lead, tf.string, name=col.name)
    return tf.TensorSpec(lead + tuple(col.shape), _TF_DTYPES[col.dtype], name=col.name)


def _to_tf_ready(v: Any) -> Any:
    if isinstance(v, list):
        return np.array(v, dtype=object)  # bytes / str -> tf.string
    return v


def channels_last(spec: LoaderSpec) -> LoaderSpec:
    """Keras's layout by default: image ops without a ``ToLayout`` get ``ToLayout("NHWC")``
    (``ops.ToLayout("NCHW")`` among them keeps channels first)."""
    from ..ops import ToLayout

    def nhwc(ops: tuple) -> tuple:
        return ops if any(isinstance(op, ToLayout) for op in ops) else (*ops, ToLayout("NHWC"))

    if spec.image is None:
        return spec
    if isinstance(spec.image, Mapping):
        return spec.replace(image={c: nhwc(ops) for c, ops in spec.image.items()})
    return spec.replace(image=nhwc(spec.image))


def _labels(label: Any, loader: Loader) -> tuple[str, ...] | None:
    """The label column(s) ``label=`` names, checked against the columns loaded."""
    if label is None:
        return None
    names = (label,) if isinstance(label, str) else tuple(label)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"label must be a column name or a tuple of them, got {label!r}")
    missing = [n for n in names if n not in loader.columns]
    if missing:
        raise ValueError(
            f"label={label!r}: {', '.join(map(repr, missing))} not among the columns loaded "
            f"({', '.join(loader.columns)}); add it to columns="
        )
    if len(names) == len(loader.columns):
        raise ValueError(f"label={label!r} leaves no feature column to train on")
    return names


def tf_front_door(
    table: TableReader, spec: LoaderSpec, *, input_context: Any = None, label: Any = None
) -> tf.data.Dataset:
    """A tf.data.Dataset over a table, as the spec asks (see the module docstring)."""
    spec = channels_last(spec)
    if input_context is not None:
        if spec.rank is not None or spec.world_size is not None:
            raise ValueError("pass input_context= or rank=/world_size=, not both")
        spec = spec.replace(
            rank=input_context.input_pipeline_id, world_size=input_context.num_input_pipelines
        )
    batched = spec.batch_size is not None
    if not batched:
        refuse_unused(
            spec, ROWS, ROW_OPTIONS, "pass batch_size= for whole batches (and image= ops)"
        )
        spec = spec.replace(batch_size=ROW_READ)
    elif spec.image is None and "device" in spec.given():
        raise ValueError(
            f"device={spec.device!r}: tf.data places its tensors itself; device= picks where "
            "image= ops run, and none were given"
        )
    loader = make_loader(table, spec)
    loader.need_padded_ragged("gpuload.tensorflow")
    return _Cursor(loader, batched, _labels(label, loader)).dataset(sized=True)


def _signature(loader: Loader, batched: bool) -> dict[str, tf.TensorSpec]:
    spec = loader.spec
    cols = [loader.table.schema[c] for c in loader.columns]
    fixed = spec.batch_size if (batched and spec.drop_last) else None
    out = {}
    plans = loader.image_plans
    for c in cols:
        k = loader.window_length(c.name)
        win = (k,) if k else ()
        if c.name in plans:
            plan = plans[c.name]
            shape = (fixed, *win, *plan.out_shape(1)[1:])
            out[c.name] = tf.TensorSpec(shape, _TF_DTYPES[plan.out_dtype], name=c.name)
        elif c.is_ragged:
            width = None if spec.pad_ragged is True else int(spec.pad_ragged)
            out[c.name] = tf.TensorSpec(
                (fixed, *win, width, *c.shape), _TF_DTYPES[c.dtype], name=c.name
            )
            name = c.name + LENGTH_SUFFIX
            out[name] = tf.TensorSpec((fixed, *win), tf.int64, name=name)
        elif win:
            base = column_spec(c, fixed, batched)
            shape = (*base.shape[:1], k, *base.shape[1:])
            out[c.name] = tf.TensorSpec(shape, base.dtype, name=c.name)
        else:
            out[c.name] = column_spec(c, fixed, batched)
    ws = spec.windows
    for c in ws.columns if ws is not None else ():
        name = c + PAD_SUFFIX
        out[name] = tf.TensorSpec((fixed, ws.length(c)), tf.bool, name=name)
    return out


class _Cursor:
    """Feeds tf.data from a loader and knows, row by row, how far the consumer got: the state
    of a dataset of rows points at the next row, not the next internal batch."""

    def __init__(self, loader: Loader, batched: bool, labels: tuple[str, ...] | None = None):
        self.loader = loader
        self.batched = batched
        self.labels = labels
        self.error: GpuloadError | None = None  # the gpuload error that ended the last pass
        self.handed = 0  # rows of this pass handed to tf.data (whole internal batches)
        # rows of this pass tf.data delivered (counted inside TF, after its unbatch)
        self.consumed = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.resumed = False
        self.handle = TFHandle(self)
        # with a tracked chain: the state after each element handed over and not yet delivered
        self.in_flight: deque[dict[str, Any]] = deque()
        self.delivered: dict[str, Any] | None = None

    def dataset(self, sized: bool) -> tf.data.Dataset:
        """The tf.data.Dataset, with the loader's methods. ``sized``: its cardinality is
        asserted (one full epoch per pass); a resumed dataset's first pass is shorter, so it has
        none."""
        ds = tf.data.Dataset.from_generator(
            lambda: self.generate(sized), output_signature=_signature(self.loader, True)
        )
        if not self.batched:  # rows: whole batches cross the boundary, TF splits them
            ds = ds.unbatch().map(self._count)
        if sized:
            count = len(self.loader) if self.batched else self.loader.num_rows
            ds = ds.apply(tf.data.experimental.assert_cardinality(count))
        # tf.data would otherwise pull an element ahead of the consumer (an injected prefetch):
        # state_dict() counts what the generator handed over, so it must be what was consumed.
        # (gpuload prefetches batches itself, on its own threads.)
        options = tf.data.Options()
        options.experimental_optimization.inject_prefetch = False
        if self.loader.world_size > 1:  # gpuload shards: tf.distribute must not shard again
            options.experimental_distribute.auto_shard_policy = (
                tf.data.experimental.AutoShardPolicy.OFF
            )
        ds = ds.with_options(options)
        if self.labels is not None:
            ds = ds.map(self._supervised)  # one element per element: the state stays exact
        ds.__class__ = _raising_class(type(ds))  # gpuload's errors keep their type in Python
        ds.state_dict = self.handle.state_dict
        ds.load_state_dict = self.handle.load_state_dict
        ds.set_epoch = self.loader.set_epoch
        ds.stats = self.loader.stats
        ds.loader = self.loader
        ds.handle = self.handle
        ds.as_device_iterator = self.device_batches
        ds._gpuload_cursor = self
        return ds

    def device_batches(self):
        """The batches as dicts of TF tensors straight from the loader, for custom training
        loops: through DLPack without a copy, on the GPU for image batches made there (the
        tf.data dataset instead copies them back to the host at its generator boundary, and TF
        copies them again). Each pass is the loader's next epoch; ``state_dict()`` of the
        dataset is exact for it too (nothing reads ahead here)."""
        if not self.batched:
            raise ValueError(
                "as_device_iterator() yields whole batches: pass batch_size= to gpuload.tensorflow"
            )
        for batch in self.loader:
            out = to_tensorflow(batch)
            yield self._supervised(out) if self.labels is not None else out

    def _supervised(self, elem: dict) -> tuple:
        """(features, label) for Keras's fit: a lone feature column as itself, several as a
        dict; one label column as itself, several as a tuple."""
        feats = {k: v for k, v in elem.items() if k not in self.labels}
        x = next(iter(feats.values())) if len(feats) == 1 else feats
        y = tuple(elem[k] for k in self.labels)
        return x, (y[0] if len(y) == 1 else y)

    def _count(self, elem: dict) -> dict:
        """A row delivered: counted in TF (no Python per row), for ``state_dict``."""
        with tf.control_dependencies([self.consumed.assign_add(1)]):
            return {k: tf.identity(v) for k, v in elem.items()}

    def generate(self, sized: bool):
        if sized and self.resumed:
            raise RuntimeError(
                "this gpuload dataset was resumed with load_state_dict(): iterate the dataset "
                "load_state_dict() returned (tf.data fixes a dataset's length when it is built, "
                "and a resumed pass is shorter)"
            )
        self.handed = 0
        self.consumed.assign(0)
        self.error = None
        if self.handle.tracking and self.delivered is None:
            self.delivered = self.state_dict()  # nothing delivered yet: where this pass starts
        try:
            yield from self._pass()
        except GpuloadError as e:  # TF turns it into an OpError: the Python iterator re-raises it
            self.error = e
            raise

    def _pass(self):
        for batch in self.loader:  # each pass over the dataset is the loader's next epoch
            out = {k: _to_tf_ready(_host(v)) for k, v in batch.items()}
            n = len(next(iter(out.values()))) if out else 0
            if self.handle.tracking:  # the state after each element handed over
                state = self.loader.state_dict()
                states = [state] if self.batched else [
                    {**state, "position": state["position"] - (n - 1 - i)} for i in range(n)
                ]  # fmt: skip
                self.in_flight.extend(states)
            self.handed += n
            yield out

    def state_dict(self) -> dict[str, Any]:
        """The loader's state, less the rows of a dataset of rows handed to TF in a batch and
        not yet delivered (TF's unbatch pulls the next batch only once it delivered every row
        of the last: nothing is pending when the loader moves on to the next epoch)."""
        state = self.loader.state_dict()
        if not self.batched:
            pending = self.handed - int(self.consumed.numpy())
            if pending > 0:
                state["position"] -= pending
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> tf.data.Dataset:
        """Resume from ``state_dict()``; returns the dataset to iterate (its first pass is the
        rest of the saved epoch, then whole epochs; its cardinality is unknown)."""
        self.handed = 0
        self.consumed.assign(0)
        self.loader.load_state_dict(state)
        self.resumed = True
        self.in_flight.clear()
        self.delivered = None
        return self.dataset(sized=False)


_RAISING: dict[type, type] = {}


def _raising_class(cls: type) -> type:
    """``cls`` (a tf.data dataset class) whose Python iterator re-raises the gpuload error
    (DecodeError, IntegrityError, ...) that TF turned into an ``OpError`` at its boundary, with
    its type and message (TF's own error is its cause). Inside graphs (``model.fit``) TF's
    error stays, its message naming table, row and column."""
    sub = _RAISING.get(cls)
    if sub is None:

        def __iter__(self):
            return _Reraising(cls.__iter__(self), self._gpuload_cursor)

        sub = _RAISING[cls] = type(cls.__name__, (cls,), {"__iter__": __iter__})
    return sub


class _Reraising:
    """A tf.data iterator whose errors from gpuload's generator come back as themselves."""

    def __init__(self, it, cursor: _Cursor) -> None:
        self._it = it
        self._cursor = cursor

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._it)
        except tf.errors.OpError as e:
            err, self._cursor.error = self._cursor.error, None
            if err is None:
                raise
            raise err from e

    def __getattr__(self, name: str):
        return getattr(self._it, name)


class TFHandle:
    """The loader behind a gpuload tf.data dataset, reachable after the dataset is chained
    (``ds.map(f).prefetch(2)`` is a new dataset without gpuload's methods): ``state_dict()``,
    ``load_state_dict()``, ``set_epoch()``, ``stats()``.

    Without ``track``, the state counts the elements gpuload handed to tf.data, which is what
    the consumer received when nothing after gpuload reads ahead. ``track(chain)`` returns the
    chain with a counter at its end: the state then counts what the chain delivered, exact
    with ``.map()``, ``.prefetch()`` and parallel maps in between (any stage that yields one
    element per element it reads; not ``.batch()``/``.filter()`` after gpuload)."""

    def __init__(self, cursor: _Cursor) -> None:
        self._cursor = cursor
        self.tracking = False

    def state_dict(self) -> dict[str, Any]:
        c = self._cursor
        if self.tracking and c.delivered is not None:
            return dict(c.delivered)  # the state after the last element the chain delivered
        return c.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> tf.data.Dataset:
        """Resume; returns the dataset to chain and iterate (see ``_Cursor.load_state_dict``)."""
        return self._cursor.load_state_dict(state)

    def set_epoch(self, epoch: int) -> None:
        self._cursor.loader.set_epoch(epoch)

    def stats(self):
        return self._cursor.loader.stats()

    def track(self, chain: tf.data.Dataset) -> tf.data.Dataset:
        """``chain`` with a counter at its end (see the class docstring); iterate the result."""
        self.tracking = True
        c = self._cursor

        def delivered_one() -> int:
            if c.in_flight:
                c.delivered = c.in_flight.popleft()
            return 0

        def count(*elem):
            tick = tf.py_function(delivered_one, [], tf.int64)
            with tf.control_dependencies([tick]):
                out = tf.nest.map_structure(tf.identity, elem)
            return out[0] if len(out) == 1 else out

        options = tf.data.Options()
        options.experimental_optimization.inject_prefetch = False  # nothing after the counter
        return chain.map(count).with_options(options)


def _host(v: Any) -> Any:
    """Host numpy for tf.data's generator boundary: device arrays (GPU image batches) are copied
    back; bfloat16 bit patterns become an ml_dtypes.bfloat16 view (what TF's numpy side uses)."""
    from ..collate import BFloat16Bits

    if isinstance(v, BFloat16Bits):
        import ml_dtypes

        return _host(v.bits).view(ml_dtypes.bfloat16)
    if hasattr(v, "copy_to_host"):
        return v.copy_to_host()
    return v
