"""Export: hand batches to frameworks through DLPack, zero copy where the memory allows.

Host numpy arrays become torch tensors with torch.from_dlpack (same memory) and TensorFlow tensors
with tf.experimental.dlpack.from_dlpack when 64-byte aligned and C-contiguous (TensorFlow aborts
the process on anything else, so other arrays are copied). Device arrays (Numba/CuPy, anything with
__cuda_array_interface__ or __dlpack__) go the same way on the GPU. Frameworks are imported only
here, lazily.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .collate import ALIGNMENT, BFloat16Bits

__all__ = ["to_torch", "to_tensorflow", "to_jax", "is_tf_dlpack_safe"]


def is_tf_dlpack_safe(a: np.ndarray) -> bool:
    """TensorFlow accepts a DLPack buffer only if 64-byte aligned and C-contiguous."""
    return a.flags.c_contiguous and a.ctypes.data % ALIGNMENT == 0 and a.dtype.kind in "biuf"


def _torch_value(v: Any, device, torch) -> Any:
    if isinstance(v, BFloat16Bits):
        return _torch_value(v.bits, device, torch).view(torch.bfloat16)
    if isinstance(v, np.ndarray):
        if v.dtype.kind not in "biuf":
            return v
        t = (
            torch.from_dlpack(np.ascontiguousarray(v))
            if v.flags.writeable
            else torch.from_numpy(v.copy())
        )
        return t if device is None or t.device == device else t.to(device, non_blocking=True)
    if isinstance(v, np.generic):
        return torch.as_tensor(v)
    if isinstance(v, torch.Tensor):
        return v if device is None or v.device == device else v.to(device, non_blocking=True)
    if hasattr(v, "__cuda_array_interface__"):
        # zero copy: the tensor views the device buffer (and keeps ``v`` alive); the device
        # named is the loader's (``device``), else the current CUDA device
        return torch.as_tensor(v, device=device if device is not None else "cuda")
    if hasattr(v, "__dlpack__") and not isinstance(v, (bytes, str)):
        return torch.from_dlpack(v)
    if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
        t = torch.stack(v)
        return t if device is None or t.device == device else t.to(device, non_blocking=True)
    if (
        isinstance(v, (list, tuple))
        and v
        and isinstance(v[0], np.ndarray)
        and v[0].dtype.kind in "biuf"
    ):
        if all(a.shape == v[0].shape for a in v):
            return _torch_value(np.stack(v), device, torch)
        return [_torch_value(a, device, torch) for a in v]  # ragged rows: one tensor each
    return v  # bytes / str lists stay lists, as torch's default_collate leaves them


def to_torch(batch: Any, device: Any = None) -> Any:
    """numpy arrays -> torch tensors (zero copy on the host), recursively through dicts/tuples."""
    import torch

    dev = (
        torch.device(device)
        if device is not None and not isinstance(device, torch.device)
        else device
    )
    if dev is not None and dev.type == "cpu":
        dev = None
    return _walk(batch, lambda v: _torch_value(v, dev, torch))


def _tf_value(v: Any, tf) -> Any:
    if isinstance(v, BFloat16Bits):
        return tf.bitcast(_tf_value(v.bits, tf), tf.bfloat16)
    if isinstance(v, np.ndarray):
        if v.dtype.kind not in "biuf":
            return tf.convert_to_tensor(v)
        if is_tf_dlpack_safe(v) and v.size:
            return tf.experimental.dlpack.from_dlpack(v.__dlpack__())
        return tf.convert_to_tensor(v)  # a copy: unaligned or non-contiguous memory
    if isinstance(v, np.generic):
        return tf.convert_to_tensor(v)
    if isinstance(v, list) and v and isinstance(v[0], (bytes, str)):
        return tf.constant(v, dtype=tf.string)
    if hasattr(v, "__dlpack__") and not isinstance(v, (bytes, str, list)):
        return tf.experimental.dlpack.from_dlpack(v.__dlpack__())
    if hasattr(v, "__cuda_array_interface__"):
        import cupy  # the CUDA array interface has no TF reader; CuPy gives it DLPack

        return tf.experimental.dlpack.from_dlpack(cupy.asarray(v).toDlpack())
    return v


def to_tensorflow(batch: Any) -> Any:
    """numpy arrays -> tf tensors (zero copy when aligned); bytes/str lists -> tf.string."""
    import tensorflow as tf

    return _walk(batch, lambda v: _tf_value(v, tf))


def _jax_narrow(v: np.ndarray, jax) -> np.ndarray:
    """What JAX keeps of a 64-bit array without ``jax_enable_x64`` (its 32-bit type, as
    ``jnp.asarray`` does): floats rounded, integers only if every value fits, else a
    ValueError, never a silently wrapped label or id."""
    if v.dtype.itemsize != 8 or v.dtype.kind not in "iuf" or jax.config.jax_enable_x64:
        return v
    narrow = np.dtype(f"{v.dtype.kind}4")
    if v.dtype.kind in "iu" and v.size:
        info = np.iinfo(narrow)
        if v.min() < info.min or v.max() > info.max:
            raise ValueError(
                f"a {v.dtype} column holds values outside {narrow}'s range [{info.min}, "
                f"{info.max}], and JAX keeps 64-bit integers only with jax_enable_x64: "
                "jax.config.update('jax_enable_x64', True) keeps them whole"
            )
    return v.astype(narrow)


def _jax_value(v: Any, device, jax) -> Any:
    if isinstance(v, BFloat16Bits):
        bits = _jax_value(v.bits, device, jax)
        return jax.lax.bitcast_convert_type(bits, jax.numpy.bfloat16)  # a new buffer (XLA)
    if isinstance(v, np.ndarray):
        if v.dtype.kind not in "biuf":
            return v
        v = _jax_narrow(v, jax)
        aligned = v.flags.c_contiguous and v.ctypes.data % ALIGNMENT == 0
        x = jax.dlpack.from_dlpack(v if aligned else np.ascontiguousarray(v))
        return x if device is None else jax.device_put(x, device)
    if isinstance(v, np.generic):
        return jax.numpy.asarray(v)
    if hasattr(v, "__dlpack__") and not isinstance(v, (bytes, str, list)):
        return jax.dlpack.from_dlpack(v)  # a device array: stays where it is
    if hasattr(v, "__cuda_array_interface__"):
        import cupy  # the CUDA array interface has no JAX reader; CuPy gives it DLPack

        return jax.dlpack.from_dlpack(cupy.asarray(v))
    return v  # bytes / str lists stay lists: JAX has no string arrays


def to_jax(batch: Any, device: Any = None) -> Any:
    """numpy arrays -> jax.Array (zero copy on the CPU through DLPack when 64-byte aligned,
    which the loader's buffers are), recursively through dicts/tuples; ``device`` (a jax
    Device): host arrays are then placed there (a copy to another device)."""
    import jax

    return _walk(batch, lambda v: _jax_value(v, device, jax))


def _walk(batch: Any, fn) -> Any:
    if isinstance(batch, dict):
        return {k: fn(v) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(fn(v) for v in batch)
    return fn(batch)
