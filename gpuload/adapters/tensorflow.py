"""TensorFlow front door: ``gpuload.tensorflow(table, ...)`` -> a ``tf.data.Dataset`` of dicts
with a proper ``element_spec``. Bytes, image and text columns arrive as ``tf.string``.

Without ``batch_size`` it yields rows (chain ``.batch()``); with ``batch_size`` it yields whole
batches from gpuload's fast path (threads, prefetch, decode and fused image ops). Shuffling and
sharding (``input_context`` from ``tf.distribute``, or rank/world) happen inside gpuload, seeded
and different every epoch (each pass over the dataset is the next epoch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from ..device import resolve_device
from ..distributed import resolve_rank_world
from ..loader import Loader, LoaderOptions, resolve_table
from ..schema import Column
from ..table import Table

__all__ = ["tensorflow", "column_spec"]

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


def tensorflow(
    table: Any,
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
    input_context: Any = None,
    rank: int | None = None,
    world_size: int | None = None,
    uneven: str = "pad",
    prefetch: int = 2,
    num_threads: int | None = None,
    on_error: str = "raise",
    storage_options: Mapping[str, Any] | None = None,
) -> tf.data.Dataset:
    """A tf.data.Dataset over a table (a Table, a name, a path or a URL)."""
    t: Table = resolve_table(table, storage_options)
    if input_context is not None:
        rank, world_size = input_context.input_pipeline_id, input_context.num_input_pipelines
    r, w = resolve_rank_world(rank, world_size)
    cols = t.schema.select(list(columns) if columns is not None else None, t.name)
    batched = batch_size is not None
    opts = LoaderOptions(
        batch_size if batched else 256,
        shuffle,
        seed,
        drop_last if batched else False,
        tuple(c.name for c in cols),
        prefetch,
        num_threads,
        uneven,
        on_error,
    )
    image_columns, factory, image_specs = (), None, {}
    if image is not None:
        if not batched:
            raise ValueError("image= runs one fused kernel per batch: pass batch_size= to use it")
        from ..pipeline import image_stage_factory

        dev = resolve_device(device)
        image_columns, factory = image_stage_factory(
            t, image, decoder, dev, columns, options=decode_options, seed=seed
        )
        shape = factory.plan.out_shape(1)[1:]
        batch = batch_size if drop_last else None
        image_specs = {
            c: tf.TensorSpec((batch, *shape), _TF_DTYPES[factory.plan.out_dtype], name=c)
            for c in image_columns
        }
    loader = Loader(
        t, opts, image_stage_factory=factory, image_columns=image_columns, rank=r, world_size=w
    )
    fixed = batch_size if (batched and drop_last) else None
    spec = {c.name: image_specs.get(c.name) or column_spec(c, fixed, batched) for c in cols}

    def gen():
        for batch in loader:  # each pass over the dataset is the loader's next epoch
            if batched:
                yield {k: _to_tf_ready(_host(v)) for k, v in batch.items()}
                continue
            n = len(next(iter(batch.values()))) if batch else 0
            for i in range(n):
                yield {k: _host(v)[i] for k, v in batch.items()}

    ds = tf.data.Dataset.from_generator(gen, output_signature=spec)
    if batched:
        ds = ds.apply(tf.data.experimental.assert_cardinality(len(loader)))
    else:
        ds = ds.apply(tf.data.experimental.assert_cardinality(loader._shard().count))
    ds._gpuload_loader = loader  # for set_epoch / state_dict / stats
    return ds


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
