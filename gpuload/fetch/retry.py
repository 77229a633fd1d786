"""Retries with capped exponential backoff for transient storage errors."""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["RetryPolicy", "is_transient", "call_with_retry"]

log = logging.getLogger("gpuload.fetch")
T = TypeVar("T")

_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EAGAIN,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
}
_TRANSIENT_WORDS = (
    "throttl",
    "slowdown",
    "slow down",
    "too many requests",
    "service unavailable",
    "internal error",
    "internalerror",
    "bad gateway",
    "gateway timeout",
    "connection reset",
    "timed out",
    "timeout",
    "requesttimeout",
    "server disconnected",
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a transient failure."""

    tries: int = 5
    base_delay: float = 0.05
    max_delay: float = 2.0

    def __post_init__(self) -> None:
        if self.tries < 1:
            raise ValueError(f"RetryPolicy.tries must be >= 1, got {self.tries}")

    def delay(self, attempt: int) -> float:
        """Full-jitter backoff for the given attempt (0-based)."""
        return random.uniform(0, min(self.max_delay, self.base_delay * (2**attempt)))


def _status(exc: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        v = getattr(exc, attr, None)
        if isinstance(v, int) and 100 <= v < 600:
            return v
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):  # botocore ClientError
        v = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(v, int):
            return v
    return None


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: resets, timeouts, 5xx, throttling (429/503/SlowDown)."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        status = _status(e)
        if status is not None and (status >= 500 or status in (408, 429)):
            return True
        text = str(e).lower()
        if any(w in text for w in _TRANSIENT_WORDS):
            return True
        e = e.__cause__ or e.__context__
    return False


def call_with_retry(fn: Callable[[], T], policy: RetryPolicy, what: Callable[[], str]) -> T:
    """Call ``fn``; on a transient error sleep and try again, up to ``policy.tries`` times.
    The last error propagates with a note of how many tries were made."""
    for attempt in range(policy.tries):
        try:
            return fn()
        except Exception as e:  # classified below; permanent errors propagate at once
            if not is_transient(e) or attempt == policy.tries - 1:
                e.gpuload_tries = attempt + 1  # type: ignore[attr-defined]
                raise
            d = policy.delay(attempt)
            log.debug(
                "transient error on %s (try %d/%d): %r; retrying in %.3fs",
                what(),
                attempt + 1,
                policy.tries,
                e,
                d,
            )
            time.sleep(d)
    raise AssertionError("unreachable")  # pragma: no cover
