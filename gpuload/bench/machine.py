"""What the benchmark ran on: CPU model, cores, RAM, GPU and driver, library versions; and a
GPU utilisation / memory sampler (nvidia-smi) for machines that have a GPU.

Nothing here imports a framework: versions come from package metadata, the GPU from
nvidia-smi (never a CUDA context in the runner, which forks and spawns children).
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import platform
import shutil
import subprocess
import threading
import time
from typing import Any

__all__ = ["machine", "versions", "gpu_info", "GpuSampler", "LIBRARIES"]

# label -> distribution names to try (the first one installed wins)
LIBRARIES: dict[str, tuple[str, ...]] = {
    "gpuload": ("gpuload",),
    "numpy": ("numpy",),
    "numba": ("numba",),
    "torch": ("torch",),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "simplejpeg": ("simplejpeg",),
    "pillow": ("pillow", "Pillow"),
    "dali": ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110"),
    "nvimgcodec": ("nvidia-nvimgcodec-cu12", "nvidia-nvimgcodec-cu13", "nvidia-nvimgcodec-cu11"),
    "deeplake": ("deeplake",),
    "matplotlib": ("matplotlib",),
    "psutil": ("psutil",),
    "scikit-image": ("scikit-image",),
    "fsspec": ("fsspec",),
    "s3fs": ("s3fs",),
    "moto": ("moto",),
}


def versions() -> dict[str, str]:
    """Installed version of each library the benchmark touches, or "missing"."""
    out = {}
    for label, dists in LIBRARIES.items():
        v = "missing"
        for d in dists:
            try:
                v = md.version(d)
                if d != dists[0]:
                    v = f"{v} ({d})"
                break
            except md.PackageNotFoundError:
                continue
        out[label] = v
    if out["gpuload"] == "missing":
        try:
            import gpuload

            out["gpuload"] = f"{gpuload.__version__} (source tree)"
        except ImportError:  # pragma: no cover
            pass
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu_info() -> list[dict[str, Any]]:
    """One dict per GPU (name, memory, driver) from nvidia-smi; [] without a GPU."""
    from gpuload.device import cuda_available

    if not cuda_available() or shutil.which("nvidia-smi") is None:
        return []
    try:
        p = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,memory.total,driver_version",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    out = []
    for line in p.stdout.strip().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) >= 3:
            try:
                mem = float(parts[1])
            except ValueError:
                mem = None
            out.append({"name": parts[0], "memory_mib": mem, "driver": parts[2]})
    return out


def machine() -> dict[str, Any]:
    """The machine description that goes into results.json."""
    ram = _ram_bytes()
    gpus = gpu_info()
    load = None
    with contextlib.suppress(OSError):
        load = os.getloadavg()[0]
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "usable_cores": _usable_cores(),
        "ram_gib": round(ram / 2**30, 1),
        "gpu": ", ".join(g["name"] for g in gpus) if gpus else "none",
        "gpus": gpus,
        "driver": gpus[0]["driver"] if gpus else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_1min_at_start": load,
    }


class GpuSampler:
    """Samples GPU utilisation (%) and memory used (MiB) with ``nvidia-smi -lms`` in the
    background; :meth:`window` summarises the samples inside a wall-clock window (the one a
    child reports for its timed part). Inert where no GPU or nvidia-smi exists."""

    def __init__(self, interval_ms: int = 200, index: int = 0) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self.proc = None
        self._thread = None
        from gpuload.device import cuda_available

        if not cuda_available() or shutil.which("nvidia-smi") is None:
            return
        try:
            self.proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    f"--id={index}",
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    f"--loop-ms={interval_ms}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        except OSError:
            self.proc = None
            return
        self._thread = threading.Thread(target=self._read, name="gpu-sampler", daemon=True)
        self._thread.start()

    @property
    def active(self) -> bool:
        return self.proc is not None

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, mem = (float(x) for x in line.strip().split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def window(self, t0: float, t1: float) -> dict[str, float] | None:
        s = [x for x in list(self.samples) if t0 <= x[0] <= t1]
        if not s:
            return None
        return {
            "gpu_util_pct": sum(x[1] for x in s) / len(s),
            "gpu_mem_mb": max(x[2] for x in s) * 1.048576,
        }

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
