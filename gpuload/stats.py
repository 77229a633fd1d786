"""Where a loader's time goes: seconds per named stage, summed over the threads that ran it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["STAGES", "LoaderStats", "StageClock"]

#: The stages of a batch, in the order of the data flow. ``wait`` is the consumer's time blocked
#: on the next batch: near 0 when the loader keeps up, most of the step when it does not.
STAGES = ("read", "decode", "kernel", "transform", "collate", "export", "wait")


class StageClock:
    """Thread-safe totals of seconds per stage (stages run on several threads at once, so the
    totals can exceed wall time: compare stages with each other, not with the clock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds = dict.fromkeys(STAGES, 0.0)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._seconds[stage] = self._seconds.get(stage, 0.0) + seconds

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)


@dataclass(frozen=True)
class LoaderStats:
    """A snapshot of a loader's counters: what ``loader.stats()`` returns.

    ``stages``: seconds per stage (``STAGES``); ``time_to_first_batch_s``: from the first
    iteration's start to its first batch (build, kernel compile and first reads included);
    ``images``: the image stage's counters (decoded, dct_scaled, staging_grows, raw_grows,
    held_replaced: output slots given a fresh buffer because their batch was still held,
    twin_batches: batches run by the kernel's NumPy twin while the kernel compiled)."""

    batches: int = 0
    rows: int = 0
    skipped: int = 0
    wait_s: float = 0.0
    time_to_first_batch_s: float | None = None
    stages: dict[str, float] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
