"""Shared benchmark plumbing: fresh-process measurements, medians with min-max, machine info."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from typing import Any


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    from gpuload.device import cuda_available

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem / 2**30, 1),
        "gpu": "present" if cuda_available() else "none",
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def fmt(s: dict[str, float], digits: int = 0) -> str:
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


def run_child(
    script: str, task: str, args: dict[str, Any], timeout: float = 900, env: dict | None = None
) -> dict:
    """Run ``script --child task`` in a fresh interpreter and return the JSON it prints last."""
    e = dict(os.environ)
    if env:
        e.update(env)
    p = subprocess.run(
        [sys.executable, script, "--child", task, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=e,
    )
    if p.returncode != 0:
        raise RuntimeError(f"child {task} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
