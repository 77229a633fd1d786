"""``FusedImageStage``: owns the output buffers and runs the fused kernel for one batch.

CPU: numpy in, numpy out (a view of one of ``depth`` preallocated, 64-byte aligned buffers).
CUDA: numba.cuda device arrays, one stream; host inputs go through pinned staging buffers (one
set per ring slot, reused only after that slot's event completed), the kernel is enqueued on the
stage's stream and an event is recorded after it: ``stage.event`` (or ``stage.events[k]``) lets
a consumer stream wait (``event.wait(consumer_stream)``) instead of synchronising the device.
Nothing is allocated in ``run`` on the hot path (CUDA: except when a batch's packed source is
larger than every previous one, which grows the staging buffers once).

Batches stay valid for as long as anyone holds them: each ``run`` returns a new view of its slot
and keeps a weak reference to it; a slot whose last view is still alive (held by the caller, or
by a tensor exported from it through DLPack, which keeps the view alive) gets a fresh buffer
instead of being overwritten (counted in ``held_replaced``). In the usual loop, where a batch is
dropped before the ring comes round, nothing is allocated.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures

import numpy as np

from gpuload.collate import aligned_empty
from gpuload.device import Device, resolve_device
from gpuload.kernels import fused as _fused
from gpuload.ops.plan import ImagePlan
from gpuload.threads import DaemonThreadPool

__all__ = ["FusedImageStage", "aligned_empty", "warm_up", "wait_for_warmups"]

log = logging.getLogger("gpuload.ops")

FORK_WAIT_S = 300.0  # how long a fork waits for kernel warm-ups before going ahead anyway


class _Warmups:
    """Kernel compilations started when a stage is built, so they overlap the first batch's
    reads and decodes (and whatever the caller does before iterating) instead of following them.

    One daemon thread per process, made on first use. A fork waits for them first: a child
    must not inherit Numba's compiler lock held by a thread it does not have."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.start_lock = threading.Lock()  # one warm-up per kernel, even from two threads
        self.pool: DaemonThreadPool | None = None
        self.pid = 0
        self.pending: set[Future] = set()
        self.hooked = False
        self.by_kernel: dict = {}  # CPU kernel -> its warm-up's Future
        self.elsewhere: set = set()  # CPU kernels compiling in a child process right now

    def _fresh(self) -> None:
        """This process's pool and records (a forked child starts with none). Under the lock."""
        if self.pool is None or self.pid != os.getpid():
            self.pool = DaemonThreadPool(1, thread_name_prefix="gpuload-kernel-warmup")
            self.pid = os.getpid()
            self.pending = set()
            self.by_kernel = {}
            self.elsewhere = set()

    def submit(self, fn, *args) -> Future:
        with self.lock:
            self._fresh()
            if not self.hooked:
                os.register_at_fork(before=self.before_fork)
                self.hooked = True
            fut = self.pool.submit(fn, *args)
            self.pending.add(fut)
        fut.add_done_callback(self._done)
        return fut

    def start(self, kernel, args, spec) -> Future:
        """One warm-up per kernel and process: the running one, or a new one. A kernel that
        the on-disk cache lacks is compiled in a child process first (``compiling_elsewhere``
        is then true until it ends), so this process's GIL stays free for the first batches."""
        with self.start_lock:
            with self.lock:
                self._fresh()
                fut = self.by_kernel.get(kernel)
            if fut is not None and not fut.done():
                return fut
            elsewhere = (
                not kernel.signatures
                and _fused.has_disk_cache(kernel)
                and not _fused.cpu_kernel_on_disk(kernel)
            )
            if elsewhere:
                with self.lock:
                    self.elsewhere.add(kernel)
            try:
                fut = self.submit(_warm, kernel, args, spec, elsewhere)
            except BaseException:
                self.discard(kernel)
                raise
            with self.lock:
                self.by_kernel[kernel] = fut
            return fut

    def compiling_elsewhere(self, kernel) -> bool:
        """Whether ``kernel`` is being compiled in a child process now (run the twin instead)."""
        with self.lock:
            return self.pid == os.getpid() and kernel in self.elsewhere

    def discard(self, kernel) -> None:
        with self.lock:
            self.elsewhere.discard(kernel)

    def _done(self, fut: Future) -> None:
        with self.lock:
            self.pending.discard(fut)

    def before_fork(self) -> None:
        if not self.wait(FORK_WAIT_S):
            log.warning(
                "forking while a kernel has compiled for %.0f s: the child may hang if it "
                "compiles a kernel too (fork after ops.wait_for_warmups(), or use spawn)",
                FORK_WAIT_S,
            )

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for every warm-up of this process; True when none is left running."""
        with self.lock:
            pending = list(self.pending) if self.pid == os.getpid() else []
        return not wait_futures(pending, timeout=timeout).not_done


_WARMUPS = _Warmups()


def wait_for_warmups(timeout: float | None = None) -> bool:
    """Wait for the kernel compilations that building stages started; True when all ended."""
    return _WARMUPS.wait(timeout)


def cpu_kernel_for(spec) -> object:
    """The CPU kernel a stage of ``spec`` runs here: the parallel build, or the serial one in a
    forked child of a process that ran OpenMP (never an abort)."""
    return _fused.get_cpu_kernel(spec, parallel=_fused.cpu_parallel_safe())


def warm_up(plan: ImagePlan, device: str | Device = "cpu") -> Future | None:
    """Start compiling (or loading from the kernel cache) the CPU kernel that a stage of
    ``plan`` runs, for the exact argument types ``run`` passes, on a background thread, and
    return its Future (None on CUDA, which compiles on first launch). Loaders call this when
    they are built, so compilation overlaps what the caller does before iterating.

    When the on-disk kernel cache lacks the kernel (a cold start: ~10 s of compiling), it is
    compiled in a child process, and until that ends stages run the kernel's NumPy twin
    (``gpuload.kernels.fused_numpy``: the same outputs, bit for bit, several times slower);
    this process then loads the compiled code (~1 s), which a stage's ``run`` waits for, as it
    does when the cache was warm. Outputs never depend on which ran."""
    if resolve_device(device).is_cuda:
        return None
    out = aligned_empty(plan.out_shape(1), plan.storage_dtype)
    args = (
        np.zeros(1, np.uint8),  # src, meta, windows, params: as FusedImageStage._host passes them
        np.zeros((1, 4), np.int64),
        np.zeros((1, 4), np.float32),
        np.zeros((1, _fused.NUM_PARAMS), np.float32),
        plan.mean_array(),
        plan.inv_std_array(),
        np.zeros(1, np.float32),  # the per-slot means scratch
        out.view(_fused.STORAGE_DTYPE[plan.out_dtype]),
    )
    spec = plan.kernel_spec
    return _WARMUPS.start(cpu_kernel_for(spec), args, spec)


def _warm(kernel, args, spec, elsewhere: bool) -> None:
    """A warm-up: compile in a child process first when ``elsewhere`` (this process then only
    loads the result), then compile or load here. A failure is left for the first real call
    to raise in context."""
    if elsewhere:
        try:
            _fused.compile_in_child(spec, parallel=bool(kernel.targetoptions.get("parallel")))
        except Exception as e:  # noqa: BLE001 - compiled in this process below instead
            log.debug("compiling the CPU kernel for %r in a child failed (%s)", spec, e)
        finally:
            _WARMUPS.discard(kernel)
    try:
        _fused.compile_cpu_kernel(kernel, args)
    except Exception as e:  # noqa: BLE001 - the first run() compiles again and raises it there
        log.debug("warming the CPU kernel for %r failed (%s: %s)", spec, type(e).__name__, e)


def _check_status(status: int, B: int, what: str = "") -> None:
    if status == _fused.INPUTS_OK:
        return
    if status == _fused.SHAPES_DISAGREE:
        raise ValueError(
            f"{what}meta must be (B, 4), windows (B, 4) and params (B, P) with the same B"
        )
    if status == _fused.TOO_FEW_PARAMS:
        raise ValueError(f"{what}params must have at least {_fused.NUM_PARAMS} columns")
    raise ValueError(
        f"{what}sample {status} of {B}: meta (offset, H, W, C) must describe an image inside src "
        "with H, W > 0 and C in {1, 3, 4}, and its window must be finite with h, w > 0"
    )


class FusedImageStage:
    """Runs ``plan``'s fused kernel on batches of up to ``batch_size`` decoded images.

    ``run(src, meta, windows, params, out_index=None)``:
      src      uint8 1-D, the decoded images packed back to back (HWC)
      meta     int64 (B, 4): (byte offset, H, W, C) per image
      windows  float32 (B, 4): (y0, x0, h, w) in each decoded image's own coordinates
               (``plan.scale_window(params, ...)``)
      params   float32 (B, P) from ``plan.sample_params`` (flip and colour columns are read)
    returns the first B rows of output buffer ``out_index`` (default: the next slot of the ring
    of ``depth`` buffers), shape ``plan.out_shape(B)``, dtype ``plan.storage_dtype``.
    A returned batch stays valid for as long as it (or anything viewing it) is alive.
    """

    def __init__(
        self,
        plan: ImagePlan,
        batch_size: int,
        device: str | Device = "cpu",
        depth: int = 2,
        src_capacity: int | None = None,
    ):
        if not isinstance(plan, ImagePlan):
            raise TypeError(
                f"plan must be an ImagePlan (from gpuload.ops.compile_ops), got {type(plan).__name__}"
            )
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(depth, int) or depth <= 0:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        self.plan = plan
        self.batch_size = batch_size
        self.depth = depth
        self.device = resolve_device(device)
        self.spec = plan.kernel_spec
        self.out_shape = plan.out_shape(batch_size)
        self.oh, self.ow = plan.out_size
        self._next = 0
        self._lock = threading.Lock()
        self._leases: list[weakref.ref | None] = [None] * depth
        self.held_replaced = 0  # slots given a fresh buffer because their batch was still held
        self.twin_batches = 0  # CPU batches run by the NumPy twin while the kernel compiled
        self._twin = None
        self._mean = plan.mean_array()
        self._inv_std = plan.inv_std_array()
        kdtype = _fused.STORAGE_DTYPE[plan.out_dtype]
        if self.device.is_cuda:
            self._init_cuda(kdtype, src_capacity)
        else:
            self._kernel = _fused.get_cpu_kernel(self.spec)
            self.outputs = [aligned_empty(self.out_shape, plan.storage_dtype) for _ in range(depth)]
            self._kviews = [o.view(kdtype) for o in self.outputs]
            # per-slot scratch, so runs into different slots may overlap (from different threads)
            self._means = [np.zeros(batch_size, dtype=np.float32) for _ in range(depth)]
            self.stream = None
            self.events = [None] * depth
            self.event = None

    def warm_up(self) -> Future | None:
        """Start compiling this stage's kernel in the background (``warm_up``)."""
        return warm_up(self.plan, self.device)

    def _numpy_twin(self):
        """The kernel's NumPy twin (``gpuload.kernels.fused_numpy``), made on first use."""
        if self._twin is None:
            from gpuload.kernels.fused_numpy import get_numpy_kernel

            self._twin = get_numpy_kernel(self.spec, threads=min(4, os.cpu_count() or 1))
        return self._twin

    def _cpu_kernel(self):
        """The CPU kernel ``run`` calls (see ``cpu_kernel_for``)."""
        return self._kernel if _fused.cpu_parallel_safe() else cpu_kernel_for(self.spec)

    # ---------------------------------------------------------------------------------------
    def _slot(self, out_index):
        if out_index is None:
            k = self._next
            self._next = (k + 1) % self.depth
            return k
        if not isinstance(out_index, (int, np.integer)) or not 0 <= out_index < self.depth:
            raise ValueError(f"out_index must be in [0, {self.depth}), got {out_index!r}")
        return int(out_index)

    def _check_batch(self, meta):
        n = meta.shape[0] if meta.ndim == 2 else -1
        if n < 0 or meta.shape[1] != 4:
            raise ValueError(f"meta must have shape (B, 4), got {meta.shape}")
        if n > self.batch_size:
            raise ValueError(
                f"batch of {n} images is larger than the stage's batch_size {self.batch_size}"
            )
        return n

    @staticmethod
    def _host(a, dtype, name, ndim):
        if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != ndim:
            a = np.asarray(a)
            if a.dtype != dtype:
                if name == "src" or (np.dtype(dtype).kind == "i" and a.dtype.kind not in "iu"):
                    raise ValueError(
                        f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype}"
                    )
                a = a.astype(dtype)
            if a.ndim != ndim:
                raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        return a

    def run(
        self, src, meta, windows, params, out_index=None, src_pinned: bool = False, frames: int = 1
    ):
        """Run the kernel on one batch (see the class docstring).

        CUDA: device inputs must be ready when ``run`` is called (their producer's stream
        synchronised, or made to wait on by ``self.stream``). ``frames=K``: the batch is
        B / K samples of K images each, returned as (B / K, K, ...) (the view the slot's lease
        watches, so a held windowed batch keeps its slot). ``src_pinned=True``: ``src`` is page-locked host memory that the caller will
        not rewrite before ``self.events[slot]`` has completed; it is then copied to the device
        directly instead of through the stage's own pinned staging buffer. Device arrays
        (numba, or anything with ``__cuda_array_interface__``) are always used in place.
        """
        if self.device.is_cuda:
            return self._run_cuda(src, meta, windows, params, out_index, src_pinned, frames)
        src = self._host(src, np.uint8, "src", 1)
        meta = self._host(meta, np.int64, "meta", 2)
        windows = self._host(windows, np.float32, "windows", 2)
        params = self._host(params, np.float32, "params", 2)
        B = self._check_batch(meta)
        _check_status(
            _fused.check_inputs(src.shape[0], meta, windows, params, _fused.NUM_PARAMS), B
        )
        with self._lock:
            k = self._slot(out_index)
            self._release(k)
        if B == 0:
            return self._lease(k, 0, frames)
        kernel = self._cpu_kernel()
        if _WARMUPS.compiling_elsewhere(kernel):
            kernel = self._numpy_twin()  # same results, bit for bit; no compilation
            self.twin_batches += 1
        elif kernel is self._kernel:
            _fused.note_parallel_use()
        kernel(
            src,
            meta,
            windows,
            params,
            self._mean,
            self._inv_std,
            self._means[k],
            self._kviews[k][:B],
        )
        return self._lease(k, B, frames)

    __call__ = run

    # ---- slot lifetimes ---------------------------------------------------------------------
    def _release(self, k: int) -> None:
        """Make slot ``k`` safe to write: if a batch returned from it is still alive, the slot
        gets a new buffer (the old one lives on with its holders). Called under the lock."""
        lease = self._leases[k]
        if lease is None or lease() is None:
            return
        self.held_replaced += 1
        if self.device.is_cuda:
            if self._used[k]:
                self.events[k].synchronize()  # the held batch is complete before it is let go
            new = self._cuda.device_array(self.out_shape, dtype=self.plan.storage_dtype)
        else:
            new = aligned_empty(self.out_shape, self.plan.storage_dtype)
        kdtype = self._kviews[k].dtype
        self.outputs[k] = new
        self._kviews[k] = new.view(kdtype) if new.dtype != kdtype else new
        self._leases[k] = None

    def _lease(self, k: int, B: int, frames: int = 1):
        """A new view of slot ``k``'s first ``B`` rows (as (B / frames, frames, ...) when
        ``frames`` > 1), watched through a weak reference."""
        view = self.outputs[k][:B]
        if frames != 1:
            if B % frames:
                raise ValueError(f"a batch of {B} images is not whole samples of {frames}")
            view = view.reshape((B // frames, frames, *view.shape[1:]))
        self._leases[k] = weakref.ref(view)
        return view

    # ---- CUDA -------------------------------------------------------------------------------
    def _init_cuda(self, kdtype, src_capacity):
        from numba import cuda  # lazily

        self._cuda = cuda
        if self.device.index:
            cuda.select_device(self.device.index)
        self._kernels = _fused.get_cuda_kernels(self.spec)
        bs = self.batch_size
        self.stream = cuda.stream()
        self.outputs = [
            cuda.device_array(self.out_shape, dtype=self.plan.storage_dtype)
            for _ in range(self.depth)
        ]
        self._kviews = [o.view(kdtype) if o.dtype != kdtype else o for o in self.outputs]
        self._d_mean = cuda.to_device(self._mean, stream=self.stream)
        self._d_inv_std = cuda.to_device(self._inv_std, stream=self.stream)
        self._d_means = cuda.device_array(bs, dtype=np.float32)
        self._d_meta = cuda.device_array((bs, 4), dtype=np.int64)
        self._d_windows = cuda.device_array((bs, 4), dtype=np.float32)
        self._d_params = cuda.device_array((bs, _fused.NUM_PARAMS), dtype=np.float32)
        self._p_meta = [cuda.pinned_array((bs, 4), dtype=np.int64) for _ in range(self.depth)]
        self._p_windows = [cuda.pinned_array((bs, 4), dtype=np.float32) for _ in range(self.depth)]
        self._p_params = [
            cuda.pinned_array((bs, _fused.NUM_PARAMS), dtype=np.float32) for _ in range(self.depth)
        ]
        cap = int(src_capacity) if src_capacity else bs * 3 * 256 * 256
        self._src_cap = 0
        self._grow_src(cap)
        self.events = [cuda.event() for _ in range(self.depth)]
        self._used = [False] * self.depth
        self.event = None
        self.stream.synchronize()

    def _grow_src(self, nbytes):
        cuda = self._cuda
        if nbytes <= self._src_cap:
            return
        cap = max(nbytes, int(self._src_cap * 1.5))
        if self._src_cap:
            # the old buffers may still feed in-flight copies and kernels: drain the stream
            self.stream.synchronize()
        self._p_src = [cuda.pinned_array(cap, dtype=np.uint8) for _ in range(self.depth)]
        self._d_src = cuda.device_array(cap, dtype=np.uint8)
        self._src_cap = cap

    def _run_cuda(self, src, meta, windows, params, out_index, src_pinned=False, frames=1):
        meta_h = self._host(meta, np.int64, "meta", 2)
        B = self._check_batch(meta_h)
        with self._lock:
            k = self._slot(out_index)
            self._release(k)
            if B == 0:
                return self._lease(k, 0, frames)
            if self._used[k]:
                self.events[k].synchronize()  # the slot's pinned buffers are free again
            src, windows, params, nsrc = self._cuda_inputs(src, meta_h, windows, params, B)
            d_src, d_win, d_par = self._to_device(k, B, src, meta_h, windows, params, src_pinned)
            out = self._kviews[k][:B]
            _fused.launch_cuda(
                self._kernels,
                self.stream,
                B,
                self.oh,
                self.ow,
                d_src,
                self._d_meta[:B],
                d_win,
                d_par,
                self._d_mean,
                self._d_inv_std,
                self._d_means,
                out,
            )
            ev = self.events[k]
            ev.record(self.stream)
            self._used[k] = True
            self.event = ev
            return self._lease(k, B, frames)

    def _cuda_inputs(self, src, meta_h, windows, params, B: int):
        """src, windows and params as device arrays (left there) or checked host arrays, and
        the source size; the inputs the host can see are checked before any launch."""
        cuda = self._cuda
        src, windows, params = (_as_device(cuda, x) for x in (src, windows, params))
        for name, a, dt, nd in (
            ("src", src, np.uint8, 1),
            ("windows", windows, np.float32, 2),
            ("params", params, np.float32, 2),
        ):
            if _is_device(cuda, a) and (a.dtype != dt or a.ndim != nd):
                raise ValueError(
                    f"device array {name} must be {nd}-D {np.dtype(dt).name}, "
                    f"got {a.ndim}-D {a.dtype}"
                )
        if not _is_device(cuda, src):
            src = self._host(src, np.uint8, "src", 1)
        nsrc = int(src.shape[0])
        on_device = _is_device(cuda, windows) or _is_device(cuda, params)
        if not _is_device(cuda, windows):
            windows = self._host(windows, np.float32, "windows", 2)
        if not _is_device(cuda, params):
            params = self._host(params, np.float32, "params", 2)
        if on_device:  # windows/params already on the device: check what the host can see
            win_c, par_c = np.ones((B, 4), np.float32), np.ones((B, _fused.NUM_PARAMS), np.float32)
        else:
            win_c, par_c = windows, params
        _check_status(_fused.check_inputs(nsrc, meta_h, win_c, par_c, _fused.NUM_PARAMS), B)
        return src, windows, params, nsrc

    def _to_device(self, k: int, B: int, src, meta_h, windows, params, src_pinned: bool):
        """Copy what is still on the host to the device on the stage's stream, through slot
        ``k``'s pinned buffers (or straight from ``src`` when it is pinned already)."""
        cuda, stream = self._cuda, self.stream
        if _is_device(cuda, src):
            d_src = src
        else:
            nsrc = int(src.shape[0])
            self._grow_src(nsrc)
            if src_pinned:
                self._d_src[:nsrc].copy_to_device(src, stream=stream)
            else:
                p = self._p_src[k]
                p[:nsrc] = src
                self._d_src[:nsrc].copy_to_device(p[:nsrc], stream=stream)
            d_src = self._d_src
        staged = []
        for host, pinned, dev in (
            (meta_h, self._p_meta[k], self._d_meta),
            (windows, self._p_windows[k], self._d_windows),
            (params, self._p_params[k], self._d_params),
        ):
            if _is_device(cuda, host):
                staged.append(host)
                continue
            pinned[:B] = host
            dev[:B].copy_to_device(pinned[:B], stream=stream)
            staged.append(dev[:B])
        return d_src, staged[1], staged[2]

    def synchronize(self) -> None:
        """Block until everything this stage enqueued has finished (CPU: no-op)."""
        if self.stream is not None:
            self.stream.synchronize()


def _is_device(cuda, a) -> bool:
    return cuda.devicearray.is_cuda_ndarray(a)


def _as_device(cuda, a):
    """numba device arrays pass through; other CUDA arrays (CuPy, torch) are wrapped zero-copy."""
    if cuda.devicearray.is_cuda_ndarray(a) or isinstance(a, np.ndarray):
        return a
    if hasattr(a, "__cuda_array_interface__") and hasattr(cuda, "as_cuda_array"):
        return cuda.as_cuda_array(a)
    return a
