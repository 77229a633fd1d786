"""A thread pool whose threads never keep the process alive.

``concurrent.futures.ThreadPoolExecutor`` joins its worker threads when the interpreter exits,
so one read stalled on a dead server keeps a Ctrl-C'd training script from exiting until the
read times out. gpuload's pools run daemon threads instead: at exit they are abandoned, and
every storage operation has its own timeouts anyway. Threads start on demand, never at import.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["DaemonThreadPool"]

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

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on a pool thread; returns its Future."""
        fut: Future = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit to a pool that was shut down")
            self._queue.put((fut, fn, args, kwargs))
            if self._idle <= 0 and len(self._threads) < self._max:
                t = threading.Thread(
                    target=self._work, name=f"{self._prefix}-{next(_names)}", daemon=True
                )
                self._threads.append(t)
                t.start()
            else:
                self._idle -= 1  # one idle thread will take it
        return fut

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

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Stop the threads once the queue drains (cancelling what has not started, if asked)."""
        with self._lock:
            self._shutdown = True
            threads = list(self._threads)
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
            for t in threads:
                if t is not threading.current_thread():
                    t.join()
