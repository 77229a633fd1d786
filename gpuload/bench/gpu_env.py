"""The environment report of the GPU check (``benchmarks/gpu_check.sh``): the GPU, its driver,
the CUDA runtime, whether the hardware JPEG decoder is usable (and how many engines nvJPEG
reports), and the versions of the libraries the GPU paths use. Every probe answers None or a
reason instead of raising, so the report is whole on a machine without a GPU too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Any

from .machine import gpu_info

__all__ = ["LIBRARIES", "REQUIRED_KEYS", "environment", "problems"]

# label -> distributions that provide it (the first installed one is reported)
LIBRARIES = {
    "gpuload": ("gpuload",),
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy"),
    "numba": ("numba",),
    "numba-cuda": ("numba-cuda",),
    "cuda-bindings": ("cuda-bindings",),
    "nvimgcodec": ("nvidia-nvimgcodec-cu13", "nvidia-nvimgcodec-cu12", "nvidia-nvimgcodec"),
    "nvjpeg": ("nvidia-nvjpeg", "nvidia-nvjpeg-cu13", "nvidia-nvjpeg-cu12"),
    "dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali"),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "simplejpeg": ("simplejpeg",),
}

# What every report holds (checked by ``problems``).
REQUIRED_KEYS = (
    "python", "cores", "gpu", "driver", "cuda_driver", "cuda_runtime", "cuda_simulator",
    "hw_jpeg", "versions", "gpuload_from",
)  # fmt: skip

_NVJPEG_BACKEND_HARDWARE = 3  # nvjpegBackend_t in nvjpeg.h
_NVJPEG_STATUS_SUCCESS = 0


def _version(dists: tuple[str, ...]) -> str | None:
    for d in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(d)
    return None


def _cuda_versions() -> tuple[str | None, str | None, str | None]:
    """(driver's CUDA version, runtime version, why not) through numba-cuda, without touching
    the simulator's stand-ins."""
    from gpuload.device import cuda_available, cuda_simulated

    if cuda_simulated() or not cuda_available():
        return (
            None,
            None,
            "no CUDA GPU" + (" (Numba's CUDA simulator is on)" if cuda_simulated() else ""),
        )
    try:
        from numba import cuda

        drv = cuda.cudadrv.driver.driver.get_version()
        rt = cuda.runtime.get_version()
        return ".".join(map(str, drv)), ".".join(map(str, rt)), None
    except Exception as e:  # noqa: BLE001 - the report says why, whatever it was
        return None, None, f"{type(e).__name__}: {e}"


def _nvjpeg_paths() -> list[str]:
    """Where libnvjpeg may be: the nvidia-nvjpeg wheel, nvImageCodec's folder, CUDA's lib64,
    the loader's search path."""
    out: list[str] = []
    for mod in ("nvidia.nvjpeg", "nvidia.cu13", "nvidia.cu12", "nvidia.nvimgcodec"):
        with contextlib.suppress(ImportError, ValueError, AttributeError):
            spec = importlib.util.find_spec(mod)
            for base in spec.submodule_search_locations or []:
                out += sorted(glob.glob(os.path.join(base, "**", "libnvjpeg.so*"), recursive=True))
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            out += sorted(glob.glob(os.path.join(home, "lib64", "libnvjpeg.so*")))
    found = ctypes.util.find_library("nvjpeg")
    if found:
        out.append(found)
    return out


def _nvjpeg_engines() -> dict[str, Any]:
    """nvJPEG's own answer: a handle on the hardware backend and
    ``nvjpegGetHardwareDecoderInfo`` (engines, cores per engine)."""
    paths = _nvjpeg_paths()
    if not paths:
        return {"engines": None, "reason": "libnvjpeg not found"}
    errors = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
            continue
        handle = ctypes.c_void_p()
        st = lib.nvjpegCreateEx(_NVJPEG_BACKEND_HARDWARE, None, None, 0, ctypes.byref(handle))
        if st != _NVJPEG_STATUS_SUCCESS:
            return {"engines": 0, "library": path, "reason": f"nvjpegCreateEx(HARDWARE) = {st}"}
        try:
            engines, cores = ctypes.c_uint(0), ctypes.c_uint(0)
            st = lib.nvjpegGetHardwareDecoderInfo(
                handle, ctypes.byref(engines), ctypes.byref(cores)
            )
            if st != _NVJPEG_STATUS_SUCCESS:
                return {"engines": 0, "library": path, "reason": f"GetHardwareDecoderInfo = {st}"}
            return {"engines": engines.value, "cores_per_engine": cores.value, "library": path}
        finally:
            lib.nvjpegDestroy(handle)
    return {"engines": None, "reason": "; ".join(errors)}


def _nvimgcodec_hw_decode() -> tuple[bool, str | None]:
    """Whether nvImageCodec decodes a JPEG with the hardware backend alone, and if not why."""
    try:
        import numpy as np
        import nvidia.nvimgcodec as nv
        import simplejpeg

        img = np.zeros((64, 64, 3), np.uint8)
        img[:, :, 0] = np.arange(64, dtype=np.uint8)[None, :] * 4
        data = simplejpeg.encode_jpeg(img, quality=90, colorsubsampling="420")
        dec = nv.Decoder(device_id=0, backends=[nv.Backend(nv.BackendKind.HW_GPU_ONLY)])
        out = dec.decode([nv.CodeStream(np.frombuffer(data, np.uint8))])
        if not out or out[0] is None:
            return False, "the hardware backend returned no image"
        return True, None
    except Exception as e:  # noqa: BLE001 - the report says why, whatever it was
        return False, f"{type(e).__name__}: {e}"


def _hw_jpeg(gpu: bool) -> dict[str, Any]:
    if not gpu:
        return {"usable": False, "engines": None, "reason": "no CUDA GPU"}
    info = _nvjpeg_engines()
    usable, why = _nvimgcodec_hw_decode()
    return {"usable": usable, **info, **({"decode_error": why} if why else {})}


def environment() -> dict[str, Any]:
    """The report: python, cores, GPU (name, memory, driver, from nvidia-smi) or None, CUDA
    driver/runtime versions, whether the simulator is on, the hardware JPEG decoder, library
    versions (None: not installed) and where gpuload was imported from."""
    from gpuload.device import cuda_available, cuda_simulated

    gpus = gpu_info()
    real = cuda_available() and not cuda_simulated()
    cuda_driver, cuda_runtime, why = _cuda_versions()
    import gpuload

    report: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "cores": os.cpu_count() or 1,
        "gpu": gpus[0]["name"] if gpus else None,
        "gpus": gpus,
        "driver": gpus[0]["driver"] if gpus else None,
        "cuda_driver": cuda_driver,
        "cuda_runtime": cuda_runtime,
        "cuda_simulator": cuda_simulated(),
        "hw_jpeg": _hw_jpeg(real and bool(gpus)),
        "versions": {k: _version(v) for k, v in LIBRARIES.items()},
        "gpuload_from": os.path.dirname(os.path.abspath(gpuload.__file__)),
    }
    if why:
        report["cuda_reason"] = why
    return report


def problems(report: dict[str, Any], *, dry_run: bool) -> list[str]:
    """What is wrong with ``report`` for this kind of run: keys missing, or (a GPU run) no GPU,
    driver or CUDA runtime found, or (the dry run) a GPU claimed or the simulator off."""
    out = [f"environment report has no {k!r}" for k in REQUIRED_KEYS if k not in report]
    if out:
        return out
    if not isinstance(report["versions"], dict) or "gpuload" not in report["versions"]:
        out.append("environment report's versions do not name gpuload")
    if not isinstance(report["hw_jpeg"], dict) or "usable" not in report["hw_jpeg"]:
        out.append("environment report's hw_jpeg does not say whether it is usable")
    if dry_run:
        if report["gpu"] is not None or report["cuda_runtime"] is not None:
            out.append("dry run: the environment report claims a GPU")
        if not report["cuda_simulator"]:
            out.append("dry run: Numba's CUDA simulator is not on")
    else:
        for key in ("gpu", "driver", "cuda_runtime"):
            if not report[key]:
                out.append(f"GPU run: the environment report found no {key}")
        if report["cuda_simulator"]:
            out.append("GPU run: Numba's CUDA simulator is on (NUMBA_ENABLE_CUDASIM)")
    return out
