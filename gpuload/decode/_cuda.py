"""Device-buffer helpers for the GPU decode paths (numba.cuda, imported lazily).

Nothing here runs at import; every function imports numba.cuda on first call. They also work
under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), which is how the packing into a device
staging buffer is tested on machines without a GPU.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "stream_handle",
    "numba_stream",
    "as_device_array",
    "device_capacity",
    "device_views",
    "copy_device_to_device",
    "copy_host_to_device",
]

_strided_copy_kernel = None


def _cuda():
    from numba import cuda

    return cuda


def stream_handle(stream) -> int:
    """An integer cudaStream_t for ``stream``: None (default stream), int, numba stream, or an
    object with ``cuda_stream`` (torch) / ``ptr`` (cupy)."""
    if stream is None:
        return 0
    if isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "ptr"):
        v = getattr(stream, attr, None)
        if isinstance(v, int):
            return v
    h = getattr(stream, "handle", None)
    if h is not None:
        v = getattr(h, "value", h)
        try:
            return int(v or 0)
        except TypeError:
            return int(v.getPtr())
    if type(stream).__module__.startswith("numba"):  # simulator streams have no handle
        return 0
    raise TypeError(f"cannot get a CUDA stream handle from {type(stream).__name__}")


def numba_stream(stream):
    """A numba stream object for ``stream`` (None -> the default stream)."""
    cuda = _cuda()
    if stream is None:
        return cuda.default_stream()
    if hasattr(stream, "synchronize") and type(stream).__module__.startswith("numba"):
        return stream
    h = stream_handle(stream)
    return cuda.external_stream(h) if h else cuda.default_stream()


def as_device_array(obj, sync: bool = True):
    """A numba device array viewing ``obj`` (numba array, or anything with
    ``__cuda_array_interface__``: cupy, torch, nvImageCodec images, DALI tensors).

    ``sync=False`` skips numba's wait on the producer's stream; use it only when the work that
    follows is queued on that same stream (the decoders pass the caller's stream to the library
    and copy on it)."""
    if hasattr(obj, "copy_to_device") and hasattr(obj, "copy_to_host"):  # numba already
        return obj
    return _cuda().as_cuda_array(obj, sync=sync)


def device_capacity(staging) -> int:
    """Bytes in a contiguous uint8 device staging buffer; TypeError for anything else."""
    if hasattr(staging, "copy_to_device") and hasattr(staging, "copy_to_host"):  # numba array
        if np.dtype(staging.dtype) != np.uint8:
            raise TypeError(f"device staging must be uint8, got {staging.dtype}")
        if not staging.is_c_contiguous():
            raise TypeError("device staging must be C-contiguous")
        return int(staging.size)
    cai = getattr(staging, "__cuda_array_interface__", None)
    if cai is None:
        raise TypeError(
            f"a GPU decoder needs a device staging buffer (numba/cupy/torch CUDA uint8 array), "
            f"got {type(staging).__name__}"
        )
    if np.dtype(cai["typestr"]) != np.uint8:
        raise TypeError(f"device staging must be uint8, got {cai['typestr']}")
    shape = tuple(cai["shape"])
    strides = cai.get("strides")
    if strides is not None and tuple(strides) != tuple(
        int(np.prod(shape[i + 1 :])) for i in range(len(shape))
    ):
        raise TypeError("device staging must be C-contiguous")
    return int(np.prod(shape)) if shape else 0


def device_views(staging, plans, offsets):
    """(H, W, C) numba views of a device staging buffer at the planned offsets."""
    arr = as_device_array(staging)
    flat = arr.reshape(int(np.prod(arr.shape)))
    out = []
    for p, off in zip(plans, offsets, strict=True):
        off = int(off)
        out.append(flat[off : off + p.nbytes].reshape(p.height, p.width, p.channels))
    return out


def _get_strided_kernel():
    # The kernel body must see numba.cuda as a module global named `cuda` (the simulator
    # patches that name), so it is bound here rather than as a local.
    global _strided_copy_kernel, cuda
    if _strided_copy_kernel is None:
        cuda = _cuda()

        @cuda.jit
        def _copy3(src, dst):
            y, x = cuda.grid(2)
            if y < dst.shape[0] and x < dst.shape[1]:
                for c in range(dst.shape[2]):
                    dst[y, x, c] = src[y, x, c]

        _strided_copy_kernel = _copy3
    return _strided_copy_kernel


def copy_device_to_device(src, dst, stream=None, sync_src: bool = False) -> None:
    """Copy device image ``src`` (anything with ``__cuda_array_interface__``, possibly with a
    row pitch) into the contiguous (H, W, C) device view ``dst``, asynchronously on ``stream``.

    ``src`` must have been produced on ``stream`` unless ``sync_src`` is True (then numba first
    waits for the stream named in its interface)."""
    s = as_device_array(src, sync=sync_src)
    if s.ndim == 2:
        s = s.reshape(s.shape[0], s.shape[1], 1)
    if tuple(s.shape) != tuple(dst.shape):
        raise ValueError(f"decoded image has shape {tuple(s.shape)}, expected {tuple(dst.shape)}")
    ns = numba_stream(stream)
    if s.is_c_contiguous():
        dst.copy_to_device(s, stream=ns)
        return
    kernel = _get_strided_kernel()
    h, w = dst.shape[0], dst.shape[1]
    block = (8, 32)
    grid = ((h + block[0] - 1) // block[0], (w + block[1] - 1) // block[1])
    kernel[grid, block, ns](s, dst)


def copy_host_to_device(src: np.ndarray, dst, stream=None) -> None:
    """Upload a host (H, W, C) uint8 array into the device view ``dst`` on ``stream``."""
    src = np.ascontiguousarray(src)
    if src.shape != tuple(dst.shape):
        raise ValueError(f"host image has shape {src.shape}, expected {tuple(dst.shape)}")
    dst.copy_to_device(src, stream=numba_stream(stream))
