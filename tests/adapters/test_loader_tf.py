"""The TensorFlow front door: tf.data with a proper element_spec, shuffle, sharding, model.fit."""

import json
import time

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import gpuload  # noqa: E402
from gpuload.collate import aligned_empty  # noqa: E402
from gpuload.export import to_tensorflow  # noqa: E402


@pytest.fixture(scope="module")
def robot(robot_table):
    return robot_table(90, seed=6, chunk_bytes=32 << 10)


def test_element_spec_and_rows(robot):
    t, cols = robot
    ds = gpuload.tensorflow(t)
    spec = ds.element_spec
    assert spec["image"].shape == () and spec["image"].dtype == tf.string
    assert spec["state"].shape == (14,) and spec["state"].dtype == tf.float32
    assert spec["label"].dtype == tf.int64 and spec["text"].dtype == tf.string
    rows = list(ds.take(3))
    assert rows[1]["image"].numpy() == cols["image"][1]
    assert rows[2]["text"].numpy().decode() == cols["text"][2]
    np.testing.assert_array_equal(rows[0]["state"].numpy(), cols["state"][0])
    assert t.tensorflow().cardinality().numpy() == 90  # Table method == function


def test_batch_prefetch_and_shuffle_per_epoch(robot):
    t, cols = robot
    ds = (
        gpuload.tensorflow(t, shuffle=True, seed=3, columns=["text", "label"])
        .batch(16)
        .prefetch(tf.data.AUTOTUNE)
    )
    e0 = [x.decode() for b in ds for x in b["text"].numpy()]
    e1 = [x.decode() for b in ds for x in b["text"].numpy()]
    assert sorted(e0) == sorted(cols["text"]) == sorted(e1) and e0 != e1 and e0 != cols["text"]


def test_batched_fast_path(robot):
    t, cols = robot
    ds = gpuload.tensorflow(t, batch_size=32, drop_last=True)
    assert ds.element_spec["state"].shape == (32, 14)
    assert ds.element_spec["image"].shape == (32,)
    bs = list(ds)
    assert len(bs) == 2 and bs[0]["image"].dtype == tf.string
    assert bs[0]["image"].numpy()[5] == cols["image"][5]


def test_input_context_shards(robot):
    t, cols = robot
    got = []
    for i in range(3):
        ctx = tf.distribute.InputContext(num_input_pipelines=3, input_pipeline_id=i)
        got.append(
            [
                x.decode()
                for x in (
                    r["text"].numpy()
                    for r in gpuload.tensorflow(t, input_context=ctx, columns=["text"])
                )
            ]
        )
    assert [len(g) for g in got] == [30, 30, 30]
    assert set(sum(got, [])) == set(cols["text"]) and len(set(sum(got, []))) == 90


def test_model_fit_two_epochs(robot):
    t, _ = robot
    ds = gpuload.tensorflow(t, shuffle=True, seed=0).batch(32).prefetch(tf.data.AUTOTUNE)
    ds = ds.map(lambda b: (b["state"], b["label"]))
    model = tf.keras.Sequential([tf.keras.Input((14,)), tf.keras.layers.Dense(10)])
    model.compile(
        optimizer="sgd", loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    hist = model.fit(ds, epochs=2, verbose=0)
    assert len(hist.history["loss"]) == 2 and np.isfinite(hist.history["loss"]).all()
    # decoding bytes inside tf.data works too (image bytes arrive as tf.string)
    img = next(iter(gpuload.tensorflow(t).map(lambda r: tf.io.decode_jpeg(r["image"])).take(1)))
    assert img.shape == (48, 64, 3)


def test_model_fit_on_images_and_labels_without_a_map(robot):
    """The Keras way: channels-last images and (features, label) elements, nothing mapped."""
    t, _ = robot
    ops = gpuload.ops
    image = [
        ops.RandomResizedCrop(16),
        ops.RandomHorizontalFlip(),
        ops.Normalize((0.5,) * 3, (0.25,) * 3),
    ]
    ds = gpuload.tensorflow(
        t, batch_size=32, shuffle=True, seed=0, image=image, label="label",
        columns=["image", "label"], device="cpu",
    )  # fmt: skip
    x, y = ds.element_spec
    assert x.shape.as_list() == [None, 16, 16, 3] and y.dtype == tf.int64
    model = tf.keras.Sequential([
        tf.keras.Input((16, 16, 3)),
        tf.keras.layers.Conv2D(4, 3, activation="relu"),
        tf.keras.layers.GlobalAveragePooling2D(),
        tf.keras.layers.Dense(10),
    ])  # fmt: skip
    model.compile(
        optimizer="sgd", loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    hist = model.fit(ds, epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"]).all()
    # the dataset keeps gpuload's methods: the state says the whole epoch was consumed
    state = ds.state_dict()
    assert (state["epoch"], state["position"]) in {(1, 0), (0, 90)}


def test_layout_and_label_forms(robot):
    t, cols = robot
    ops = gpuload.ops
    kw = dict(batch_size=8, device="cpu", columns=["image", "state", "label"])
    nchw = [ops.Resize((8, 8)), ops.ToLayout("NCHW")]
    b = next(iter(gpuload.tensorflow(t, image=nchw, **kw)))
    assert b["image"].shape == (8, 3, 8, 8)  # an explicit ToLayout is kept
    x, y = next(iter(gpuload.tensorflow(t, image=[ops.Resize((8, 8))], label="label", **kw)))
    assert set(x) == {"image", "state"} and x["image"].shape == (8, 8, 8, 3)
    np.testing.assert_array_equal(y.numpy(), cols["label"][:8])
    x, (s, y) = next(iter(gpuload.tensorflow(t, label=("state", "label"), batch_size=8,
                                             columns=["text", "state", "label"])))  # fmt: skip
    assert x.dtype == tf.string and s.shape == (8, 14) and y.shape == (8,)
    x, y = next(iter(gpuload.tensorflow(t, label="label", columns=["state", "label"])))
    assert x.shape == (14,) and y.shape == ()  # rows too
    with pytest.raises(ValueError, match="not among the columns loaded"):
        gpuload.tensorflow(t, label="label", columns=["state"])
    with pytest.raises(ValueError, match="no feature column"):
        gpuload.tensorflow(t, label="label", columns=["label"])


def test_auto_shard_is_off_when_gpuload_shards(robot):
    t, _ = robot
    off = tf.data.experimental.AutoShardPolicy.OFF
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1)
    sharded = gpuload.tensorflow(t, input_context=ctx, columns=["label"])
    assert sharded.options().experimental_distribute.auto_shard_policy == off
    ranked = gpuload.tensorflow(t, batch_size=4, rank=0, world_size=2, columns=["label"])
    assert ranked.options().experimental_distribute.auto_shard_policy == off
    whole = gpuload.tensorflow(t, columns=["label"])
    assert whole.options().experimental_distribute.auto_shard_policy != off


def test_gpuload_errors_keep_their_type_through_tf(tmp_path):
    """Iterated in Python, a gpuload error comes back as itself (TF's error its cause); where
    TF keeps its own (a chained dataset, model.fit), the message names table, row and column."""
    from gpuload.errors import DecodeError

    from ..helpers import robot_columns

    cols = robot_columns(12, seed=1)
    cols["image"][5] = cols["image"][5][:200]  # a truncated JPEG
    gpuload.ingest(tmp_path / "bad", cols)
    t = gpuload.open_table(tmp_path / "bad")
    kw = dict(batch_size=4, image=[gpuload.ops.Resize((8, 8))], device="cpu")
    ds = gpuload.tensorflow(t, **kw)
    with pytest.raises(DecodeError, match=r"table 'bad', row 5, column 'image'") as info:
        for _ in ds:
            pass
    assert isinstance(info.value.__cause__, tf.errors.OpError)
    with pytest.raises(tf.errors.OpError, match=r"table 'bad', row 5, column 'image'"):
        for _ in ds.map(lambda b: b):
            pass
    ok = gpuload.tensorflow(t, on_error="skip", **kw)
    assert sum(int(b["image"].shape[0]) for b in ok) == 11  # skipping still works


def test_device_iterator_gives_the_same_batches_as_tensors(robot):
    t, _ = robot
    kw = dict(batch_size=16, shuffle=True, seed=2, columns=["image", "state", "label"],
              image=[gpuload.ops.Resize((8, 8))], device="cpu", label="label")  # fmt: skip
    via_data = list(gpuload.tensorflow(t, **kw))
    ds = gpuload.tensorflow(t, **kw)
    direct = list(ds.as_device_iterator())
    assert len(direct) == len(via_data) == 6
    for (xd, yd), (xw, yw) in zip(direct, via_data):
        assert isinstance(xd["image"], tf.Tensor) and xd["image"].shape[1:] == (8, 8, 3)
        np.testing.assert_array_equal(xd["image"].numpy(), xw["image"].numpy())
        np.testing.assert_array_equal(xd["state"].numpy(), xw["state"].numpy())
        np.testing.assert_array_equal(yd.numpy(), yw.numpy())
    assert ds.state_dict()["epoch"] == 1  # the loader's next epoch, as a pass over ds
    with pytest.raises(ValueError, match="whole batches"):
        next(gpuload.tensorflow(t, columns=["label"]).as_device_iterator())


def test_dlpack_zero_copy_when_aligned():
    a = aligned_empty((4, 3, 8, 8), np.float32)
    a[...] = np.random.default_rng(0).random(a.shape)
    out = to_tensorflow({"x": a, "b": [b"ab", b"c"]})
    x = out["x"]
    assert out["b"].dtype == tf.string
    np.testing.assert_array_equal(x.numpy(), a)
    # same memory: a write through numpy shows in the tensor
    a[0, 0, 0, 0] = 1234.5
    assert float(x[0, 0, 0, 0]) == 1234.5
    # an unaligned view is copied, never handed to TF (which would abort the process)
    raw = np.zeros(65, np.uint8)
    view = raw[1:].view(np.uint8)
    y = to_tensorflow(view)
    assert y.shape == (64,)


@pytest.mark.parametrize("batched", [True, False])
def test_handle_resumes_exactly_through_map_and_prefetch(ids_table, batched):
    """The dataset's handle outlives .map()/.prefetch() chaining; with track() at the end of the
    chain its state counts what the chain delivered, so rows seen + rows after the resume equal
    one uninterrupted epoch even though prefetch read ahead."""
    from ..helpers import ids_of

    kw = dict(shuffle=True, seed=3, columns=["id"]) | ({"batch_size": 8} if batched else {})

    def chain(ds):
        return ds.map(lambda e: {"id": e["id"] + 0}).prefetch(3)

    whole = [i for e in chain(gpuload.tensorflow(ids_table, **kw)) for i in ids_of(e)]
    assert sorted(whole) == list(range(len(ids_table)))
    for stop in (1, 4, 9):
        ds = gpuload.tensorflow(ids_table, **kw)
        handle = ds.handle
        it = iter(handle.track(chain(ds)))
        seen = [i for _ in range(stop) for i in ids_of(next(it))]
        state = handle.state_dict()
        assert json.loads(json.dumps(state)) == state
        again = gpuload.tensorflow(ids_table, **kw).handle
        rest_ds = again.track(chain(again.load_state_dict(state)))
        assert seen + [i for e in rest_ds for i in ids_of(e)] == whole, stop
    # without track() the state counts what prefetch pulled ahead (in the background)
    untracked = gpuload.tensorflow(ids_table, **kw)
    it = iter(chain(untracked))
    next(it)
    deadline = time.monotonic() + 30
    while untracked.handle.state_dict()["position"] <= (8 if batched else 1):
        assert time.monotonic() < deadline, "prefetch never read ahead"
        time.sleep(0.01)
