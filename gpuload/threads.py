"""A thread pool whose threads never keep the process alive.

``concurrent.futures.ThreadPoolExecutor`` joins its worker threads when the interpreter exits,
so one read stalled on a dead server keeps a Ctrl-C'd training script from exiting until the
read times out. gpuload's pools run daemon threads instead, and every storage operation has its
own timeouts anyway. Threads start on demand, never at import.

At exit a pool cancels what has not started and gives running tasks a short grace period
(``EXIT_GRACE_S``) before the interpreter abandons them: a thread killed while inside native
code (a decoder, the Numba kernel, LLVM loading a compiled function) aborts the whole process
("terminate called without an active exception"), which a script that stops iterating a loader
early and exits must never see; a read stalled on a dead server still does not hold exit up.
"""

from __future__ import annotations

import atexit
import itertools
import queue
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["DaemonThreadPool", "EXIT_GRACE_S"]

EXIT_GRACE_S = 1.0  # under the 2 s a Ctrl-C during a stalled read may take to exit

_STOP = object()
_names = itertools.count()


class DaemonThreadPool:
    """The subset of ThreadPoolExecutor gpuload uses (submit, shutdown), on daemon threads."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "gpuload") -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self._max = max_workers
        self._prefix = thread_name_prefix
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._shutdown = False
        self._at_exit: Callable[[], None] | None = None

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on a pool thread; returns its Future."""
        fut: Future = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit to a pool that was shut down")
            self._queue.put((fut, fn, args, kwargs))
            if self._idle <= 0 and len(self._threads) < self._max:
                self._start_thread()
            else:
                self._idle -= 1  # one idle thread will take it
        return fut

    def backlog(self) -> int:
        """Tasks queued with no thread free to take them now (an estimate: read unlocked)."""
        return max(0, -self._idle)

    def set_max_workers(self, n: int) -> None:
        """Allow ``n`` threads from now on, starting threads for queued tasks up to it (fewer
        only stops new threads from starting; running ones stay)."""
        if n < 1:
            raise ValueError(f"max_workers must be >= 1, got {n}")
        with self._lock:
            self._max = n
            if self._shutdown:
                return
            # _idle < 0: that many queued tasks wait for a busy thread; a new one takes one
            for _ in range(min(-self._idle, n - len(self._threads))):
                self._start_thread()
                self._idle += 1

    def _start_thread(self) -> None:
        """One more worker (under the lock)."""
        t = threading.Thread(target=self._work, name=f"{self._prefix}-{next(_names)}", daemon=True)
        self._threads.append(t)
        t.start()
        if self._at_exit is None:
            self._at_exit = _exit_hook(self)
            atexit.register(self._at_exit)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fut, fn, args, kwargs = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args, **kwargs))
                except BaseException as e:  # noqa: BLE001 - delivered to whoever waits on it
                    fut.set_exception(e)
            # an idle thread must not keep the last task (and what it references) alive
            del item, fut, fn, args, kwargs
            with self._lock:
                self._idle += 1

    def shutdown(
        self, wait: bool = True, cancel_futures: bool = False, timeout: float | None = None
    ) -> None:
        """Stop the threads once the queue drains (cancelling what has not started, if asked);
        ``wait``: join them, for at most ``timeout`` seconds in all."""
        with self._lock:
            self._shutdown = True
            threads = list(self._threads)
            hook, self._at_exit = self._at_exit, None
        if hook is not None:
            atexit.unregister(hook)
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    item[0].cancel()
        for _ in threads:
            self._queue.put(_STOP)
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            for t in threads:
                if t is not threading.current_thread():
                    t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))


def _exit_hook(pool: DaemonThreadPool) -> Callable[[], None]:
    """What runs at exit for a pool still alive then (held weakly: a pool dropped earlier is
    not kept alive by it)."""
    ref = weakref.ref(pool)

    def at_exit() -> None:
        p = ref()
        if p is not None:
            p.shutdown(wait=True, cancel_futures=True, timeout=EXIT_GRACE_S)

    return at_exit
