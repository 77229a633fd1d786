"""The one retry layer: capped exponential backoff for transient storage errors, within a deadline.

gpuload owns the retry policy for every remote operation (opening a table, listing, reading,
committing); the storage backends' own retries are turned down to one try when their
filesystems are made (see gpuload.storage), so retries never multiply and a permanent fault
surfaces within ``RetryPolicy.deadline`` plus one try's timeout.
"""

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
    "reduce your request rate",
    "too many requests",
    "service unavailable",
    "internal error",
    "internalerror",
    "bad gateway",
    "gateway timeout",
    "connection reset",
    "connection aborted",
    "connection was closed",
    "timed out",
    "timeout",
    "requesttimeout",
    "server disconnected",
    "payload is not completed",
    "incomplete read",
    "incompleteread",
    "response ended prematurely",
    "could not connect",
    "conditionalrequestconflict",  # S3: racing conditional PUTs; the retry gets its 412
    "conflicting conditional operation",
)
# Transient exception classes of the backends, matched by name so no backend is imported here.
_TRANSIENT_CLASSES = {
    "ClientPayloadError",
    "ServerDisconnectedError",
    "ClientConnectionError",
    "ClientOSError",
    "ServerTimeoutError",
    "ConnectionClosedError",
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ResponseStreamingError",
    "IncompleteReadError",
    "ProxyError",
}


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a transient failure, and each try's timeouts.

    ``deadline``: no new try starts later than this many seconds after the first, so a permanent
    fault surfaces within about ``deadline + read_timeout``. ``connect_timeout`` and
    ``read_timeout`` (seconds without a byte arriving) are given to every remote backend.
    """

    tries: int = 10
    base_delay: float = 0.1
    max_delay: float = 5.0
    deadline: float = 20.0
    connect_timeout: float = 5.0
    read_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.tries, int) or self.tries < 1:
            raise ValueError(f"RetryPolicy.tries must be an int >= 1, got {self.tries!r}")
        for name in ("base_delay", "max_delay", "deadline"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"RetryPolicy.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("connect_timeout", "read_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RetryPolicy.{name} must be > 0, got {getattr(self, name)!r}")

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


# Error codes of S3-style services worth another try, whatever their HTTP status (S3 answers
# RequestTimeout with a 400 and racing conditional PUTs with a 409).
_TRANSIENT_CODES = {
    "requesttimeout",
    "slowdown",
    "throttling",
    "throttlingexception",
    "requestlimitexceeded",
    "toomanyrequestsexception",
    "conditionalrequestconflict",
    "internalerror",
    "serviceunavailable",
}


def _error_code(exc: BaseException) -> str | None:
    """The service's error code of a botocore ClientError, lowercased, or None."""
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        code = resp.get("Error", {}).get("Code")
        if isinstance(code, str):
            return code.lower()
    return None


def _transient_one(e: BaseException) -> bool | None:
    """True/False when this exception alone decides, None to look at its cause."""
    marked = getattr(e, "gpuload_transient", None)
    if marked is not None:
        return bool(marked)
    if isinstance(e, (FileNotFoundError, FileExistsError, PermissionError)):
        return False
    if isinstance(e, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
        return True
    if any(c.__name__ in _TRANSIENT_CLASSES for c in type(e).__mro__):
        return True
    if _error_code(e) in _TRANSIENT_CODES:
        return True
    status = _status(e)
    if status is not None and status != 409:  # a status decides (409: by its code, above)
        return status >= 500 or status in (408, 429)
    text = str(e).lower()
    if any(w in text for w in _TRANSIENT_WORDS):
        return True
    return None


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: resets, timeouts, cut-short bodies, 5xx, throttling."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        verdict = _transient_one(e)
        if verdict is not None:
            return verdict
        e = e.__cause__ or e.__context__
    return False


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    what: Callable[[], str],
) -> T:
    """Call ``fn``; on a transient error sleep and try again, up to ``policy.tries`` times and
    while the deadline allows. The last error propagates with ``gpuload_tries`` set."""
    t0 = time.monotonic()
    for attempt in range(policy.tries):
        try:
            return fn()
        except Exception as e:  # classified below; permanent errors propagate at once
            d = policy.delay(attempt)
            late = time.monotonic() + d - t0 > policy.deadline
            if not is_transient(e) or attempt == policy.tries - 1 or late:
                e.gpuload_tries = attempt + 1  # type: ignore[attr-defined]
                raise
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
