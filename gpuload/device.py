"""Device discovery that never touches CUDA, so it is safe before fork.

Creating a CUDA context (even cuInit) in a parent that later forks breaks CUDA in the
children; we therefore look for the driver's device files instead of asking the driver.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Device", "cuda_available", "cuda_simulated", "resolve_device"]


def cuda_simulated() -> bool:
    """True when Numba's CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1): CUDA code runs on the CPU."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def cuda_available() -> bool:
    """True when an NVIDIA GPU and its driver are present (without initialising CUDA)."""
    if os.environ.get("GPULOAD_FORCE_CPU", "0") not in ("", "0"):
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidia0") or os.path.isdir("/proc/driver/nvidia/gpus")


@dataclass(frozen=True)
class Device:
    """Where a stage runs: ``kind`` is "cpu" or "cuda"; ``index`` is the CUDA ordinal."""

    kind: str
    index: int = 0

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.is_cuda else "cpu"


def resolve_device(device: str | Device | None = "auto") -> Device:
    """Map "auto" / "cpu" / "cuda" / "cuda:N" to a Device; "auto" picks the GPU where one exists.

    "cuda" is also accepted under the CUDA simulator, which is how the GPU path is tested on
    machines without a GPU.
    """
    if isinstance(device, Device):
        return device
    if device is None or device == "auto":
        return Device("cuda", 0) if cuda_available() else Device("cpu")
    if not isinstance(device, str):
        # torch.device and similar objects print as "cuda:0" / "cpu".
        device = str(device)
    if device == "cpu":
        return Device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if not (cuda_available() or cuda_simulated()):
            raise RuntimeError(
                f"device={device!r} was requested but no CUDA GPU is present "
                "(and NUMBA_ENABLE_CUDASIM is not set); use device='cpu' or 'auto'"
            )
        return Device("cuda", index)
    raise ValueError(f"unknown device {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
