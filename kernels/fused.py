"""The fused image kernel: crop -> resample -> flip -> colour -> normalize -> dtype/layout.

The per-pixel math is written once, as plain module-level Python functions in
``fused_source.py`` (taps and weights: ``axis``, ``tap_weight``; 2-D ``sample``; ``luminance``;
dtype encoders; and, specialised per ``KernelSpec``: ``consts``, ``shade`` (colour),
``encode3``, ``grid_lum``/``image_mean`` (contrast pre-pass), ``pixel``), next to the CPU
drivers. For each target and ``KernelSpec`` this module generates a module from that text
(``module_source``): the target's decorators -- ``numba.njit`` for the CPU,
``numba.cuda.jit(device=True)`` for CUDA, the identity for plain Python -- and the spec's
constants as module globals. Absent ops are compile-time constants, so their code is removed.

Drivers (memory access only; all arithmetic comes from the functions above):
  CUDA  ``fused_main``: one thread per output pixel (grid x over columns, y over rows, z over the
        batch) running ``pixel`` (direct 2-D taps); ``fused_mean``: one block per image, one
        thread per contrast-grid cell, shared-memory reduction.
  CPU   ``fused_cpu``: prange over (image, block of rows) work items, separable evaluation of
        the same taps (see ``fused_source.py``), float16/bfloat16 rounded from the float bits
        by ``bits_f16``/``bits_bf16`` (integer twins of ``enc_f16``/``enc_bf16``, which need a
        frexp per element; both are tested bit-exact against numpy).

Compilation and caching
-----------------------
Nothing is generated or compiled at import time: a kernel is built on its first request and
kept per (target, KernelSpec, ...) in ``_KERNELS``; ``numba.cuda`` is imported only when a CUDA
kernel is requested. CPU kernels persist across processes through Numba's on-disk cache: the
generated module (functions decorated ``numba.njit(cache=True, ...)``) is written, atomically
(temporary file + rename; same text and mtime from every writer), to
``$GPULOAD_CACHE_DIR/kernels`` (else ``$XDG_CACHE_HOME/gpuload/kernels``, else
``~/.cache/gpuload/kernels``) under a name that hashes its text (spec, template source,
decorators), gpuload's, Numba's and Python's versions, and imported from there; Numba keeps the
compiled code in ``__pycache__`` beside it. A fresh process with the same spec loads the machine
code instead of compiling it (about 5 s). There is one module per (spec, parallel): Numba's cache
index is keyed by a function's bytecode and argument types, not by its globals or jit options,
so two specialisations must never share a file. If that directory is not usable, or
``GPULOAD_KERNEL_CACHE=0``, the same module is compiled in memory (logged at debug level on
the ``gpuload.kernels`` logger). Files left by other versions are never reused; the directory
can be deleted between runs (the next one recompiles).

Kernel ABI
----------
``src``      uint8[:]      B decoded images packed back to back, HWC, C in {1, 3, 4}, row-major
                           (C == 1 is replicated to RGB; C == 4 reads the first three channels).
``meta``     int64[B, 4]   (byte offset, H, W, C) per image.
``windows``  float32[B, 4] crop window (y0, x0, h, w) in that image's own pixel coordinates
                           (continuous coordinates: pixel k covers [k, k+1), its centre is k+0.5).
``params``   float32[B, P] per-sample parameters; the kernel reads the columns PARAM_FLIP,
                           PARAM_BRIGHTNESS, PARAM_CONTRAST, PARAM_SATURATION.
``mean``, ``inv_std``  float32[3] normalisation, applied to pixel/255.
``means``    float32[B]    scratch: per-image mean luminance (contrast pre-pass output).
``out``      (B,3,oh,ow) NCHW or (B,oh,ow,3) NHWC; float32, uint8, or uint16 holding float16 /
             bfloat16 bit patterns (round to nearest even; numba has no CPU float16).

Math, per output element (i, j) of image b (this is what tests/_reference_ops.py implements):

1. Resampling, separately per axis. With window start ``t0``, length ``L`` and ``n`` outputs:
   ``scale = L / n``; the output centre maps to ``c = t0 + (o + 0.5) * scale``; the filter is a
   triangle of support ``s = scale if scale > 2 else 1`` (plain bilinear unless shrinking by more
   than 2x, then PIL/torchvision ``antialias=True`` style); taps ``x`` run over
   ``floor(c - s + 0.5) <= x < floor(c + s + 0.5)`` with weight ``max(0, 1 - |x + 0.5 - c| / s)``,
   normalised to sum 1; tap indices are clamped to the image (edge replication). Taps outside the
   window but inside the image read the real neighbouring pixels.
2. Horizontal flip: output column j takes the sample of column ``ow - 1 - j``.
3. Colour, fixed order (torchvision permutes the order randomly; we do not), on v = pixel/255,
   clamped to [0, 1] after each step:
   brightness ``v *= fb``; contrast ``v = fc * v + (1 - fc) * m``; saturation
   ``v = fs * v + (1 - fs) * lum(v)`` with ``lum = 0.299 R + 0.587 G + 0.114 B`` of that pixel.
   ``m`` (contrast mean) is the mean luminance of the brightness-adjusted, clamped, *unflipped*
   resampled crop at a grid of ``gy x gx`` output positions, ``gy = min(16, oh)``,
   ``gx = min(16, ow)``, rows ``(2k + 1) * oh // (2 gy)``, columns ``(2k + 1) * ow // (2 gx)``.
4. Normalize ``(v - mean) * inv_std`` (mean 0, inv_std 1 when absent).
5. Output: float32 as is; float16 / bfloat16 rounded to nearest even; uint8
   ``floor(clamp(v, 0, 1) * 255 + 0.5)``.

Internally the kernel works on the 0..255 scale (same math, scaled) and in float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import linecache
import logging
import os
import sys
import threading
import types
from dataclasses import dataclass

import numba
import numpy as np

__all__ = [
    "KernelSpec",
    "NUM_PARAMS",
    "PARAM_Y0",
    "PARAM_X0",
    "PARAM_H",
    "PARAM_W",
    "PARAM_FLIP",
    "PARAM_BRIGHTNESS",
    "PARAM_CONTRAST",
    "PARAM_SATURATION",
    "CONTRAST_GRID",
    "get_cpu_kernel",
    "compile_cpu_kernel",
    "get_cuda_kernels",
    "launch_cuda",
    "check_inputs",
    "INPUTS_OK",
    "TOO_FEW_PARAMS",
    "SHAPES_DISAGREE",
    "python_lib",
    "module_source",
    "kernel_cache_dir",
    "cpu_kernel_on_disk",
    "has_disk_cache",
    "sample_args",
    "compile_in_child",
    "COMPILING_CHILDREN",
]

# Columns of the per-sample parameter matrix (float32, shape (B, NUM_PARAMS)).
PARAM_Y0 = 0  # crop window top, original-image pixel coordinates (float)
PARAM_X0 = 1  # crop window left
PARAM_H = 2  # crop window height
PARAM_W = 3  # crop window width
PARAM_FLIP = 4  # 1.0 = flip horizontally, 0.0 = not
PARAM_BRIGHTNESS = 5  # brightness factor (1.0 = unchanged)
PARAM_CONTRAST = 6  # contrast factor (1.0 = unchanged)
PARAM_SATURATION = 7  # saturation factor (1.0 = unchanged)
NUM_PARAMS = 8

CONTRAST_GRID = 16  # the contrast mean is taken over min(16, oh) x min(16, ow) output positions

OUT_KINDS = ("float32", "float16", "bfloat16", "uint8")
LAYOUTS = ("NCHW", "NHWC")
# numpy storage dtype the kernel writes, per output kind
STORAGE_DTYPE = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.uint16),
    "bfloat16": np.dtype(np.uint16),
    "uint8": np.dtype(np.uint8),
}

# fastmath flags for the CPU build: none. IEEE semantics (no fused multiply-add contraction, no
# reciprocal approximation, no reassociation) make the compiled kernel's results those of its
# NumPy twin (``fused_numpy.py``) bit for bit, so a cold stage can run the twin while this one
# compiles; measured no slower (benchmarks/RESULTS.md, "Time to first batch").
_CPU_FASTMATH: frozenset = frozenset()


@dataclass(frozen=True)
class KernelSpec:
    """What a compiled kernel is specialised on; absent ops cost nothing."""

    out_kind: str = "float32"  # one of OUT_KINDS
    layout: str = "NCHW"  # one of LAYOUTS
    brightness: bool = False
    contrast: bool = False
    saturation: bool = False
    flip: bool = False

    def __post_init__(self):
        if self.out_kind not in OUT_KINDS:
            raise ValueError(f"out_kind must be one of {OUT_KINDS}, got {self.out_kind!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")


# --------------------------------------------------------------------------------------------
# Input validation (host side, vectorised NumPy; used by both targets)
# --------------------------------------------------------------------------------------------


#: What ``check_inputs`` returns besides the index (>= 0) of the first unusable sample.
INPUTS_OK = -1
TOO_FEW_PARAMS = -2
SHAPES_DISAGREE = -3


def check_inputs(src_size, meta, windows, params, nparams):
    """Index of the first sample whose meta/window is unusable, or INPUTS_OK when all are fine.

    Checks: offset >= 0, H, W > 0, C in {1, 3, 4}, the image lies inside ``src``; window finite
    with h, w > 0; params has at least ``nparams`` columns (else TOO_FEW_PARAMS); the shapes of
    meta, windows and params agree (else SHAPES_DISAGREE). Vectorised NumPy (no compilation on
    a cold start) and free of integer overflow whatever ``meta`` holds.
    """
    B = meta.shape[0]
    if meta.shape[1] != 4 or windows.shape[0] != B or windows.shape[1] != 4 or params.shape[0] != B:
        return SHAPES_DISAGREE
    if params.shape[1] < nparams:
        return TOO_FEW_PARAMS
    if B == 0:
        return INPUTS_OK
    off, H, W, C = (meta[:, k].astype(np.int64) for k in range(4))
    room = int(src_size) - off  # bytes from the image's start to the end of src
    ok = (off >= 0) & (room >= 0) & (H > 0) & (W > 0) & ((C == 1) | (C == 3) | (C == 4))
    ok &= np.maximum(room, 0) >= H  # bounds H * C below 2**63 before it is formed
    hc = np.where(ok, H * C, 1)
    ok &= np.maximum(room, 0) // hc >= W  # H * W * C <= room, without forming the product
    with np.errstate(invalid="ignore"):
        y0, x0, h, w = (windows[:, k] for k in range(4))
        ok &= (h > 0) & (w > 0) & (h < 1e30) & (w < 1e30)
        ok &= (np.abs(y0) < 1e30) & (np.abs(x0) < 1e30)
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else INPUTS_OK


# --------------------------------------------------------------------------------------------
# Compilation: one generated module per (target, KernelSpec[, parallel]); CPU ones on disk
# --------------------------------------------------------------------------------------------

log = logging.getLogger("gpuload.kernels")

_KERNELS: dict = {}
_MODULES: dict = {}
_LOCK = threading.RLock()

# numba.cuda, bound on first use by _import_cuda(). A module global (not a local) because the
# CUDA simulator swaps module globals that refer to numba.cuda for its fake module.
cuda = None


def _import_cuda():
    global cuda
    if cuda is None:
        from numba import cuda as _cuda  # lazily: never at import time of gpuload

        cuda = _cuda
    return cuda


_SOURCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused_source.py")
_BEGIN = "# <specialisation>\n"
_END = "# </specialisation>\n"
# what python_lib() / _lib() return: the target-independent helpers, and with a spec the
# specialised per-pixel functions
_LIB_NAMES = (
    "clampi",
    "ifloor",
    "bits_bf16",
    "bits_f16",
    "clampf",
    "axis",
    "tap_weight",
    "sample",
    "luminance",
    "rint_even",
    "enc_f32",
    "enc_f16",
    "enc_bf16",
    "enc_u8",
)
_PIXEL_NAMES = ("grid_lum", "image_mean", "consts", "shade", "encode3", "store", "pixel")
_CPU_DRIVERS = {"separable": "fused_cpu", "direct": "fused_cpu_direct"}
# Every generated file gets this mtime (2000-01-01): Numba's cache index and Python's .pyc
# validate against the source's (mtime, size), which then do not depend on which process wrote
# the (identical) text last.
_SOURCE_MTIME = 946684800

_TARGET_DECORATORS = {
    "cpu": """\
FASTMATH = {fastmath}
CACHE = {cache!r}
dev = numba.njit(nogil=True, fastmath=FASTMATH, inline="always")
dev_big = numba.njit(nogil=True, fastmath=FASTMATH, cache=CACHE)


def cpu_jit(**options):
    return numba.njit(nogil=True, fastmath=FASTMATH, cache=CACHE, **options)


@dev
def _one():
    return 1


# The thread count the work split is sized for. Parallel build: read the way Numba's parfor
# lowering reads it (a linked symbol; numba.get_num_threads() goes through a ctypes pointer,
# a "dynamic global" that would keep fused_cpu out of the on-disk cache). Serial build: 1 (it
# never touches the threading layer).
if PARALLEL and not numba.config.DISABLE_JIT:
    try:
        from numba.np.ufunc.parallel import _iget_num_threads as num_threads
    except ImportError:  # another Numba layout: still correct, fused_cpu is just not cached
        num_threads = numba.get_num_threads
elif PARALLEL:
    num_threads = numba.get_num_threads
else:
    num_threads = _one
""",
    "cuda": """\
from numba import cuda as _cuda

dev = _cuda.jit(device=True)
dev_big = dev


def cpu_jit(**options):  # the CPU drivers stay plain (unused) Python functions here
    return lambda f: f


def num_threads():
    return 1
""",
    "python": """\
def dev(f):
    return f


dev_big = dev


def cpu_jit(**options):
    return dev


def num_threads():
    return 1
""",
}

_template_text: str | None = None


def _template() -> str:
    global _template_text
    if _template_text is None:
        with open(_SOURCE_PATH, encoding="utf-8") as f:
            _template_text = f.read()
    return _template_text


def module_source(target: str, spec: KernelSpec, parallel: bool = True, cache: bool = False) -> str:
    """The text of the module compiled for ``target`` ('cpu', 'cuda' or 'python') and ``spec``:
    ``fused_source.py`` with its specialisation block replaced by the target's decorators and
    the spec's constants. Deterministic (the same text in every process)."""
    if target not in _TARGET_DECORATORS:
        raise ValueError(f"unknown kernel target {target!r}; expected 'cpu', 'cuda' or 'python'")
    flags = sorted(_CPU_FASTMATH)  # sorted: no set order
    fastmath = "{" + ", ".join(map(repr, flags)) + "}" if flags else "False"
    consts = {
        "PARALLEL": bool(parallel),
        "OUT_KIND": spec.out_kind,
        "NCHW": spec.layout == "NCHW",
        "HAS_B": bool(spec.brightness),
        "HAS_C": bool(spec.contrast),
        "HAS_S": bool(spec.saturation),
        "HAS_FLIP": bool(spec.flip),
        "P_FLIP": PARAM_FLIP,
        "P_B": PARAM_BRIGHTNESS,
        "P_C": PARAM_CONTRAST,
        "P_S": PARAM_SATURATION,
        "G": CONTRAST_GRID,
    }
    block = "".join(f"{k} = {v!r}\n" for k, v in consts.items()) + "\n\n"
    block += _TARGET_DECORATORS[target].format(fastmath=fastmath, cache=bool(cache)) + "\n\n"
    text = _template()
    i = text.index(_BEGIN) + len(_BEGIN)
    j = text.index(_END, i)
    head = (
        f"# Generated by gpuload.kernels.fused from fused_source.py; do not edit.\n"
        f"# target={target} parallel={bool(parallel)} cache={bool(cache)} {spec!r}\n"
    )
    return head + text[:i] + block + text[j:]


def _module_key(text: str) -> str:
    import gpuload  # lazily: gpuload is fully imported by the time a kernel is requested

    h = hashlib.sha256()
    for part in (text, getattr(gpuload, "__version__", ""), numba.__version__, sys.version):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:24]


def kernel_cache_dir() -> str | None:
    """Where CPU kernels are cached on disk (None: disabled by ``GPULOAD_KERNEL_CACHE=0``)."""
    if os.environ.get("GPULOAD_KERNEL_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    from gpuload.fetch.cache import default_cache_dir

    return os.path.join(default_cache_dir(), "kernels")


def _write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` unless it already holds it, through a temporary file in the
    same directory and a rename, so concurrent writers (threads, processes) never expose a
    partial file; the mtime is fixed (see ``_SOURCE_MTIME``)."""
    # absent or unreadable: (re)write it below
    with contextlib.suppress(OSError), open(path, "rb") as f:
        if f.read() == data:
            return
    tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.utime(tmp, (_SOURCE_MTIME, _SOURCE_MTIME))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _import_file(name: str, path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    # registered, so that Numba (and pickle) can find the module of the functions by name
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


def _exec_module(name: str, text: str) -> types.ModuleType:
    filename = f"<gpuload.kernels.fused {name}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    code = compile(text, filename, "exec")
    mod = types.ModuleType(name)
    sys.modules[name] = mod
    try:
        exec(code, mod.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


def _load_module(target: str, spec: KernelSpec, parallel: bool, disk: bool) -> types.ModuleType:
    """Generate and import the module of (target, spec, parallel): CPU ones from the kernel
    cache directory (Numba's on-disk cache enabled) when ``disk`` and the directory is usable,
    all others compiled in memory."""
    if target == "cpu" and disk:
        directory = kernel_cache_dir()
        if directory is not None:
            text = module_source("cpu", spec, parallel, cache=True)
            name = "fused_" + _module_key(text)
            path = os.path.join(directory, name + ".py")
            try:
                os.makedirs(directory, exist_ok=True)
                _write_atomic(path, text.encode("utf-8"))
                mod = _import_file("_gpuload_kernel_" + name, path)
            except Exception as e:  # unwritable or unusable directory: compile in memory
                log.debug(
                    "kernel cache %s is not usable (%s: %s); compiling the CPU kernel for %r "
                    "in memory",
                    directory,
                    type(e).__name__,
                    e,
                    spec,
                )
            else:
                log.debug("CPU kernel module for %r: %s", spec, path)
                return mod
    text = module_source(target, spec, parallel, cache=False)
    return _exec_module(f"_gpuload_kernel_{target}_{_module_key(text)}", text)


def _module(target: str, spec: KernelSpec, parallel: bool = True) -> types.ModuleType:
    """The generated module of (target, spec, parallel), built once per process."""
    key = (target, spec, bool(parallel))
    with _LOCK:
        mod = _MODULES.get(key)
        if mod is None:
            mod = _load_module(target, spec, bool(parallel), disk=True)
            _MODULES[key] = mod
        return mod


def _lib(target: str) -> dict:
    """The target-independent helpers compiled for ``target`` ('cpu', 'cuda' or 'python')."""
    mod = _module(target, KernelSpec())
    return {n: getattr(mod, n) for n in _LIB_NAMES}


def python_lib(spec: KernelSpec | None = None) -> dict:
    """The same per-pixel functions as plain Python (for tests and debugging)."""
    mod = _module("python", spec if spec is not None else KernelSpec())
    names = _LIB_NAMES if spec is None else _LIB_NAMES + _PIXEL_NAMES
    return {n: getattr(mod, n) for n in names}


def get_cpu_kernel(spec: KernelSpec, mode: str = "separable", parallel: bool = True):
    """The compiled CPU kernel ``f(src, meta, windows, params, mean, inv_std, means, out)``.

    Inputs must already be valid (see ``check_inputs``); compiled lazily on the first call.
    ``parallel=False`` compiles the same source without Numba's threading layer (prange runs as
    a plain loop): what a forked child uses when its parent already started OpenMP.
    """
    if mode not in _CPU_DRIVERS:
        raise ValueError(f"unknown CPU kernel mode {mode!r}")
    key = ("cpu", spec, mode, bool(parallel))
    with _LOCK:
        k = _KERNELS.get(key)
        if k is None:
            k = getattr(_module("cpu", spec, parallel), _CPU_DRIVERS[mode])
            _KERNELS[key] = k
        return k


def compile_cpu_kernel(kernel, args) -> None:
    """Compile (or load from the kernel cache) ``kernel``'s specialisation for arguments typed
    like ``args`` without running it: what a later call with arrays of the same types,
    layouts and flags then uses as is."""
    kernel.compile(tuple(numba.typeof(a) for a in args))
    if kernel.targetoptions.get("parallel"):
        note_parallel_use()  # making a parallel kernel starts the threading layer already


def has_disk_cache(kernel) -> bool:
    """Whether ``kernel`` (a CPU driver from ``get_cpu_kernel``) keeps its machine code in the
    on-disk kernel cache, so that another process's compilation is reusable here."""
    return _index_path(kernel) is not None


def cpu_kernel_on_disk(kernel) -> bool:
    """Whether the on-disk cache already holds compiled code of ``kernel`` (loading it takes
    about a second; compiling, about ten on two cores)."""
    path = _index_path(kernel)
    return path is not None and os.path.exists(path)


def _index_path(kernel) -> str | None:
    # Numba's cache index of the function (numba.core.caching.IndexDataCacheFile): not public
    # API, so any other layout reads as "no disk cache" (callers then compile in process)
    path = getattr(
        getattr(getattr(kernel, "_cache", None), "_cache_file", None), "_index_path", None
    )
    return path if isinstance(path, str) else None


def sample_args(spec: KernelSpec) -> tuple:
    """One-image arguments typed exactly as ``FusedImageStage`` passes them to the CPU kernel
    (what compiling a specialisation needs; their values are never used)."""
    return (
        np.zeros(1, np.uint8),  # src
        np.zeros((1, 4), np.int64),  # meta
        np.zeros((1, 4), np.float32),  # windows
        np.zeros((1, NUM_PARAMS), np.float32),  # params
        np.zeros(3, np.float32),  # mean
        np.ones(3, np.float32),  # inv_std
        np.zeros(1, np.float32),  # means (scratch)
        np.zeros((1, 3, 1, 1), STORAGE_DTYPE[spec.out_kind]),  # out (layouts type alike)
    )


def compile_in_child(spec: KernelSpec, parallel: bool = True, timeout: float = 1800.0) -> None:
    """Compile the CPU kernel of ``spec`` into the on-disk kernel cache in a child Python
    process (same interpreter and environment), leaving this process's GIL to the work it is
    doing meanwhile; afterwards ``get_cpu_kernel`` here loads it from the cache. Raises
    RuntimeError when the child fails or runs past ``timeout`` seconds. A child still compiling
    when this process exits finishes on its own (its output goes to an unlinked temporary
    file, not a pipe), so the next process finds the kernel cached."""
    import json
    import subprocess
    import tempfile
    from dataclasses import asdict

    if not sys.executable:
        raise RuntimeError("no Python executable to start a compiling process with")
    cmd = [sys.executable, "-m", "gpuload.kernels.compile_cpu", json.dumps(asdict(spec))]
    cmd.append("parallel" if parallel else "serial")
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        with _LOCK:
            COMPILING_CHILDREN.add(proc.pid)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(
                f"compiling the CPU kernel of {spec!r} took over {timeout:.0f} s"
            ) from None
        finally:
            with _LOCK:
                COMPILING_CHILDREN.discard(proc.pid)
        if proc.returncode != 0:
            out.seek(0)
            tail = out.read().strip().splitlines()[-3:]
            raise RuntimeError(f"compiling {spec!r} in a child process failed: {' / '.join(tail)}")


#: Process ids of the compiling children running now (for tests and diagnostics).
COMPILING_CHILDREN: set[int] = set()


# The process that started Numba's threading layer (set when a parallel CPU kernel first runs).
_PARALLEL_PID: int | None = None


def note_parallel_use() -> None:
    """Record that this process ran a parallel CPU kernel (its threading layer is live)."""
    global _PARALLEL_PID
    if _PARALLEL_PID is None:
        _PARALLEL_PID = os.getpid()


def cpu_parallel_safe() -> bool:
    """False in a forked child whose parent already ran Numba's OpenMP layer: GNU OpenMP is not
    fork-safe and would abort the child ("fork() called from a process already using GNU
    OpenMP"); such a child uses the serial build of the kernel instead. TBB and workqueue
    layers are fork-safe."""
    if _PARALLEL_PID is None or os.getpid() == _PARALLEL_PID:
        return True
    try:
        layer = numba.threading_layer()
    except ValueError:  # no layer started (cannot happen if the parent ran one): be safe
        return True
    return layer != "omp"


class CudaKernels:
    """The two CUDA kernels of a spec: ``mean_kernel`` (contrast pre-pass) and ``main``."""

    MEAN_THREADS = CONTRAST_GRID * CONTRAST_GRID

    def __init__(self, spec: KernelSpec, mean_kernel, main_kernel):
        self.spec = spec
        self.mean_kernel = mean_kernel
        self.main = main_kernel


def _make_cuda_kernels(spec: KernelSpec) -> CudaKernels:
    _import_cuda()
    px = _module("cuda", spec)  # the device functions (cuda.jit(device=True))
    grid_lum = px.grid_lum
    pixel = px.pixel
    NCHW = spec.layout == "NCHW"
    G = CONTRAST_GRID
    NT = CudaKernels.MEAN_THREADS
    F = numba.float32

    @cuda.jit
    def fused_mean(src, meta, windows, params, means, OH, OW):
        # one block per image, one thread per grid cell, tree reduction in shared memory
        b = cuda.blockIdx.x
        t = cuda.threadIdx.x
        acc = cuda.shared.array(NT, numba.float32)
        ngy = min(G, OH)
        ngx = min(G, OW)
        v = F(0.0)
        if t < ngy * ngx:
            v = grid_lum(b, t // ngx, t % ngx, OH, OW, src, meta, windows, params)
        acc[t] = v
        cuda.syncthreads()
        step = NT // 2
        while step > 0:
            if t < step:
                acc[t] += acc[t + step]
            cuda.syncthreads()
            step //= 2
        if t == 0:
            means[b] = acc[0] / F(ngy * ngx)

    @cuda.jit
    def fused_main(src, meta, windows, params, mean, inv_std, means, out):
        # one thread per output pixel; grid x over columns, y over rows, z over the batch
        j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        i = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
        b = cuda.blockIdx.z
        if NCHW:
            OH = out.shape[2]
            OW = out.shape[3]
        else:
            OH = out.shape[1]
            OW = out.shape[2]
        if i >= OH or j >= OW or b >= meta.shape[0]:
            return
        pixel(b, i, j, OH, OW, src, meta, windows, params, means, mean, inv_std, out)

    return CudaKernels(spec, fused_mean, fused_main)


def get_cuda_kernels(spec: KernelSpec) -> CudaKernels:
    key = ("cuda", spec)
    with _LOCK:
        k = _KERNELS.get(key)
        if k is None:
            k = _make_cuda_kernels(spec)
            _KERNELS[key] = k
        return k


def launch_cuda(
    kernels: CudaKernels,
    stream,
    B,
    OH,
    OW,
    src,
    meta,
    windows,
    params,
    mean,
    inv_std,
    means,
    out,
    block=(32, 8),
):
    """Enqueue the contrast pre-pass (when needed) and the main kernel for B images on ``stream``."""
    if B <= 0:
        return
    if kernels.spec.contrast:
        kernels.mean_kernel[B, CudaKernels.MEAN_THREADS, stream](
            src, meta, windows, params, means, OH, OW
        )
    bx = min(block[0], OW)
    by = min(block[1], OH)
    grid = ((OW + bx - 1) // bx, (OH + by - 1) // by, B)
    kernels.main[grid, (bx, by, 1), stream](src, meta, windows, params, mean, inv_std, means, out)
