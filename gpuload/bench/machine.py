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


def _version(dists: tuple[str, ...]) -> str:
    """The first installed distribution's version (naming it when not the usual one)."""
    for d in dists:
        with contextlib.suppress(md.PackageNotFoundError):
            v = md.version(d)
            return v if d == dists[0] else f"{v} ({d})"
    return "missing"


def versions() -> dict[str, str]:
    """Installed version of each library the benchmark touches, or "missing"."""
    out = {label: _version(dists) for label, dists in LIBRARIES.items()}
    if out["gpuload"] == "missing":
        import gpuload

        out["gpuload"] = f"{gpuload.__version__} (source tree)"
    return out


def _proc_value(path: str, key: str) -> str | None:
    """The value of the first ``key: value`` line of a /proc file, None when unreadable."""
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return None


def _cpu_model() -> str:
    return _proc_value("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()


def _ram_bytes() -> int:
    total = _proc_value("/proc/meminfo", "MemTotal")  # "<n> kB"
    if total is not None:
        return int(total.split()[0]) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _nvidia_smi(*query: str) -> list[str] | None:
    """The ``nvidia-smi`` command line for a CSV query; None without a GPU or nvidia-smi."""
    from gpuload.device import cuda_available

    if not cuda_available() or shutil.which("nvidia-smi") is None:
        return None
    return ["nvidia-smi", *query, "--format=csv,noheader,nounits"]


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def gpu_info() -> list[dict[str, Any]]:
    """One dict per GPU (name, memory, driver) from nvidia-smi; [] without a GPU."""
    cmd = _nvidia_smi("--query-gpu=name,memory.total,driver_version")
    if cmd is None:
        return []
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = [[x.strip() for x in line.split(",")] for line in p.stdout.strip().splitlines()]
    return [{"name": r[0], "memory_mib": _float(r[1]), "driver": r[2]} for r in rows if len(r) >= 3]


def machine() -> dict[str, Any]:
    """The machine description that goes into results.json."""
    gpus = gpu_info()
    load = None
    with contextlib.suppress(OSError):
        load = os.getloadavg()[0]
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "usable_cores": _usable_cores(),
        "ram_gib": round(_ram_bytes() / 2**30, 1),
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
        cmd = _nvidia_smi(f"--id={index}", "--query-gpu=utilization.gpu,memory.used")
        if cmd is None:
            return
        cmd.append(f"--loop-ms={interval_ms}")
        try:
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
        except OSError:
            return
        self._thread = threading.Thread(target=self._read, name="gpu-sampler", daemon=True)
        self._thread.start()

    @property
    def active(self) -> bool:
        """Whether nvidia-smi is running for this sampler."""
        return self.proc is not None

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, mem = (float(x) for x in line.strip().split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def window(self, t0: float, t1: float) -> dict[str, float] | None:
        """Mean utilisation and peak memory (MB) of the samples in [t0, t1]; None if none."""
        s = [x for x in list(self.samples) if t0 <= x[0] <= t1]
        if not s:
            return None
        return {
            "gpu_util_pct": sum(x[1] for x in s) / len(s),
            "gpu_mem_mb": max(x[2] for x in s) * 1.048576,
        }

    def close(self) -> None:
        """Stop nvidia-smi."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
