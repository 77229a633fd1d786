"""A persistent worker pool that is created on first use and re-created after fork.

Nothing here starts a thread at import. Per-thread state (library decoder handles) lives in a
:class:`ForkSafeLocal`, which forgets everything inherited from a parent process.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["WorkerPool", "ForkSafeLocal", "run_chunks", "orphan"]


# Library handles inherited through fork are never destroyed in the child: their destructors
# may wait on threads that only existed in the parent. They are parked here instead.
_ORPHANS: list = []


def orphan(obj) -> None:
    """Keep ``obj`` alive forever so its destructor never runs (used for fork-inherited handles)."""
    if obj is not None:
        _ORPHANS.append(obj)


class ForkSafeLocal(threading.local):
    """Thread-local storage whose values are abandoned (not destroyed) in a forked child."""

    def get(self, key, factory):
        pid = os.getpid()
        if getattr(self, "_pid", None) != pid:
            for k, v in list(self.__dict__.items()):
                if k != "_pid":
                    orphan(v)
            self.__dict__.clear()
            self._pid = pid
        val = self.__dict__.get(key)
        if val is None:
            val = factory()
            self.__dict__[key] = val
        return val


class WorkerPool:
    """Lazily created ThreadPoolExecutor, re-created when ``os.getpid()`` changes."""

    def __init__(self, threads: int, name: str):
        self.threads = threads
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()
        self._lock_pid = os.getpid()

    def get(self) -> ThreadPoolExecutor:
        pid = os.getpid()
        pool = self._pool
        if pool is not None and self._pid == pid:
            return pool
        if self._lock_pid != pid:  # a lock inherited through fork may be held forever
            self._lock = threading.Lock()
            self._lock_pid = pid
        if self._pool is None or self._pid != pid:
            with self._lock:
                if self._pool is None or self._pid != pid:
                    # A pool inherited through fork has no live threads: abandon it unjoined.
                    if self._pool is not None:
                        orphan(self._pool)
                    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=self.name)
                    self._pid = pid
        return self._pool

    def close(self) -> None:
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.shutdown(wait=True)
            self._pool = None
            self._pid = None


def run_chunks(
    pool: WorkerPool, n: int, work, chunk: int | None = None
) -> list[BaseException | None]:
    """Run ``work(i)`` for i in range(n) on the pool; return the exception per index (or None).

    Indices are handed out in small contiguous chunks (a few images each) so that per-task
    overhead stays small while images of uneven cost still balance across threads. Any
    Exception (MemoryError included) is recorded for its image; KeyboardInterrupt and
    SystemExit propagate to the caller.
    """
    errors: list[BaseException | None] = [None] * n

    def run(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            try:
                work(i)
            except Exception as e:  # noqa: BLE001 - reported per image by the caller
                errors[i] = e

    if pool.threads <= 1 or n <= 1:
        run(0, n)
        return errors
    if chunk is None:
        chunk = max(1, min(8, n // (pool.threads * 4)))
    ex = pool.get()
    futs = [ex.submit(run, lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]
    for f in futs:
        f.result()
    return errors
