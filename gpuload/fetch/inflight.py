"""How many requests to a remote table are in flight at once: a fixed number, or one sized from
what the requests themselves measure.

Throughput from object storage comes from requests in flight: at a latency L, k requests at once
move at most k / L requests a second. How many pay off depends on the bucket (its latency) and
on what saturates first (the client's cores, the server, the link), which a fixed default cannot
know. The adaptive limit climbs a hill on measured throughput, one window (2 x limit requests
and at least ``MIN_WINDOW_S``) at a time, and only in windows where requests waited for a slot
(the limit, not the consumer, bounded the rate): when the requests' mean latency is near the
best seen lately (nothing queues), it raises the limit by half and keeps the raise if throughput
grew by at least ``GAIN``, else goes back and holds for ``HOLD`` windows (twice as many after
each miss in a row, up to 8x). Latency above twice the best (requests queue at the server or for
the client's cores) lowers it by a quarter; a transient error (throttling, a reset connection)
halves it, once per burst, as TCP and the S3 SDKs back off. Nothing here sleeps or polls: every
decision is taken when a request ends.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

from ..retry import is_transient

__all__ = ["InFlightLimit"]

log = logging.getLogger("gpuload.fetch")


class InFlightLimit:
    """A counting gate whose bound is ``fixed``, or adaptive (``fixed=None``) between ``lo`` and
    ``hi`` from ``start``. ``clock`` is injectable so that the controller is tested on its own."""

    START = 16  # the fixed default before the limit was adaptive
    LO = 8
    HI = 64
    GAIN = 1.15  # a raise is kept when the rate grew by at least this factor
    STEP = 1.5  # a raise multiplies the limit by this
    HOLD = 8  # windows without a raise after one that did not pay (doubling per miss in a row)
    MIN_WINDOW_S = 0.25  # a window's least length: rates over shorter ones are noise
    QUEUED = 0.8  # latency above 1 / QUEUED x the best: requests queue somewhere, do not raise
    OVERLOADED = 0.5  # latency above twice the best: lower the limit
    DRIFT = 1.01  # per window, the best latency's upward drift

    def __init__(
        self,
        fixed: int | None = None,
        *,
        start: int = START,
        lo: int = LO,
        hi: int = HI,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if fixed is not None and fixed < 1:
            raise ValueError(f"a fixed limit must be >= 1, got {fixed}")
        if not 1 <= lo <= start <= hi:
            raise ValueError(f"need 1 <= lo <= start <= hi, got {lo}, {start}, {hi}")
        self.adaptive = fixed is None
        self.limit = fixed if fixed is not None else start
        self.lo, self.hi = (self.limit, self.limit) if fixed is not None else (lo, hi)
        self._clock = clock
        self._cond = threading.Condition()
        self._active = 0
        self._waiting = 0
        self._prev: tuple[int, float] | None = None  # (limit, rate) before the raise on trial
        self._base = 0.0  # the best mean request latency of a window lately (0: none yet)
        self._rate: float | None = None  # mean rate of this limit's windows (None: none yet)
        self._hold = 0
        self._backed_off_at = float("-inf")
        self._misses = 0  # raises in a row that did not pay
        self.on_raise: Callable[[int], None] | None = None  # told the new limit on a raise
        # requests queued before the gate (in a pool sized to the limit): demand it cannot see
        self.backlog: Callable[[], int] | None = None
        self.changes = 0  # how often the limit moved
        self.windows = 0  # measurement windows closed (each: 2 x limit requests, >= 0.25 s)
        self.peak = self.limit
        self._new_window(self._clock())

    @contextlib.contextmanager
    def slot(self) -> Iterator[Callable[[int], None]]:
        """Hold one of the ``limit`` slots for the length of one request. Yields a callable to
        report the bytes the request moved; leaving with a transient error backs the limit off."""
        moved = [0]
        with self._cond:
            while self._active >= self.limit:
                self._waiting += 1
                try:
                    self._cond.wait()
                except BaseException:
                    self._cond.notify()  # interrupted: pass on a wake-up this wait may have had
                    raise
                finally:
                    self._waiting -= 1
            t0 = self._clock()
            self._active += 1
        ok = False
        try:
            yield moved.append
            ok = True
        except BaseException as e:
            with self._cond:
                # once per burst: requests that started before the last back-off do not count
                if self.adaptive and is_transient(e) and t0 >= self._backed_off_at:
                    self._back_off()
            raise
        finally:
            with self._cond:
                self._active -= 1
                try:
                    if ok:
                        self._done(sum(moved), self._clock() - t0)
                finally:
                    self._cond.notify()  # one slot is free: one waiter (a raise wakes them all)

    # -- the controller (all under self._cond) ---------------------------------------------
    def _new_window(self, now: float) -> None:
        self._w_start = now
        self._w_done = 0
        self._w_bytes = 0
        self._w_seconds = 0.0  # the requests' own durations, summed
        self._w_queued = 0  # completions that left requests waiting for a slot

    def _done(self, nbytes: int, seconds: float) -> None:
        if not self.adaptive:
            return
        self._w_done += 1
        self._w_bytes += nbytes
        self._w_seconds += seconds
        backlog = self.backlog  # read once: close() may clear it meanwhile
        self._w_queued += self._waiting > 0 or (backlog is not None and backlog() > 0)
        now = self._clock()
        elapsed = now - self._w_start
        if self._w_done < 2 * self.limit or elapsed < self.MIN_WINDOW_S:
            return
        bound = 2 * self._w_queued >= self._w_done  # the limit held requests back for most of it
        rate = (self._w_bytes or self._w_done) / elapsed
        latency = self._w_seconds / self._w_done
        self._new_window(now)
        # the best latency seen lately; it drifts up so that a lasting change is learnt
        self._base = min(self._base * self.DRIFT, latency) if self._base else latency
        self.windows += 1
        if bound and self.windows > 1:  # the first window's rate includes starting up
            self._decide(rate, self._base / max(latency, 1e-9))

    def _decide(self, rate: float, gradient: float) -> None:
        """One window's throughput at the current limit, with requests waiting for slots, and
        its latency's ``gradient`` (best latency / this window's: 1 = no queueing anywhere)."""
        if self._prev is not None:
            before_limit, before_rate = self._prev
            self._prev = None
            if rate < self.GAIN * before_rate:  # the raise did not pay: back, and wait
                self._set(before_limit)
                self._rate = before_rate
                self._misses += 1  # each miss in a row doubles the wait, up to 8x
                self._hold = self.HOLD << min(self._misses - 1, 3)
                return
            self._misses = 0
        # the rate at this limit: the mean of its windows (one window is noisy)
        self._rate = rate if self._rate is None else (self._rate + rate) / 2
        if gradient < self.OVERLOADED and self.limit > self.lo:  # requests queue: fewer
            self._set(max(self.lo, math.floor(self.limit * 0.75)))
            self._hold = self.HOLD
            return
        if self._hold > 0:
            self._hold -= 1
            return
        if self.limit < self.hi and gradient >= self.QUEUED:
            self._prev = (self.limit, self._rate)
            self._set(min(self.hi, math.ceil(self.limit * self.STEP)))

    def _back_off(self) -> None:
        self._backed_off_at = self._clock()
        self._prev = None
        self._hold = self.HOLD
        self._set(max(self.lo, self.limit // 2))
        self._new_window(self._clock())

    def _set(self, limit: int) -> None:
        if limit != self.limit:
            self._rate = None
            self.changes += 1
            raised = limit > self.limit
            self.limit = limit
            self.peak = max(self.peak, limit)
            if raised:
                self._cond.notify_all()
                grow = self.on_raise  # read once: close() may clear it meanwhile
                if grow is not None:
                    try:
                        grow(limit)  # a pool grows its threads to match
                    except Exception as e:  # noqa: BLE001 - fewer threads only slow it down
                        log.debug("growing the fetch pool to %d threads failed: %s", limit, e)

    def after_fork(self) -> None:
        """A forked child's fresh gate (the parent's waiters, requests and pool are not its
        own)."""
        self._cond = threading.Condition()
        self.on_raise = self.backlog = None
        self._active = 0
        self._waiting = 0
        self._new_window(self._clock())
