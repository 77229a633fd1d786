"""Batches stay valid for as long as the user holds them (issue 11): the image fast path reuses
a ring of output buffers, and a slot whose batch is still alive gets a fresh buffer instead of
being overwritten. Every test keeps batches across three epochs and compares them with a run
that copies each batch at once; the copy-and-drop run must allocate nothing new."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import gpuload
from gpuload import ops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPOCHS = 3


def _image_ops():
    return [
        ops.RandomResizedCrop(16, scale=(0.3, 1.0)),
        ops.RandomHorizontalFlip(),
        ops.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    ]


def _kw(**over):
    kw = dict(batch_size=4, shuffle=True, seed=7, image=_image_ops(), columns=["image", "label"])
    return kw | over


def _epochs(loader, keep):
    """Every batch of EPOCHS passes, through ``keep`` (which decides what is held)."""
    return [keep(b) for _ in range(EPOCHS) for b in loader]


def _as_np(x):
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


@pytest.fixture
def table(robot_table):
    t, _ = robot_table(40, seed=3)
    return t


def test_torch_fast_path_keeps_every_batch(table):
    torch = pytest.importorskip("torch")
    held = gpuload.pytorch(table, **_kw())
    kept = _epochs(held, lambda b: b["image"])  # the tensors themselves, nothing copied
    fresh = gpuload.pytorch(table, **_kw())
    ref = _epochs(fresh, lambda b: b["image"].clone())
    assert len(kept) == EPOCHS * 10
    for i, (a, b) in enumerate(zip(kept, ref)):
        assert torch.equal(a, b), f"kept batch {i} was overwritten"
    assert held.stats().images["held_replaced"] > 0  # the ring came round while they were held
    assert fresh.stats().images["held_replaced"] == 0  # the usual loop allocates nothing


def test_slices_and_numpy_views_keep_their_batch_alive(table):
    pytest.importorskip("torch")
    held = gpuload.pytorch(table, **_kw())
    kept = _epochs(held, lambda b: (b["image"][1], b["image"].numpy()[2:]))
    ref = _epochs(gpuload.pytorch(table, **_kw()), lambda b: b["image"].clone())
    for (row1, tail), r in zip(kept, ref):
        np.testing.assert_array_equal(row1.numpy(), r[1].numpy())
        np.testing.assert_array_equal(tail, r[2:].numpy())


def test_table_batches_keep_their_numpy_arrays(table):
    held = table.batches(**_kw())
    kept = _epochs(held, lambda b: b["image"])
    ref = _epochs(table.batches(**_kw()), lambda b: b["image"].copy())
    for i, (a, b) in enumerate(zip(kept, ref)):
        np.testing.assert_array_equal(a, b, err_msg=f"kept batch {i}")
    assert held.stats().images["held_replaced"] > 0


def test_tensorflow_batches_stay_valid(table):
    pytest.importorskip("tensorflow")
    ds = gpuload.tensorflow(table, **_kw())
    kept = [b["image"] for _ in range(EPOCHS) for b in ds]
    ref_ds = gpuload.tensorflow(table, **_kw())
    ref = [b["image"].numpy().copy() for _ in range(EPOCHS) for b in ref_ds]
    assert len(kept) == len(ref) == EPOCHS * 10
    for i, (a, b) in enumerate(zip(kept, ref)):
        np.testing.assert_array_equal(a.numpy(), b, err_msg=f"kept batch {i}")


def test_dropped_batches_reuse_the_ring_and_held_ones_do_not(table):
    """The mechanism itself: a held view keeps its slot's buffer; once dropped, the slot is
    written again in place."""
    from gpuload.ops import FusedImageStage, compile_ops

    plan = compile_ops([ops.Resize((4, 4))])
    stage = FusedImageStage(plan, batch_size=2, device="cpu", depth=2)
    src = np.arange(2 * 6 * 6 * 3, dtype=np.uint8)
    meta = np.array([[0, 6, 6, 3], [108, 6, 6, 3]], np.int64)
    params = plan.sample_params(meta[:, 1], meta[:, 2], np.arange(2), seed=0, epoch=0)
    windows = plan.scale_window(params, meta[:, 1], meta[:, 2])
    a = stage.run(src, meta, windows, params)
    first = a.copy()
    buf = stage.outputs[0]
    stage.run(src, meta, windows, params)
    src2 = (255 - src).astype(np.uint8)
    stage.run(src2, meta, windows, params)  # slot 0 again, while `a` is held
    assert stage.held_replaced == 1 and stage.outputs[0] is not buf
    np.testing.assert_array_equal(a, first)
    del a
    buf = stage.outputs[1]
    b = stage.run(src2, meta, windows, params)  # slot 1: its batch was dropped
    assert stage.outputs[1] is buf and stage.held_replaced == 1
    assert np.shares_memory(b, buf)


@pytest.mark.cudasim
def test_cuda_path_keeps_held_batches_under_the_simulator(tmp_path, table):
    """The same on the CUDA path (device arrays), run by Numba's CUDA simulator."""
    code = f"""
import numpy as np, gpuload
from gpuload import ops
from gpuload.loader import make_loader
from gpuload.spec import LoaderSpec
t = gpuload.open_table({table.url!r})
image = [ops.RandomResizedCrop(6, scale=(0.3, 1.0)), ops.RandomHorizontalFlip()]
def run(keep):
    # the simulator runs kernels in Python threads and is not thread-safe: one loader thread
    L = make_loader(t, LoaderSpec(batch_size=4, shuffle=True, seed=1, num_threads=1, prefetch=1,
                                  image=image, decoder="cpu", device="cuda", columns=["image"]))
    out = [keep(b["image"]) for _ in range(2) for b in L]
    return out, L.stats().images["held_replaced"]
held, n_held = run(lambda x: x)
ref, n_ref = run(lambda x: x.copy_to_host())
assert n_held > 0 and n_ref == 0, (n_held, n_ref)
np.save({str(tmp_path / "sim.npy")!r}, np.stack([np.stack([h.copy_to_host() for h in held]), np.stack(ref)]))
"""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT
    )
    assert p.returncode == 0, p.stderr[-3000:]
    held, ref = np.load(tmp_path / "sim.npy")
    np.testing.assert_array_equal(held, ref)
