"""Kernel warm-up (time to first batch): a loader's kernel is compiled in the background when
the loader is built, for exactly the argument types ``FusedImageStage.run`` passes; outputs are
byte-identical to the lazy path; a fork waits for it; ``gpuload warmup`` fills the kernel cache.

Each check runs in a fresh process, where no kernel is compiled yet: in this test process an
earlier test may already have compiled a specialisation, which would hide a warm-up that typed
its arguments differently from ``run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpuload import ops

PIPELINES = {
    "float32_nchw_flip": "RandomResizedCrop(24), RandomHorizontalFlip(), "
    "Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))",
    "uint8_nhwc": "Resize(20), CenterCrop(16), ToDtype('uint8'), ToLayout('NHWC')",
}

# mode "warm": warm up, wait, count the kernel's specialisations, run; "lazy": just run.
# Prints the specialisation counts and writes the output bytes to argv[3].
SCRIPT = r"""
import json, sys
import numpy as np
from gpuload import ops
from gpuload.ops import stage as st

mode, text, path = sys.argv[1:4]
plan = ops.compile_ops(ops.parse_ops(text))
rng = np.random.default_rng(7)
B = 5
H = rng.integers(17, 61, B)
W = rng.integers(17, 61, B)
src = rng.integers(0, 256, int((H * W * 3).sum()), dtype=np.uint8)
meta = np.zeros((B, 4), np.int64)
meta[1:, 0] = np.cumsum(H * W * 3)[:-1]
meta[:, 1], meta[:, 2], meta[:, 3] = H, W, 3
params = plan.sample_params(H, W, np.arange(B), 3, 0)
windows = plan.scale_window(params, H, W)
kernel = st.cpu_kernel_for(plan.kernel_spec)
before = None
if mode == "warm":
    ops.warm_up(plan).result(timeout=600)
    before = len(kernel.signatures)
stage = ops.FusedImageStage(plan, batch_size=B)
out = stage.run(src, meta, windows, params)
np.ascontiguousarray(out).view(np.uint8).tofile(path)
print(json.dumps({"before_run": before, "after_run": len(kernel.signatures)}))
"""


# A cold start, in two processes. The first runs a stage before the kernel exists anywhere:
# its warm-up compiles the kernel in a child process, and the run goes to the NumPy twin; the
# process then exits while the child still compiles. The second (after the child finished)
# runs the same batch on the kernel it loads from the disk cache (a hit, nothing compiled).
COLD_SCRIPT = (
    SCRIPT.split("kernel = st.cpu_kernel_for", 1)[0]
    + r"""
import time
from gpuload.kernels import fused
stage = ops.FusedImageStage(plan, batch_size=B)
kernel = st.cpu_kernel_for(plan.kernel_spec)
fut = ops.warm_up(plan)
if mode == "warm":
    fut.result(timeout=600)
out = np.array(stage.run(src, meta, windows, params))
np.ascontiguousarray(out).view(np.uint8).tofile(path)
deadline = time.monotonic() + 60
while mode == "cold" and not fused.COMPILING_CHILDREN and time.monotonic() < deadline:
    time.sleep(0.01)
print(json.dumps({"twin": stage.twin_batches, "signatures": len(kernel.signatures),
                  "hits": sum(kernel.stats.cache_hits.values()),
                  "misses": sum(kernel.stats.cache_misses.values()),
                  "child": sorted(fused.COMPILING_CHILDREN)}))
"""
)


def _wait_gone(pid: int, seconds: float) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.timeout(900)
def test_a_cold_stage_runs_the_twin_and_its_compile_outlives_the_process(tmp_path):
    """Cold: the first batch comes from the NumPy twin while a child compiles; that child
    finishes after its parent exits; the next process loads the kernel (no compile) and its
    output equals the twin's byte for byte."""
    env = {
        **os.environ,
        "GPULOAD_CACHE_DIR": str(tmp_path / "cache"),
        "NUMBA_CACHE_DIR": str(tmp_path / "numba"),
    }
    text = PIPELINES["float32_nchw_flip"]

    def run(mode: str) -> dict:
        return _child(mode, text, tmp_path / f"{mode}.bin", env, script=COLD_SCRIPT)

    cold = run("cold")
    assert cold["twin"] == 1 and cold["signatures"] == 0 and len(cold["child"]) == 1, cold
    if not _wait_gone(cold["child"][0], 500):
        os.kill(cold["child"][0], 9)
        pytest.fail(f"the compiling child {cold['child'][0]} did not finish")
    warm = run("warm")
    assert warm == {"twin": 0, "signatures": 1, "hits": 1, "misses": 0, "child": []}, warm
    a = np.fromfile(tmp_path / "cold.bin", np.uint8)
    b = np.fromfile(tmp_path / "warm.bin", np.uint8)
    assert a.size > 0 and np.array_equal(a, b)


def _child(mode: str, text: str, path, env=None, script: str = SCRIPT) -> dict:
    p = subprocess.run(
        [sys.executable, "-c", script, mode, text, str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_warm_up_compiles_what_run_uses_and_changes_no_output(name, tmp_path):
    text = PIPELINES[name]
    warm = _child("warm", text, tmp_path / "warm.bin")
    # the warm-up made exactly the specialisation run() used: run compiled nothing more
    assert warm == {"before_run": 1, "after_run": 1}
    lazy = _child("lazy", text, tmp_path / "lazy.bin")
    assert lazy["after_run"] == 1
    a = np.fromfile(tmp_path / "warm.bin", np.uint8)
    b = np.fromfile(tmp_path / "lazy.bin", np.uint8)
    assert a.size > 0 and np.array_equal(a, b)


LOADER_SCRIPT = r"""
import json, sys
import gpuload
from gpuload import ops
from gpuload.ops import stage as st

t = gpuload.open_table(sys.argv[1])
image = ops.parse_ops(sys.argv[2])
batches = t.batches(8, shuffle=True, seed=0, columns=["image", "id"], image=image)
plan = ops.compile_ops(image)
kernel = st.cpu_kernel_for(plan.kernel_spec)
done = ops.wait_for_warmups(timeout=600)
before = len(kernel.signatures)  # compiled by building the loader, before any iteration
first = next(iter(batches))
print(json.dumps({"done": done, "before": before, "after": len(kernel.signatures),
                  "rows": len(first["id"])}))
"""


@pytest.mark.timeout(900)
def test_building_a_loader_starts_the_warm_up(ids_table):
    p = subprocess.run(
        [sys.executable, "-c", LOADER_SCRIPT, ids_table.url, PIPELINES["float32_nchw_flip"]],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {
        "done": True,
        "before": 1,
        "after": 1,
        "rows": 8,
    }


FORK_SCRIPT = r"""
import multiprocessing as mp, sys
import numpy as np
from gpuload import ops

plan = ops.compile_ops(ops.parse_ops(sys.argv[1]))

def child(q):
    stage = ops.FusedImageStage(plan, batch_size=2)
    H = W = np.array([20, 30])
    src = np.full(int((H * W * 3).sum()), 100, np.uint8)
    meta = np.array([[0, 20, 20, 3], [1200, 30, 30, 3]], np.int64)
    p = plan.sample_params(H, W, np.arange(2), 0, 0)
    q.put(stage.run(src, meta, plan.scale_window(p, H, W), p).shape)

fut = ops.warm_up(plan)
running = not ops.wait_for_warmups(timeout=0)
ctx = mp.get_context("fork")
q = ctx.Queue()
proc = ctx.Process(target=child, args=(q,))
proc.start()  # waits for the warm-up first: the child must not inherit a held compiler lock
print("running" if running else "finished", "before fork;", "done at fork:", fut.done())
print("child:", q.get(timeout=300))
proc.join(60)
print("exit", proc.exitcode)
"""


@pytest.mark.timeout(900)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only exists on POSIX")
def test_fork_waits_for_the_warm_up():
    p = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, PIPELINES["uint8_nhwc"]],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "done at fork: True" in out, out
    assert "child: (2, 16, 16, 3)" in out and "exit 0" in out, out


def test_parse_ops_takes_only_literal_calls_of_known_ops():
    got = ops.parse_ops("ops.Resize(32), CenterCrop((24, 24)), ToDtype(dtype='float16')")
    assert got == [ops.Resize(32), ops.CenterCrop((24, 24)), ops.ToDtype("float16")]
    for bad in ("os.system('true')", "Resize(__import__('os'))", "Resize(n)", "Resize(1) + 1"):
        with pytest.raises(ValueError, match="image ops|literals"):
            ops.parse_ops(bad)
    with pytest.raises(ValueError, match="cannot parse"):
        ops.parse_ops("Resize(")


@pytest.mark.timeout(900)
def test_cli_warmup_fills_an_empty_kernel_cache(tmp_path):
    env = {**os.environ, "GPULOAD_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "gpuload", "warmup", "--image", PIPELINES["uint8_nhwc"]]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    cached = os.listdir(tmp_path / "cache" / "kernels" / "__pycache__")
    assert any(f.endswith(".nbc") for f in cached), cached
    # a fresh process then loads it from the cache: Numba counts a hit and no miss
    probe = (
        "import json, sys; from gpuload import ops; from gpuload.ops import stage as st\n"
        "plan = ops.compile_ops(ops.parse_ops(sys.argv[1]))\n"
        "k = st.cpu_kernel_for(plan.kernel_spec); ops.warm_up(plan).result()\n"
        "print(json.dumps([sum(k.stats.cache_hits.values()), "
        "sum(k.stats.cache_misses.values())]))"
    )
    q = subprocess.run(
        [sys.executable, "-c", probe, PIPELINES["uint8_nhwc"]],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert q.returncode == 0, q.stderr[-3000:]
    assert json.loads(q.stdout.strip().splitlines()[-1]) == [1, 0]
    marker = tmp_path / "executed"
    hostile = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    bad = subprocess.run(
        [sys.executable, "-m", "gpuload", "warmup", "--image", hostile],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert bad.returncode == 2 and "image ops must be calls of" in bad.stderr
    assert not marker.exists()  # parsed, never evaluated
