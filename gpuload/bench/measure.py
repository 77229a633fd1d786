"""Measurement plumbing shared by the runner and the scripts under benchmarks/.

Child side (the fresh process that runs one measurement): :class:`Meter` times a stream of
batches after a warm-up (rows, bytes, wall and process-tree CPU time, batch latency, peak RSS of
the process tree); :func:`emit` hands the result over on a marked stdout line.
Parent side: :func:`run_child` runs one measurement in a fresh interpreter (``python -m
gpuload.bench.child TASK ARGS``); :func:`summarize` / :func:`fmt` turn repetitions into
``{median, min, max, n}`` and text.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "Meter",
    "ProcessTree",
    "emit",
    "run_child",
    "summarize",
    "fmt",
    "peak_rss_bytes",
    "ChildError",
    "RESULT_MARK",
]

RESULT_MARK = "GPULOAD_BENCH_RESULT "


# -- child side ------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _ProcFS:
    """The process tree through Linux /proc (used when psutil is not installed)."""

    _TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    _PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    @classmethod
    def pids(cls, root: int) -> list[int]:
        out, todo = [], [root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo.extend(int(x) for x in f.read().split())
            except (OSError, ValueError):
                continue
        return out

    @classmethod
    def cpu(cls, pid: int) -> float | None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        # after the command: state(0) ... utime(11) stime(12)
        return (int(fields[11]) + int(fields[12])) / cls._TICK

    @classmethod
    def rss(cls, pid: int) -> int:
        try:
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1]) * cls._PAGE
        except (OSError, IndexError, ValueError):
            return 0


class ProcessTree:
    """CPU time and resident memory of this process and its live children (DataLoader workers):
    via psutil, else Linux /proc, else this process alone. A thread samples the tree's summed RSS
    every ``interval`` s, so ``peak_rss()`` covers workers too (``ru_maxrss`` does not)."""

    def __init__(self, interval: float = 0.05) -> None:
        self._pid = os.getpid()
        try:
            import psutil
        except ImportError:
            psutil = None
        self._ps, self._me = psutil, psutil.Process() if psutil else None
        self._proc = psutil is None and os.path.exists(f"/proc/{self._pid}/stat")
        self._peak = self._phase_peak = 0
        self._baseline: int | None = None
        self._stop = threading.Event()
        self._thread = None
        if self._ps is not None or self._proc:
            self._thread = threading.Thread(
                target=self._sample, args=(interval,), name="gpuload-bench-rss", daemon=True
            )
            self._thread.start()

    @property
    def source(self) -> str:
        return "psutil" if self._ps is not None else ("procfs" if self._proc else "self")

    def _each(self, f) -> dict[int, Any]:
        """``f(process)`` for each live psutil process of the tree, keyed by pid."""
        procs, out = [self._me], {}
        with contextlib.suppress(self._ps.Error):
            procs += self._me.children(recursive=True)
        for p in procs:
            with contextlib.suppress(self._ps.Error):
                out[p.pid] = f(p)
        return out

    def _tree_rss(self) -> int:
        if self._ps is None:
            return sum(_ProcFS.rss(p) for p in _ProcFS.pids(self._pid))
        return sum(self._each(lambda p: p.memory_info().rss).values())

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            rss = self._tree_rss()
            self._peak = max(self._peak, rss)
            self._phase_peak = max(self._phase_peak, rss)

    def mark(self) -> None:
        """Start a phase: remember the tree's RSS now; ``growth()`` is then the sampled peak since
        minus this baseline (what streaming added, without import/JIT-time peaks)."""
        self._baseline = self._phase_peak = self._tree_rss() if (self._ps or self._proc) else 0

    def growth(self) -> int | None:
        """Sampled RSS peak since ``mark()`` minus the RSS at ``mark()`` (None when unsampled)."""
        if self._thread is None or self._baseline is None:
            return None
        return max(0, max(self._phase_peak, self._tree_rss()) - self._baseline)

    def cpu_times(self) -> dict[int, float]:
        """CPU seconds (user + system) per process of the tree, keyed by pid."""
        if self._ps is not None:
            return self._each(lambda p: sum(p.cpu_times()[:2]))  # user + system
        if not self._proc:
            return {self._pid: time.process_time()}
        cpu = {
            p: time.process_time() if p == self._pid else _ProcFS.cpu(p)
            for p in _ProcFS.pids(self._pid)
        }
        return {p: v for p, v in cpu.items() if v is not None}

    @staticmethod
    def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
        """CPU seconds spent between two ``cpu_times()`` snapshots (processes started in
        between count from zero)."""
        return sum(max(0.0, v - before.get(pid, 0.0)) for pid, v in after.items())

    def peak_rss(self) -> int:
        """Peak RSS in bytes: the larger of this process's own peak and the sampled tree sum."""
        return max(self._peak, peak_rss_bytes())

    def close(self) -> None:
        """Stop the RSS sampling thread."""
        self._stop.set()


_TREE: ProcessTree | None = None


def process_tree() -> ProcessTree:
    """The child's process-tree monitor (one per process, started on first use)."""
    global _TREE
    if _TREE is None:
        _TREE = ProcessTree()
    return _TREE


class Meter:
    """Times a stream of batches after a warm-up: :meth:`tick` once per batch (rows, bytes)
    returns False once enough is timed; ``min_time=None`` times until :meth:`finish` (a whole
    epoch). :meth:`result` holds rows, bytes, wall_s, cpu_s, latencies (s between batches at the
    consumer), peak_rss and the wall-clock window (for the parent's GPU sampling)."""

    def __init__(
        self,
        warmup: int = 2,
        min_time: float | None = 1.0,
        min_batches: int = 5,
        max_time: float | None = None,
        sync: Callable[[], Any] | None = None,
    ) -> None:
        self.warmup = int(warmup)
        self.min_time = min_time
        self.min_batches = int(min_batches)
        self.max_time = max_time
        # called before each timestamp (e.g. torch.cuda.synchronize)
        self.sync: Callable[[], Any] = sync or (lambda: None)
        self.tree = process_tree()
        self.ticks = self.rows = self.bytes = 0
        self.latencies: list[float] = []
        self.extra: dict[str, Any] = {}
        self._t0: float | None = None
        self._t1: float | None = None
        self._cpu0: dict[int, float] = {}
        self._cpu_s = self._wall0 = self._wall1 = self._last = 0.0
        if self.warmup <= 0:
            self.start()

    @property
    def timing(self) -> bool:
        """Between the end of the warm-up and :meth:`finish`."""
        return self._t0 is not None and self._t1 is None

    def start(self) -> None:
        """Start timing (called by :meth:`tick` once the warm-up batches have arrived)."""
        self.sync()
        self._cpu0 = self.tree.cpu_times()
        self.tree.mark()
        self._wall0 = time.time()
        self._t0 = self._last = time.perf_counter()

    def tick(self, rows: int, nbytes: int = 0) -> bool:
        """One batch arrived. Returns True while the meter wants more batches."""
        self.ticks += 1
        if self._t0 is None:
            if self.ticks >= self.warmup:
                self.start()
            return True
        if self._t1 is not None:
            return False
        self.sync()
        now = time.perf_counter()
        self.latencies.append(now - self._last)
        self._last = now
        self.rows += int(rows)
        self.bytes += int(nbytes)
        elapsed = now - self._t0
        enough = self.min_time is not None and elapsed >= self.min_time
        if (enough and len(self.latencies) >= self.min_batches) or (
            self.max_time is not None and elapsed >= self.max_time
        ):
            self.finish()
            return False
        return True

    def finish(self) -> None:
        """Stop timing (idempotent; starts first if the warm-up never ended)."""
        if self._t1 is not None:
            return
        if self._t0 is None:
            self.start()
        self.sync()
        self._t1 = time.perf_counter()
        self._wall1 = time.time()
        self._cpu_s = ProcessTree.cpu_delta(self._cpu0, self.tree.cpu_times())

    def result(self, **extra: Any) -> dict[str, Any]:
        """The measurement record (finishing first), ``extra`` and :attr:`extra` merged in."""
        self.finish()
        rec = {
            "rows": self.rows,
            "bytes": self.bytes,
            "wall_s": max(self._t1 - self._t0, 1e-9),
            "cpu_s": self._cpu_s,
            "latencies": self.latencies,
            "peak_rss": self.tree.peak_rss(),
            "window": [self._wall0, self._wall1],
        }
        growth = self.tree.growth()
        if growth is not None:
            rec["rss_growth"] = growth
        rec.update(self.extra, **extra)
        return rec


def timed_once(fn, *args, **kwargs) -> tuple[Any, dict[str, Any]]:
    """Run ``fn`` once and time it (wall, CPU of the process tree): for one-shot measurements
    such as ingest. Returns (fn's value, a partial record without rows/bytes)."""
    tree = process_tree()
    c0, w0, t0 = tree.cpu_times(), time.time(), time.perf_counter()
    value = fn(*args, **kwargs)
    return value, {
        "wall_s": max(time.perf_counter() - t0, 1e-9),
        "cpu_s": ProcessTree.cpu_delta(c0, tree.cpu_times()),
        "peak_rss": tree.peak_rss(),
        "window": [w0, time.time()],
    }


def emit(result: dict[str, Any]) -> None:
    """Hand the child's result to the parent (one marked line on stdout)."""
    sys.stdout.flush()
    sys.stdout.write("\n" + RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


# -- parent side -----------------------------------------------------------------------------
class ChildError(RuntimeError):
    """A measurement's child process failed or timed out; ``short`` is one line for tables."""

    def __init__(self, message: str, short: str) -> None:
        super().__init__(message)
        self.short = short


def run_child(
    task: str,
    args: dict[str, Any],
    timeout: float = 600,
    env: dict[str, str] | None = None,
    module: str = "gpuload.bench.child",
) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its result dict."""
    e = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore", **os.environ, **(env or {})}
    cmd = [sys.executable, "-m", module, task, json.dumps(args)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)
    except subprocess.TimeoutExpired as x:
        tail = (x.stderr or b"")[-2000:]
        if isinstance(tail, bytes):
            tail = tail.decode(errors="replace")
        raise ChildError(
            f"child {task} timed out after {timeout:.0f} s:\n{tail}",
            f"timed out after {timeout:.0f} s (hang?)",
        ) from None
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            if p.returncode != 0:
                break
            return json.loads(line[len(RESULT_MARK) :])
    err = (p.stderr or "").strip().splitlines()
    last = next((ln for ln in reversed(err) if ln.strip()), f"exit status {p.returncode}")
    raise ChildError(
        f"child {task} failed (exit status {p.returncode}):\n" + "\n".join(err[-40:]),
        last.strip()[:200],
    )


def summarize(values: Iterable[float]) -> dict[str, float]:
    """Median with min-max over repetitions."""
    v = list(values)
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def fmt(s: dict[str, float], digits: int = 0) -> str:
    """``median (min-max)``."""
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation, as numpy's default."""
    if not values:
        raise ValueError("no values")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
