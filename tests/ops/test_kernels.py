"""Parity of the fused kernel (CPU, CUDA simulator, real CUDA) against the NumPy float64
reference in tests/_reference_ops.py, plus the bit-exact dtype encoders.

Tolerances (errors measured against the float64 reference, "range" = max - min of the
reference batch):
  float32   max |err| < 1e-3 * range
  float16   |err| <= 1e-3 * range + 2**-10 * |ref|   (one float16 ulp on top of the float32 error)
  bfloat16  |err| <= 1e-3 * range + 2**-7 * |ref|    (one bfloat16 ulp)
  uint8     |err| <= 1 (of 255)

Run as a script (``python tests/ops/test_kernels.py --cudasim-worker IN OUT``) it is the worker the
simulator tests start in a subprocess with NUMBA_ENABLE_CUDASIM=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _reference_ops as R  # noqa: E402
from gpuload.kernels import fused as F  # noqa: E402
from gpuload.kernels import fused_numpy as FN  # noqa: E402

from gpuload import ops  # noqa: E402

F32_TOL = 1e-3
F16_ULP = 2.0**-10
BF16_ULP = 2.0**-7

# ---------------------------------------------------------------------------------------------
# helpers shared by the parent and the simulator worker
# ---------------------------------------------------------------------------------------------


def make_ops(cfg: dict) -> list:
    """Op list from a JSON-able config (so the simulator worker can rebuild the plan)."""
    out = [ops.RandomResizedCrop(tuple(cfg["size"]), scale=tuple(cfg.get("scale", (0.08, 1.0))))]
    if cfg.get("flip", True):
        out.append(ops.RandomHorizontalFlip(cfg.get("p", 0.5)))
    jit = cfg.get("jitter", (0.5, 0.5, 0.5))
    if any(jit):
        out.append(ops.ColorJitter(*jit))
    if cfg.get("normalize", True) and cfg["dtype"] != "uint8":
        out.append(ops.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    out += [ops.ToDtype(cfg["dtype"]), ops.ToLayout(cfg["layout"])]
    return out


def make_case(seed: int, cfg: dict, sizes):
    rng = np.random.default_rng(seed)
    plan = ops.compile_ops(make_ops(cfg))
    imgs = [R.random_image(rng, *s) for s in sizes]
    src, meta = R.pack_images(imgs)
    rows = rng.integers(0, 10**9, size=len(imgs))
    params = plan.sample_params(meta[:, 1], meta[:, 2], rows, seed=seed, epoch=3)
    # force both flip states and random sub-pixel windows (the kernel must handle any window)
    params[:, ops.PARAM_FLIP] = np.arange(len(imgs)) % 2
    wins = plan.scale_window(params, meta[:, 1], meta[:, 2]).astype(np.float64)
    jitter = rng.uniform(-0.4, 0.4, size=wins.shape) * np.minimum(1.0, wins[:, 2:3] / 10)
    wins = wins + jitter
    wins[:, 2:] = np.maximum(wins[:, 2:], 0.5)
    return plan, src, meta, wins.astype(np.float32), params


def assert_close(got_storage: np.ndarray, plan, ref: np.ndarray, what: str = "") -> float:
    """Compare kernel output (storage dtype) with reference float64 values; returns the error."""
    dt = plan.out_dtype
    assert got_storage.shape == ref.shape, (got_storage.shape, ref.shape)
    rng_ = float(ref.max() - ref.min())
    assert rng_ > 0.1, "test data must not be constant"
    if dt == "uint8":
        want = R.encode(ref, "uint8").astype(np.int64)
        err = np.abs(got_storage.astype(np.int64) - want)
        assert err.max() <= 1, (
            f"{what}: uint8 off by {err.max()} at {np.unravel_index(err.argmax(), err.shape)}"
        )
        return float(err.max())
    got = R.decoded_values(got_storage, dt)
    err = np.abs(got - ref)
    if dt == "float32":
        bound = F32_TOL * rng_
    elif dt == "float16":
        bound = F32_TOL * rng_ + F16_ULP * np.abs(ref)
    else:
        bound = F32_TOL * rng_ + BF16_ULP * np.abs(ref)
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {dt} error {err.max():.3g} > bound at {np.unravel_index(np.argmax(err - bound), err.shape)}"
    )
    return float(err.max() / rng_)


def run_cpu(plan, src, meta, wins, params, mode="separable", kernel=None):
    """Run ``kernel`` (default: the compiled CPU kernel of ``mode``) on one batch."""
    k = kernel if kernel is not None else F.get_cpu_kernel(plan.kernel_spec, mode)
    out = np.full(plan.out_shape(meta.shape[0]), 77, dtype=plan.storage_dtype)
    means = np.zeros(meta.shape[0], np.float32)
    k(
        src,
        meta,
        wins,
        params,
        plan.mean_array(),
        plan.inv_std_array(),
        means,
        out.view(F.STORAGE_DTYPE[plan.out_dtype]),
    )
    return out


# Source sizes: odd sizes, a tiny source upsampled, sources much larger than the output (shrink
# > 2x -> antialias), grayscale (C=1) and RGBA (C=4).
SIZES = [(7, 9, 3), (3, 2, 3), (101, 143, 3), (33, 47, 1), (257, 90, 3), (61, 203, 4), (12, 11, 1)]


def _aa_axes(wins, out_size):
    return (wins[:, 2] / out_size[0] > 2).any(), (wins[:, 3] / out_size[1] > 2).any()


CPU_CASES = [
    dict(dtype="float32", layout="NCHW", size=(19, 23)),
    dict(dtype="float32", layout="NHWC", size=(24, 20), jitter=(0.0, 0.6, 0.0)),  # grid subsamples
    dict(dtype="float16", layout="NCHW", size=(17, 12)),
    dict(dtype="float16", layout="NHWC", size=(9, 21)),
    dict(dtype="bfloat16", layout="NCHW", size=(15, 15)),
    dict(dtype="bfloat16", layout="NHWC", size=(20, 13), jitter=(0.3, 0.0, 0.0)),
    dict(dtype="uint8", layout="NCHW", size=(14, 18)),
    dict(dtype="uint8", layout="NHWC", size=(11, 25), jitter=(0.0, 0.0, 0.8)),
    dict(
        dtype="float32", layout="NCHW", size=(13, 31), jitter=(0, 0, 0), flip=False, normalize=False
    ),
]


@pytest.mark.parametrize(
    "cfg", CPU_CASES, ids=lambda c: f"{c['dtype']}-{c['layout']}-{c['size'][0]}x{c['size'][1]}"
)
def test_cpu_kernel_matches_reference(cfg):
    plan, src, meta, wins, params = make_case(11, cfg, SIZES)
    aa_y, aa_x = _aa_axes(wins, plan.out_size)
    assert aa_y and aa_x, "the case set must exercise the antialiased path in both axes"
    assert (wins[:, 2] < plan.out_size[0]).any(), "the case set must exercise upsampling"
    ref = R.reference_batch(src, meta, wins, params, plan)
    out = run_cpu(plan, src, meta, wins, params)
    assert_close(out, plan, ref, f"cpu {cfg}")


@pytest.mark.parametrize(
    "cfg", CPU_CASES, ids=lambda c: f"{c['dtype']}-{c['layout']}-{c['size'][0]}x{c['size'][1]}"
)
def test_numpy_twin_gives_the_compiled_kernels_bytes(cfg):
    """The NumPy twin that a cold stage runs while the kernel compiles: bit for bit the
    compiled kernel's output (both evaluate the same float32 operations in the same order),
    on one thread and on two; the cases mix bilinear and antialiased axes, C = 1, 3, 4."""
    for seed in (0, 1):
        plan, src, meta, wins, params = make_case(seed, cfg, SIZES)
        want = run_cpu(plan, src, meta, wins, params)
        twin = FN.get_numpy_kernel(plan.kernel_spec, threads=1 + seed)
        got = run_cpu(plan, src, meta, wins, params, kernel=twin)
        diff = np.nonzero(got.view(np.uint8).ravel() != want.view(np.uint8).ravel())[0]
        assert diff.size == 0, f"{diff.size} bytes differ, first at byte {diff[:3]}"


@pytest.mark.parametrize("dtype,layout", [("float32", "NHWC"), ("uint8", "NCHW")])
def test_cpu_direct_form_matches_reference(dtype, layout):
    """The CUDA thread body (``pixel``) compiled for the CPU: same math as the CUDA kernel."""
    cfg = dict(dtype=dtype, layout=layout, size=(12, 14))
    plan, src, meta, wins, params = make_case(5, cfg, SIZES)
    ref = R.reference_batch(src, meta, wins, params, plan)
    assert_close(run_cpu(plan, src, meta, wins, params, mode="direct"), plan, ref, "direct")


def test_cpu_kernel_larger_batch_random_sizes():
    """More images, random sizes, many row blocks per image (B smaller than 4x threads)."""
    rng = np.random.default_rng(99)
    sizes = [
        (int(rng.integers(1, 300)), int(rng.integers(1, 300)), int(rng.choice([1, 3])))
        for _ in range(12)
    ]
    cfg = dict(dtype="float32", layout="NCHW", size=(40, 33))
    plan, src, meta, wins, params = make_case(21, cfg, sizes)
    ref = R.reference_batch(src, meta, wins, params, plan)
    assert_close(run_cpu(plan, src, meta, wins, params), plan, ref, "random sizes")
    # one image alone gives the same values as inside the batch (no cross-sample leakage)
    one = run_cpu(plan, src, meta[3:4], wins[3:4], params[3:4])
    full = run_cpu(plan, src, meta, wins, params)
    np.testing.assert_allclose(one[0], full[3], rtol=0, atol=1e-5)


def test_kernel_flip_mirrors_output():
    cfg = dict(dtype="float32", layout="NCHW", size=(10, 13), jitter=(0, 0, 0))
    plan, src, meta, wins, params = make_case(3, cfg, [(40, 50, 3), (40, 50, 3)])
    params[:, ops.PARAM_FLIP] = [0, 1]
    meta[1] = meta[0]
    wins[1] = wins[0]
    out = run_cpu(plan, src, meta, wins, params)
    np.testing.assert_allclose(out[1], out[0][:, :, ::-1], atol=1e-5)
    assert not np.allclose(out[1], out[0], atol=1e-3)


def test_reference_agrees_with_torch_interpolate():
    """Pins the resampling convention: half-pixel centres, edge clamp (torch bilinear,
    align_corners=False), and for shrink > 2x torch's antialias=True in the interior."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    img = R.random_image(rng, 37, 53, 3)
    t = torch.from_numpy(img.astype(np.float64) / 255).permute(2, 0, 1)[None]
    for oh, ow in [(50, 70), (30, 29), (20, 40)]:  # up, mild down (<= 2x) both axes
        mine = R.resample(img, (0, 0, 37, 53), oh, ow)
        theirs = (
            torch.nn.functional.interpolate(
                t, size=(oh, ow), mode="bilinear", align_corners=False, antialias=False
            )[0]
            .permute(1, 2, 0)
            .numpy()
        )
        np.testing.assert_allclose(mine, theirs, atol=1e-9)
    big = R.random_image(rng, 160, 190, 3)
    tb = torch.from_numpy(big.astype(np.float64) / 255).permute(2, 0, 1)[None]
    oh, ow = 23, 31  # shrink ~7x, ~6x: antialias
    mine = R.resample(big, (0, 0, 160, 190), oh, ow)
    theirs = (
        torch.nn.functional.interpolate(
            tb, size=(oh, ow), mode="bilinear", align_corners=False, antialias=True
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    # borders differ by design (we replicate edge pixels, torch drops out-of-image taps)
    np.testing.assert_allclose(mine[2:-2, 2:-2], theirs[2:-2, 2:-2], atol=1e-9)
    assert np.abs(mine - theirs).max() < 0.2


# ---------------------------------------------------------------------------------------------
# encoders
# ---------------------------------------------------------------------------------------------


def _encoder_values() -> np.ndarray:
    rng = np.random.default_rng(7)
    vals = [
        rng.normal(0, 3, 20000),
        rng.uniform(-70000, 70000, 5000),
        np.exp(rng.uniform(-110, 90, 20000))
        * rng.choice([-1, 1], 20000),  # huge range of exponents
        rng.uniform(-(2**-13), 2**-13, 3000),  # float16 subnormals
        np.array(
            [
                0.0,
                -0.0,
                1.0,
                -1.0,
                65504,
                65519.99,
                65520,
                65536,
                1e38,
                3.4e38,
                -3.4e38,
                2.0**-14,
                2.0**-24,
                2.0**-25,
                2.0**-25 * 1.0001,
                2.0**-126,
                2.0**-130,
                2.0**-149,
                np.inf,
                -np.inf,
                1 + 2.0**-11,
                1 + 3 * 2.0**-11,
                1 + 2.0**-8,
                1 + 3 * 2.0**-8,
            ]
        ),
    ]
    with np.errstate(over="ignore"):
        v = np.concatenate(vals).astype(np.float32)
    # exact ties for both formats
    ties16 = (np.arange(1024, 2048, 7) + 0.5).astype(np.float32) / 1024
    ties_bf = (np.arange(128, 256, 3) + 0.5).astype(np.float32) / 128
    sub_ties16 = ((np.arange(0, 1024) + 0.5) * 2.0**-24).astype(
        np.float32
    )  # float16 subnormal ties
    sub_tiesbf = ((np.arange(0, 128) + 0.5) * 2.0**-133).astype(
        np.float32
    )  # bfloat16 subnormal ties
    return np.concatenate([v, ties16, ties_bf, -ties16, sub_ties16, -sub_ties16, sub_tiesbf])


def test_encoders_bit_exact():
    import numba

    lib = F._lib("cpu")
    e16, ebf, eu8 = lib["enc_f16"], lib["enc_bf16"], lib["enc_u8"]

    @numba.njit
    def run(x, a, b):
        for i in range(x.size):
            a[i] = e16(x[i])
            b[i] = ebf(x[i])

    x = _encoder_values()
    a = np.zeros(x.size, np.uint16)
    b = np.zeros(x.size, np.uint16)
    run(x, a, b)
    with np.errstate(over="ignore"):
        want16 = x.astype(np.float16).view(np.uint16)
    want_bf = R.float_to_bf16_bits(x)
    bad16 = np.nonzero(a != want16)[0]
    assert bad16.size == 0, (
        f"float16 mismatch for {x[bad16[:5]]}: {a[bad16[:5]]} vs {want16[bad16[:5]]}"
    )
    badbf = np.nonzero(b != want_bf)[0]
    assert badbf.size == 0, (
        f"bfloat16 mismatch for {x[badbf[:5]]}: {b[badbf[:5]]} vs {want_bf[badbf[:5]]}"
    )
    # the integer twins used by the CPU driver (they round from the float's bit pattern)
    b16, bbf = lib["bits_f16"], lib["bits_bf16"]

    @numba.njit
    def run_bits(u, a, b):
        for i in range(u.size):
            a[i] = b16(np.int64(u[i]))
            b[i] = bbf(np.int64(u[i]))

    a2 = np.zeros_like(a)
    b2 = np.zeros_like(b)
    run_bits(x.view(np.uint32), a2, b2)
    np.testing.assert_array_equal(a2, want16)
    np.testing.assert_array_equal(b2, want_bf)
    # ... and the NumPy twin's (what a cold stage runs), NaNs of either sign and any payload
    # included (the kernel writes one quiet NaN for all of them)
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FBFFFFF], np.uint32)
    xs = np.concatenate([x, nans.view(np.float32)])
    k16 = np.zeros(xs.size, np.uint16)
    kbf = np.zeros(xs.size, np.uint16)
    run_bits(xs.view(np.uint32), k16, kbf)
    np.testing.assert_array_equal(FN.f16_bits(xs), k16)
    np.testing.assert_array_equal(FN.bf16_bits(xs), kbf)
    # NaN
    run_bits(np.array([np.nan], np.float32).view(np.uint32), a2[:1], b2[:1])
    assert np.isnan(np.array([a2[0]], np.uint16).view(np.float16)[0]) and b2[0] == 0x7FC0
    run(np.array([np.nan], np.float32), a[:1], b[:1])
    assert np.isnan(np.array([a[0]], np.uint16).view(np.float16)[0]) and b[0] == 0x7FC0

    @numba.njit
    def run8(x, o):
        for i in range(x.size):
            o[i] = eu8(x[i])

    v = np.concatenate([np.linspace(-10, 265, 5501), np.arange(256) + 0.5]).astype(np.float32)
    o = np.zeros(v.size, np.int64)
    run8(v, o)
    np.testing.assert_array_equal(o, np.floor(np.clip(v.astype(np.float64), 0, 255) + 0.5))


def test_python_lib_is_the_same_math():
    """The kernel source also runs as plain Python (identity decorator)."""
    lib = F.python_lib()
    for v in [0.1, 1.0 / 3, 65519.0, 2.0**-20, -7.25]:
        assert lib["enc_f16"](np.float32(v)) == int(
            np.float32(v).astype(np.float16).view(np.uint16)
        )
    c, s, lo, n = lib["axis"](3, np.float32(10.0), np.float32(100.0), 10)
    assert s == 10.0 and n >= 20 and lo <= c - 10 < lo + 1


def test_kernel_input_check():
    src = np.arange(300, dtype=np.uint8)
    meta = np.array([[0, 10, 10, 3]], np.int64)
    win = np.array([[0, 0, 5, 5]], np.float32)
    prm = np.ones((1, F.NUM_PARAMS), np.float32)
    assert F.check_inputs(src.size, meta, win, prm, F.NUM_PARAMS) == -1
    assert F.check_inputs(299, meta, win, prm, F.NUM_PARAMS) == 0
    for bad_meta in ([1, 10, 10, 3], [0, 0, 10, 3], [0, 10, 10, 2], [-1, 5, 5, 3]):
        assert F.check_inputs(src.size, np.array([bad_meta], np.int64), win, prm, F.NUM_PARAMS) == 0
    for bad_win in ([0, 0, 0, 5], [0, 0, 5, -1], [np.nan, 0, 5, 5], [0, 0, np.inf, 5]):
        assert (
            F.check_inputs(src.size, meta, np.array([bad_win], np.float32), prm, F.NUM_PARAMS) == 0
        )
    assert F.check_inputs(src.size, meta, win, prm[:, :5], F.NUM_PARAMS) == -2
    # sizes whose product wraps int64 (2**21 * 2**21 * 2**21 * 3), a huge offset: refused,
    # and the index is that of the first bad sample
    for bad_meta in (
        [0, 2**21, 2**42, 3],
        [0, 2**40, 2**40, 4],
        [2**62, 1, 1, 3],
        [0, 1, 2**62, 1],
    ):
        two = np.array([[0, 10, 10, 3], bad_meta], np.int64)
        assert F.check_inputs(src.size, two, np.repeat(win, 2, 0), np.repeat(prm, 2, 0), 8) == 1
    assert F.check_inputs(src.size, meta[:0], win[:0], prm[:0], F.NUM_PARAMS) == -1


# ---------------------------------------------------------------------------------------------
# on-disk kernel cache (generated modules + Numba's cache=True)
# ---------------------------------------------------------------------------------------------

# brightness + contrast + flip: both parallel loops of fused_cpu (contrast pre-pass, rows)
CACHE_CFG = dict(dtype="float32", layout="NCHW", size=(19, 23), jitter=(0.5, 0.5, 0.0))

_CACHE_CHILD = r"""
import json, sys, time
import numpy as np
from gpuload.kernels import fused as F
spec = F.KernelSpec(**json.loads(sys.argv[1]))
d = np.load(sys.argv[2])
k = F.get_cpu_kernel(spec)
out = np.full(tuple(d["shape"]), 77, np.float32)
t1 = time.perf_counter()
k(d["src"], d["meta"], d["win"], d["params"], d["mean"], d["inv_std"],
  np.zeros(d["meta"].shape[0], np.float32), out)
t2 = time.perf_counter()
np.save(sys.argv[3], out)
print(json.dumps({
    "first_call_s": t2 - t1,
    "hits": sum(k.stats.cache_hits.values()),
    "misses": sum(k.stats.cache_misses.values()),
    "cache_path": k.stats.cache_path,
    "module_file": sys.modules[k.py_func.__module__].__file__,
}))
"""


def _cache_env(cache_dir, **extra) -> dict:
    env = dict(os.environ, GPULOAD_CACHE_DIR=str(cache_dir), **extra)
    for var in ("GPULOAD_KERNEL_CACHE", "NUMBA_ENABLE_CUDASIM", "NUMBA_DISABLE_JIT"):
        env.pop(var, None)
    return env


@pytest.fixture(scope="module")
def disk_cache_runs(tmp_path_factory):
    """Two fresh processes, one after the other, requesting the same spec with an empty kernel
    cache directory (different hash seeds: the generated text must not depend on them)."""
    import dataclasses

    tmp = tmp_path_factory.mktemp("kcache")
    plan, src, meta, wins, params = make_case(31, CACHE_CFG, SIZES)
    spec = plan.kernel_spec
    assert spec.brightness and spec.contrast and spec.flip and not spec.saturation
    inp = tmp / "in.npz"
    np.savez(
        inp,
        src=src,
        meta=meta,
        win=wins,
        params=params,
        mean=plan.mean_array(),
        inv_std=plan.inv_std_array(),
        shape=np.array(plan.out_shape(meta.shape[0])),
    )
    runs = []
    for k in range(2):
        outp = tmp / f"out{k}.npy"
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _CACHE_CHILD,
                json.dumps(dataclasses.asdict(spec)),
                str(inp),
                str(outp),
            ],
            env=_cache_env(tmp / "cache", PYTHONHASHSEED=str(k + 1)),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert "NumbaWarning" not in proc.stderr, proc.stderr[-4000:]  # e.g. "Cannot cache"
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["out"] = np.load(outp)
        runs.append(res)
    return dict(
        tmp=tmp,
        cache=tmp / "cache",
        plan=plan,
        spec=spec,
        runs=runs,
        inputs=(src, meta, wins, params),
    )


def test_cpu_kernel_loads_from_disk_cache_in_a_new_process(disk_cache_runs):
    cold, warm = disk_cache_runs["runs"]
    kdir = disk_cache_runs["cache"] / "kernels"
    assert cold["misses"] == 1 and cold["hits"] == 0, cold
    # the second process loaded the machine code from Numba's on-disk cache: no compilation
    assert warm["hits"] == 1 and warm["misses"] == 0, warm
    assert warm["module_file"] == cold["module_file"]
    assert os.path.dirname(warm["module_file"]) == str(kdir)
    assert len(list(kdir.glob("fused_*.py"))) == 1
    if not os.environ.get("NUMBA_CACHE_DIR"):
        assert warm["cache_path"] == str(kdir / "__pycache__")
        assert list(kdir.glob("__pycache__/fused_*.fused_cpu-*.nbi"))
    assert warm["first_call_s"] < 0.5 * cold["first_call_s"], (cold, warm)
    np.testing.assert_array_equal(warm["out"], cold["out"])
    # and the output is the kernel's
    plan = disk_cache_runs["plan"]
    ref = R.reference_batch(*disk_cache_runs["inputs"], plan)
    assert_close(warm["out"], plan, ref, "disk-cached kernel")


def test_unwritable_kernel_cache_compiles_in_memory(disk_cache_runs, tmp_path, monkeypatch, caplog):
    """A cache directory that cannot be created falls back to compiling in memory (debug log),
    with results identical to the disk-cached kernel; two threads compile it once."""
    import logging
    import threading

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("GPULOAD_CACHE_DIR", str(blocker / "cache"))  # even root cannot mkdir
    monkeypatch.delenv("GPULOAD_KERNEL_CACHE", raising=False)
    spec = disk_cache_runs["spec"]
    with caplog.at_level(logging.DEBUG, logger="gpuload.kernels"):
        mod = F._load_module("cpu", spec, True, disk=True)  # what get_cpu_kernel does, uncached
    assert any("compiling the CPU kernel" in r.getMessage() for r in caplog.records), caplog.text
    assert mod.CACHE is False and not hasattr(mod, "__file__")
    k = mod.fused_cpu
    src, meta, wins, params = disk_cache_runs["inputs"]
    plan = disk_cache_runs["plan"]
    outs = [np.full(plan.out_shape(meta.shape[0]), 77, np.float32) for _ in range(2)]
    barrier = threading.Barrier(2)

    def run(o):
        barrier.wait()
        k(
            src,
            meta,
            wins,
            params,
            plan.mean_array(),
            plan.inv_std_array(),
            np.zeros(meta.shape[0], np.float32),
            o,
        )

    threads = [threading.Thread(target=run, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(k.stats.cache_misses.values()) == 1 and not k.stats.cache_hits  # compiled once
    for o in outs:
        np.testing.assert_array_equal(o, disk_cache_runs["runs"][0]["out"])


def test_kernel_modules_are_shared_and_written_atomically(tmp_path, monkeypatch):
    """Threads requesting the same spec share one generated module and kernel; concurrent
    writers of the same file never leave a partial or temporary file (rename), and every
    writer gives it the same mtime (Numba's cache index checks the source's mtime and size)."""
    import threading

    monkeypatch.setenv("GPULOAD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GPULOAD_KERNEL_CACHE", raising=False)
    spec = F.KernelSpec("uint8", "NHWC", brightness=True, saturation=True)
    got = []
    barrier = threading.Barrier(4)

    def request():
        barrier.wait()
        got.append(F.get_cpu_kernel(spec, parallel=False))

    threads = [threading.Thread(target=request) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(k is got[0] for k in got)
    if F._MODULES[("cpu", spec, False)].CACHE:  # not built earlier in this process elsewhere
        assert os.path.dirname(got[0].py_func.__code__.co_filename) == str(
            tmp_path / "cache" / "kernels"
        )

    # the writer itself, raced
    (tmp_path / "w").mkdir()
    path = str(tmp_path / "w" / "m.py")
    text = F.module_source("cpu", spec, False, cache=True).encode()
    assert text == F.module_source("cpu", spec, False, cache=True).encode()  # deterministic
    barrier = threading.Barrier(8)

    def write():
        barrier.wait()
        F._write_atomic(path, text)

    for _ in range(10):
        if os.path.exists(path):
            os.unlink(path)
        threads = [threading.Thread(target=write) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with open(path, "rb") as f:
            assert f.read() == text
        assert os.stat(path).st_mtime == F._SOURCE_MTIME
        assert os.listdir(tmp_path / "w") == ["m.py"]  # no temporary files left


def test_no_kernel_work_at_import(tmp_path):
    """Importing gpuload (and the kernel module) generates and compiles nothing."""
    code = (
        "import gpuload, gpuload.ops\n"
        "from gpuload.kernels import fused as F\n"
        "assert not F._MODULES and not F._KERNELS\n"
        "print('OK')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=_cache_env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------
# CUDA simulator (subprocess) and real GPU
# ---------------------------------------------------------------------------------------------

SIM_CASES = [
    dict(dtype="float32", layout="NCHW", size=(8, 10)),
    dict(dtype="float16", layout="NHWC", size=(9, 8), jitter=(0.4, 0.0, 0.4)),
    dict(dtype="bfloat16", layout="NCHW", size=(8, 8), jitter=(0.0, 0.5, 0.0)),
    dict(dtype="uint8", layout="NHWC", size=(10, 9)),
]
SIM_SIZES = [(5, 4, 3), (47, 61, 1), (26, 31, 3)]  # upsample, > 2x shrink (antialias), mild


def _sim_worker(inp: str, outp: str) -> None:
    """Runs inside NUMBA_ENABLE_CUDASIM=1: every case through FusedImageStage(device="cuda")."""
    from numba import cuda

    data = np.load(inp)
    cases = json.loads(str(data["cases"]))
    res = {}
    for k, cfg in enumerate(cases):
        plan = ops.compile_ops(make_ops(cfg))
        stage = ops.FusedImageStage(plan, batch_size=4, device="cuda")
        d = stage.run(data[f"src{k}"], data[f"meta{k}"], data[f"win{k}"], data[f"params{k}"])
        assert stage.event is not None
        stage.event.synchronize()
        assert cuda.devicearray.is_cuda_ndarray(d)
        res[f"out{k}"] = d.copy_to_host()
    np.savez(outp, **res)


def _run_sim(tmp_path, cases, sizes, seed=17, timeout=600):
    payload = {"cases": json.dumps(cases)}
    inputs = []
    for k, cfg in enumerate(cases):
        plan, src, meta, wins, params = make_case(seed + k, cfg, sizes)
        payload.update({f"src{k}": src, f"meta{k}": meta, f"win{k}": wins, f"params{k}": params})
        inputs.append((plan, src, meta, wins, params))
    inp, outp = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inp, **payload)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", NUMBA_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__)), "--cudasim-worker", str(inp), str(outp)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return inputs, np.load(outp)


@pytest.mark.cudasim
def test_cuda_kernel_simulator_matches_reference(tmp_path):
    inputs, res = _run_sim(tmp_path, SIM_CASES, SIM_SIZES)
    for k, (plan, src, meta, wins, params) in enumerate(inputs):
        ref = R.reference_batch(src, meta, wins, params, plan)
        got = res[f"out{k}"]
        assert got.dtype == plan.storage_dtype
        assert_close(got, plan, ref, f"cudasim {SIM_CASES[k]}")
        # and CUDA == CPU up to float32 rounding
        cpu = run_cpu(plan, src, meta, wins, params)
        if plan.out_dtype == "float32":
            np.testing.assert_allclose(got, cpu, atol=2e-5 * float(np.abs(ref).max()))


@pytest.mark.gpu
def test_cuda_kernel_real_gpu_matches_reference():
    """Real CUDA (no simulator): every dtype and layout at a realistic size."""
    from numba import cuda

    rng = np.random.default_rng(123)
    sizes = [(480, 640, 3), (375, 500, 3), (64, 48, 3), (1000, 300, 1), (227, 229, 4), (2, 3, 3)]
    for dtype in ("float32", "float16", "bfloat16", "uint8"):
        for layout in ("NCHW", "NHWC"):
            cfg = dict(dtype=dtype, layout=layout, size=(224, 224))
            plan, src, meta, wins, params = make_case(int(rng.integers(1 << 30)), cfg, sizes)
            stage = ops.FusedImageStage(plan, batch_size=8, device="cuda")
            d = stage.run(src, meta, wins, params)
            consumer = cuda.stream()
            stage.event.wait(consumer)
            got = d.copy_to_host(stream=consumer)
            consumer.synchronize()
            ref = R.reference_batch(src, meta, wins, params, plan)
            assert_close(got, plan, ref, f"gpu {dtype} {layout}")


_PTX_SCRIPT = r"""
import sys
try:
    import numba.cuda.dispatcher as D
    import numba.cuda.cudadrv.nvvm as NVVM
    import numba.cuda.cudadrv.libs as L
    from numba import cuda, types as T
    import glob
    libdev = sorted(glob.glob("/usr/local/cuda*/nvvm/libdevice/libdevice*.bc"))
    NVVM.NVVM()  # loads libnvvm
    if not libdev:
        raise RuntimeError("no libdevice")
    class _Dev:
        compute_capability = (8, 0)
    D.get_current_device = lambda: _Dev()
    L.get_libdevice = lambda: libdev[0]
    NVVM.get_libdevice = L.get_libdevice
    NVVM.open_libdevice = lambda: open(libdev[0], "rb").read()
except Exception as e:  # toolchain or numba internals not as expected here
    print("SKIP:", type(e).__name__, e)
    sys.exit(0)
from gpuload.kernels import fused as F
out_t = {"float32": T.float32, "float16": T.uint16, "bfloat16": T.uint16, "uint8": T.uint8}
for kind, layout, flags in [("float32", "NCHW", (1, 1, 1, 1)), ("float16", "NHWC", (1, 0, 1, 0)),
                            ("bfloat16", "NCHW", (0, 1, 0, 1)), ("uint8", "NHWC", (1, 1, 1, 1))]:
    spec = F.KernelSpec(kind, layout, *map(bool, flags))
    ks = F.get_cuda_kernels(spec)
    a = (T.uint8[::1], T.int64[:, ::1], T.float32[:, ::1], T.float32[:, ::1])
    ptx, _ = cuda.compile_ptx(ks.main.py_func, a + (T.float32[::1],) * 3 + (out_t[kind][:, :, :, ::1],), cc=(8, 0))
    ptx2, _ = cuda.compile_ptx(ks.mean_kernel.py_func, a + (T.float32[::1], T.int64, T.int64), cc=(8, 0))
    assert ".entry" in ptx and ".entry" in ptx2
    assert ".f64" not in ptx, "float64 arithmetic in the main kernel"
print("OK")
"""


@pytest.mark.cudasim
def test_cuda_kernels_compile_to_ptx_without_gpu(tmp_path):
    """The CUDA kernels type-check and compile with the real NVVM toolchain (no GPU needed;
    skipped where libNVVM/libdevice are absent)."""
    env = dict(os.environ, NUMBA_FORCE_CUDA_CC="8.0")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    proc = subprocess.run(
        [sys.executable, "-c", _PTX_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    if proc.stdout.startswith("SKIP:"):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--cudasim-worker":
        _sim_worker(sys.argv[2], sys.argv[3])
    else:
        print("usage: test_kernels.py --cudasim-worker IN.npz OUT.npz", file=sys.stderr)
        sys.exit(2)
