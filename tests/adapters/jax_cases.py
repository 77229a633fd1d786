"""gpuload.jax: the same batches as the torch door, zero copy on the CPU, sharded over devices,
resumed exactly, and fed to a jitted training step. Run in a pytest process of their own by
test_loader_jax.py (JAX's threads would make every later fork in the suite's process unsafe);
``pytest tests/adapters/jax_cases.py`` runs them directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gpuload
from gpuload import ops

from ..helpers import robot_columns

jax = pytest.importorskip("jax")
jnp = jax.numpy
torch = pytest.importorskip("torch")

ROWS = 40
IMAGE = [
    ops.RandomResizedCrop(8),
    ops.RandomHorizontalFlip(),
    ops.Normalize((0.5,) * 3, (0.25,) * 3),
]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("jax")
    gpuload.ingest(root / "robot", robot_columns(ROWS, seed=3), chunk_bytes=16 << 10)
    return gpuload.open_table(root / "robot")


def _np(batch) -> dict:
    return {k: np.asarray(v) for k, v in batch.items() if not isinstance(v, list)}


def test_values_equal_the_torch_door(table):
    kw = dict(batch_size=8, shuffle=True, seed=5, image=IMAGE, device="cpu")
    got = list(gpuload.jax(table, **kw))
    want = list(gpuload.pytorch(table, **kw))
    assert len(got) == len(want) == ROWS // 8
    for g, w in zip(got, want):
        assert isinstance(g["image"], jax.Array) and g["image"].dtype == jnp.float32
        assert g["label"].dtype == jnp.int32  # int64 labels, JAX's default 32-bit ints
        np.testing.assert_array_equal(np.asarray(g["image"]), w["image"].numpy())
        np.testing.assert_array_equal(np.asarray(g["state"]), w["state"].numpy())
        np.testing.assert_array_equal(np.asarray(g["label"]), w["label"].numpy())
        assert g["text"] == w["text"]  # strings stay Python lists


def test_bfloat16_images_are_jax_bfloat16(table):
    kw = dict(batch_size=8, seed=1, image=[*IMAGE, ops.ToDtype("bfloat16")], device="cpu")
    g = next(iter(gpuload.jax(table, columns=["image"], **kw)))["image"]
    w = next(iter(gpuload.pytorch(table, columns=["image"], **kw)))["image"]
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), w.float().numpy())


def test_host_batches_reach_jax_without_a_copy(table, monkeypatch):
    seen = []
    from_dlpack = jax.dlpack.from_dlpack

    def spy(x, *a, **kw):
        out = from_dlpack(x, *a, **kw)
        if isinstance(x, np.ndarray):
            seen.append(out.unsafe_buffer_pointer() == x.ctypes.data)
        return out

    monkeypatch.setattr(jax.dlpack, "from_dlpack", spy)
    for _ in gpuload.jax(
        table, batch_size=8, image=IMAGE, device="cpu", columns=["image", "state"]
    ):
        pass
    assert len(seen) == 2 * (ROWS // 8) and all(seen)


def test_resume_is_exact(table):
    kw = dict(batch_size=6, shuffle=True, seed=2, columns=["label", "state"])
    full = [_np(b) for b in gpuload.jax(table, **kw)]
    first = gpuload.jax(table, **kw)
    it = iter(first)
    head = [_np(next(it)) for _ in range(3)]
    state = first.state_dict()
    it.close()
    again = gpuload.jax(table, **kw)
    again.load_state_dict(state)
    rest = [_np(b) for b in again]
    assert len(head) + len(rest) == len(full)
    for g, w in zip(head + rest, full):
        np.testing.assert_array_equal(g["label"], w["label"])
        np.testing.assert_array_equal(g["state"], w["state"])


def test_a_jitted_training_step_runs_on_the_batches(table):
    loader = gpuload.jax(table, batch_size=8, shuffle=True, seed=0, image=IMAGE, device="cpu",
                         columns=["image", "label"], drop_last=True)  # fmt: skip

    @jax.jit
    def step(w, images, labels):
        def loss(w):
            logits = images.reshape(images.shape[0], -1) @ w
            onehot = jax.nn.one_hot(labels, 10)
            return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * onehot, axis=-1))

        value, grad = jax.value_and_grad(loss)(w)
        return w - 0.1 * grad, value

    w = jnp.zeros((3 * 8 * 8, 10), jnp.float32)
    losses = []
    for _ in range(3):
        for b in loader:
            w, value = step(w, b["image"], b["label"])
            losses.append(float(value))
    assert len(losses) == 3 * (ROWS // 8) and np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < losses[0]  # it learns on the batches it is given


def test_wide_integers_are_refused_not_wrapped(tmp_path):
    gpuload.ingest(tmp_path / "ids", {"id": np.array([1, 2**40, 3], dtype=np.int64)})
    t = gpuload.open_table(tmp_path / "ids")
    with pytest.raises(ValueError, match="jax_enable_x64"):
        next(iter(gpuload.jax(t, batch_size=3)))
    jax.config.update("jax_enable_x64", True)
    try:
        b = next(iter(gpuload.jax(t, batch_size=3)))
        assert b["id"].dtype == jnp.int64 and int(b["id"][1]) == 2**40
    finally:
        jax.config.update("jax_enable_x64", False)


def test_bad_calls_are_refused(table):
    with pytest.raises(ValueError, match="needs batch_size"):
        gpuload.jax(table)
    with pytest.raises(TypeError, match="jax.sharding.Sharding"):
        gpuload.jax(table, batch_size=4, sharding="data")


_SHARDED = """
import json, sys
import numpy as np
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import gpuload
from gpuload import ops

t = gpuload.open_table(sys.argv[1])
mesh = Mesh(np.array(jax.devices()), ("data",))
sharding = NamedSharding(mesh, P("data"))
kw = dict(batch_size=8, shuffle=True, seed=4, columns=["image", "label"], device="cpu",
          image=[ops.Resize((8, 8))])
plain = [{k: np.asarray(v) for k, v in b.items()} for b in gpuload.jax(t, **kw)]
out = {"devices": len(jax.devices()), "batches": 0, "ok": True}
loader = gpuload.jax(t, sharding=sharding, drop_last=True, **kw)
out["rank_world"] = [loader.loader.rank, loader.loader.world_size]
for g, p in zip(loader, plain):
    out["batches"] += 1
    for k in ("image", "label"):
        x = g[k]
        out["ok"] &= x.sharding == sharding and x.shape == p[k].shape
        rows = []
        for s in sorted(x.addressable_shards, key=lambda s: s.index[0].start):
            rows.append(np.asarray(s.data))
            out["ok"] &= np.array_equal(np.asarray(s.data), p[k][s.index])  # its own rows
        out["ok"] &= len(rows) == 2 and np.array_equal(np.concatenate(rows), p[k])  # the union
try:
    for _ in gpuload.jax(t, sharding=sharding, batch_size=7, columns=["label"]):
        pass
    out["uneven"] = "no error"
except ValueError as e:
    out["uneven"] = str(e)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.timeout(300)
def test_sharded_over_two_host_devices(table):
    """XLA_FLAGS=--xla_force_host_platform_device_count=2 (a fresh process): each device holds
    its half of every batch, the global batch is their union and equals the unsharded one."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SHARDED), table.url],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    assert out["devices"] == 2 and out["rank_world"] == [0, 1]
    assert out["batches"] == ROWS // 8 and out["ok"]
    assert "does not split over the sharding" in out["uneven"] and "drop_last=True" in out["uneven"]


def test_windows_equal_the_torch_door(tmp_path):
    from ..loader.test_windows import episode_table

    t = episode_table(tmp_path / "ep", [3, 1, 9, 6])
    kw = dict(batch_size=5, shuffle=True, seed=2, episode="episode_index",
              columns=["episode_index", "id", "action", "cam"], device="cpu",
              window={"action": range(0, 4), "id": [-1, 0]}, window_seconds={"cam": [-0.02, 0]},
              image={"cam": [ops.RandomResizedCrop(8), ops.RandomHorizontalFlip()]})  # fmt: skip
    got, want = list(gpuload.jax(t, **kw)), list(gpuload.pytorch(t, **kw))
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        assert g["cam"].shape == (len(w["id"]), 2, 3, 8, 8) and g["id_is_pad"].dtype == jnp.bool_
        for k in w:
            np.testing.assert_array_equal(np.asarray(g[k]), w[k].numpy())


def test_ragged_columns_are_padded_or_refused(tmp_path):
    rng = np.random.default_rng(0)
    traj = [rng.standard_normal((k, 2)).astype(np.float32) for k in (0, 3, 1, 5)]
    t = gpuload.ingest(str(tmp_path / "r"), {"id": np.arange(4), "traj": traj})
    with pytest.raises(ValueError, match="pad_ragged"):
        gpuload.jax(t, batch_size=2)
    b = next(iter(gpuload.jax(t, batch_size=4, pad_ragged=6)))
    assert b["traj"].shape == (4, 6, 2) and b["traj_length"].tolist() == [0, 3, 1, 5]
    np.testing.assert_array_equal(np.asarray(b["traj"])[3, :5], traj[3])
