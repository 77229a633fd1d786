"""Loopback storage servers for tests and benchmarks: S3 (moto, in a child process), a static
HTTP server that honours Range requests, and an S3 reverse proxy; the last two inject faults."""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

__all__ = [
    "EARLY_FAULTS",
    "FAULT_KINDS",
    "applicable_faults",
    "Fault",
    "S3_ERROR_CODES",
    "FaultPlan",
    "FaultRule",
    "LoopbackS3",
    "RangeHTTPServer",
    "S3FaultProxy",
    "fault_fits",
    "file_chunks",
    "mangle",
    "mangle_file",
    "parse_range",
    "read_at",
]

_MOTO_CHILD = r"""
import sys, time
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
s.start()
print(s.get_host_and_port()[1], flush=True)
sys.stdin.read()   # run until the parent closes our stdin (or dies)
s.stop()
"""


class LoopbackS3:
    """A moto S3 server on 127.0.0.1 in a child process; stops when closed or when we exit."""

    def __init__(self, bucket: str = "gpuload") -> None:
        env = dict(os.environ)
        env.setdefault("AWS_ACCESS_KEY_ID", "testing")
        env.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _MOTO_CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            self.close()
            raise RuntimeError(
                f"moto server did not start (printed {line!r}); is moto[server] installed?"
            )
        self.port = int(line)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = bucket
        self.make_bucket(bucket)

    @property
    def storage_options(self) -> dict[str, Any]:
        """s3fs options for this endpoint."""
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        }

    def make_bucket(self, name: str) -> None:
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket=name)

    def url(self, path: str) -> str:
        return f"s3://{self.bucket}/{path.lstrip('/')}"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> LoopbackS3:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# The fault schedule

#: Faults that end or delay a request before any response byte is sent (any method).
EARLY_FAULTS = frozenset({"reset", "status", "stall"})
#: Faults that damage the body of a GET response (ranged or not).
_BODY = frozenset({"truncate", "reset_mid", "bitflip"})
#: Faults that damage the answer to a GET with a Range header.
_RANGED = frozenset({"short", "wrong_range", "wrong_range_lying", "ignore_range"})
FAULT_KINDS: tuple[str, ...] = (
    "reset",
    "status",
    "stall",
    "truncate",
    "reset_mid",
    "bitflip",
    "short",
    "wrong_range",
    "wrong_range_lying",
    "ignore_range",
)

#: The (Code, Message) S3 puts in the XML body of an error with this HTTP status.
S3_ERROR_CODES: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "An error occurred when parsing the HTTP request."),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    408: (
        "RequestTimeout",
        "Your socket connection to the server was not read from or written to within the "
        "timeout period.",
    ),
    412: ("PreconditionFailed", "At least one of the pre-conditions you specified did not hold"),
    429: ("TooManyRequests", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    502: ("BadGateway", "The upstream S3 endpoint could not be reached."),
    503: ("SlowDown", "Please reduce your request rate."),
    504: ("GatewayTimeout", "The upstream S3 endpoint did not answer in time."),
}


def _check_kind(kind: str | None) -> None:
    if kind is not None and kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; one of {', '.join(FAULT_KINDS)}")


def _norm_methods(methods: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if methods is None:
        return None
    if isinstance(methods, str):
        methods = (methods,)
    return tuple(m.upper() for m in methods)


@dataclass
class FaultRule:
    """One schedule entry: each matching request gets ``kind``, at most ``count`` times in all
    (None: no limit), each time with ``probability``."""

    kind: str
    count: int | None = None
    probability: float = 1.0
    path: str | None = None  # a substring the (unquoted) request path must contain
    methods: tuple[str, ...] | None = None  # None: the server's default (see FaultPlan)
    status: int = 503  # for kind "status"
    stall_s: float | None = None  # for kind "stall"; None: until the server closes

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        self.methods = _norm_methods(self.methods)

    def matches(self, op: str, target: str, default_methods: tuple[str, ...]) -> bool:
        """Whether a request (``op``: method, or LIST for the proxy) on ``target`` is eligible."""
        return op in (self.methods or default_methods) and (
            self.path is None or self.path in target
        )


@dataclass
class Fault:
    """A fault decided for one request; ``source`` lets an inapplicable one be given back."""

    kind: str
    status: int
    stall_s: float | None
    source: FaultRule | str | None


class FaultPlan:
    """A thread-safe fault schedule with counters, shared by RangeHTTPServer and S3FaultProxy;
    the top-level fields are its first rule, ``rules`` (see ``add``) are tried next, in order."""

    # A request is eligible for a rule when it matches ``path`` (a substring of the unquoted
    # path and query) and ``methods`` (None: GET and HEAD on RangeHTTPServer; GET of an object
    # on S3FaultProxy, where a GET without a key is "LIST"), and the kind can apply to it:
    # body kinds need a GET answered with a body, range kinds a GET with a Range header.
    # Top-level rule: the next ``fail_next`` eligible requests get ``kind``, then each one gets
    # it with ``probability``; draws come from random.Random(seed). Legacy: ``kind`` None
    # means "reset" when ``reset`` is set, else "status". ``latency_s`` delays every answer.

    def __init__(
        self,
        fail_next: int = 0,
        status: int = 503,
        reset: bool = False,
        *,
        kind: str | None = None,
        probability: float = 0.0,
        seed: int = 0,
        path: str | None = None,
        methods: str | Iterable[str] | None = None,
        stall_s: float | None = None,
        latency_s: float = 0.0,
        rules: Iterable[FaultRule] = (),
    ) -> None:
        _check_kind(kind)
        self.lock = threading.Lock()
        self.fail_next = fail_next
        self.status = status
        self.reset = bool(reset)
        self._kind = kind
        self.probability = probability
        self.seed = seed
        self.path = path
        self.methods = _norm_methods(methods)
        self.stall_s = stall_s
        self.latency_s = latency_s
        self.rules: list[FaultRule] = list(rules)
        self._rng = random.Random(seed)
        self.requests = 0
        self.range_requests = 0
        self.bytes_served = 0
        self.injected: dict[str, int] = {}

    @property
    def kind(self) -> str:
        """The kind of the top-level rule."""
        return self._kind or ("reset" if self.reset else "status")

    @kind.setter
    def kind(self, value: str | None) -> None:
        _check_kind(value)
        self._kind = value

    def add(
        self,
        kind: str,
        *,
        count: int | None = None,
        probability: float = 1.0,
        path: str | None = None,
        methods: str | Iterable[str] | None = None,
        status: int = 503,
        stall_s: float | None = None,
    ) -> FaultRule:
        """Append a rule: the next ``count`` eligible requests (None: all) get ``kind``, each
        with ``probability``."""
        rule = FaultRule(kind, count, probability, path, _norm_methods(methods), status, stall_s)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self, schedule: bool = True) -> None:
        """Zero the counters; with ``schedule`` also drop every pending fault (fail_next,
        probability, rules) and re-seed the generator from ``seed``. Settings stay."""
        with self.lock:
            self.requests = self.range_requests = self.bytes_served = 0
            self.injected = {}
            if schedule:
                self.fail_next = 0
                self.probability = 0.0
                self.rules = []
                self._rng = random.Random(self.seed)

    def snapshot(self) -> dict[str, Any]:
        """The counters as a plain dict (faults: injected count per kind)."""
        with self.lock:
            return {
                "requests": self.requests,
                "range_requests": self.range_requests,
                "bytes_served": self.bytes_served,
                "faults": dict(self.injected),
                "faults_total": sum(self.injected.values()),
                "fail_next": self.fail_next,
            }

    # -- used by the servers ----------------------------------------------------------------

    def count_request(self, ranged: bool) -> None:
        with self.lock:
            self.requests += 1
            self.range_requests += int(ranged)

    def count_bytes(self, n: int) -> None:
        with self.lock:
            self.bytes_served += n

    def decide(
        self, op: str, target: str, applicable: frozenset[str], default: tuple[str, ...]
    ) -> Fault | None:
        """The fault for this request, if any (counted as injected)."""
        with self.lock:
            kind = self.kind
            top = FaultRule(kind, None, 1.0, self.path, _norm_methods(self.methods))
            if kind in applicable and top.matches(op, target, default):
                if self.fail_next > 0:
                    self.fail_next -= 1
                    return self._hit(Fault(kind, self.status, self.stall_s, "fail_next"))
                if self.probability > 0 and self._rng.random() < self.probability:
                    return self._hit(Fault(kind, self.status, self.stall_s, None))
            for rule in self.rules:
                if rule.kind not in applicable or not rule.matches(op, target, default):
                    continue
                if rule.count is not None and rule.count <= 0:
                    continue
                if rule.probability < 1 and self._rng.random() >= rule.probability:
                    continue
                if rule.count is not None:
                    rule.count -= 1
                return self._hit(Fault(rule.kind, rule.status, rule.stall_s, rule))
        return None

    def _hit(self, fault: Fault) -> Fault:
        self.injected[fault.kind] = self.injected.get(fault.kind, 0) + 1
        return fault

    def _refund(self, fault: Fault) -> None:
        """Undo a fault that turned out not to apply (the proxy learns that from upstream)."""
        with self.lock:
            self.injected[fault.kind] -= 1
            if not self.injected[fault.kind]:
                del self.injected[fault.kind]
            if fault.source == "fail_next":
                self.fail_next += 1
            elif isinstance(fault.source, FaultRule) and fault.source.count is not None:
                fault.source.count += 1


# ---------------------------------------------------------------------------------------------
# Shared response machinery


def fault_fits(kind: str, *, get: bool, ranged: bool, n: int, start: int, size: int) -> bool:
    """Whether ``kind`` can apply to a GET (or not) answered with ``n`` body bytes at ``start``
    of a ``size``-byte object."""
    if kind in EARLY_FAULTS:
        return True
    if not get or n < 1:
        return False
    if kind in _BODY:
        return True
    if not ranged:
        return False
    if kind == "short":
        return n >= 2
    if kind in ("wrong_range", "wrong_range_lying"):
        return _other_start(start, n, size) is not None
    return True  # ignore_range


def applicable_faults(
    size: int | None, span: tuple[int, int] | int | None, *, get: bool, n: int, start: int
) -> frozenset[str]:
    """The fault kinds that can apply to a request for a ``size``-byte file (None: no such
    file) whose Range parsed to ``span`` (None: no Range; an int: an error status), answered
    with ``n`` bytes at ``start``."""
    return frozenset(
        k
        for k in FAULT_KINDS
        if k in EARLY_FAULTS
        or (
            size is not None
            and not isinstance(span, int)
            and fault_fits(k, get=get, ranged=span is not None, n=n, start=start, size=size)
        )
    )


def _other_start(start: int, n: int, size: int) -> int | None:
    """Another offset with ``n`` bytes of the object after it, or None if there is none."""
    for cand in (start + n, start - n, 0, size - n):
        if cand >= 0 and cand + n <= size and cand != start:
            return cand
    return None


@dataclass
class _Mangled:
    """A damaged answer: ``body`` under ``length`` (Content-Length), sending at most ``limit``
    bytes, then ending the connection per ``end`` ("keep", "close", "reset")."""

    status: int
    body: bytes
    length: int
    content_range: str | None
    limit: int | None = None
    end: str = "keep"


def mangle(
    kind: str, status: int, body: bytes, start: int, size: int, read_at: Callable[[int, int], bytes]
) -> _Mangled:
    """Apply a body or range fault to the true answer (``body`` at ``start`` of ``size``)."""
    n = len(body)
    honest = f"bytes {start}-{start + n - 1}/{size}" if status == 206 else None
    if kind in ("truncate", "reset_mid"):
        end = "close" if kind == "truncate" else "reset"
        return _Mangled(status, body, n, honest, limit=n // 2, end=end)
    if kind == "bitflip":
        i = n // 2
        return _Mangled(status, body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1 :], n, honest)
    if kind == "short":
        k = n // 2
        return _Mangled(206, body[:k], k, f"bytes {start}-{start + k - 1}/{size}")
    if kind == "ignore_range":
        return _Mangled(200, read_at(0, size), size, None)
    other = _other_start(start, n, size)
    assert other is not None  # fault_fits checked it
    claim = honest if kind == "wrong_range_lying" else f"bytes {other}-{other + n - 1}/{size}"
    return _Mangled(206, read_at(other, n), n, claim)


def mangle_file(kind: str, path: str, start: int, n: int, size: int, *, partial: bool) -> _Mangled:
    """``mangle`` applied to the true answer for ``n`` bytes at ``start`` of the ``size``-byte
    file ``path`` (206 when ``partial``, else 200)."""
    return mangle(
        kind,
        206 if partial else 200,
        read_at(path, start, n),
        start,
        size,
        lambda off, k: read_at(path, off, k),
    )


def _pause(handler: BaseHTTPRequestHandler, seconds: float | None) -> bool:
    """Wait ``seconds`` (None: until the server closes); False when the server is closing."""
    closing: threading.Event = handler.server.closing  # type: ignore[attr-defined]
    if seconds is None:
        closing.wait()
        return False
    if seconds <= 0:
        return not closing.is_set()
    return not closing.wait(seconds)


def _drop(handler: BaseHTTPRequestHandler, rst: bool) -> None:
    """End the connection now: a TCP reset with ``rst``, else a clean close after the handler."""
    handler.close_connection = True
    if rst:
        with contextlib.suppress(OSError):
            linger = struct.pack("ii", 1, 0)
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            handler.connection.close()  # the RST goes out once rfile closes too, in finish()


def _early_fault(
    handler: BaseHTTPRequestHandler, fault: Fault, send_error: Callable[[int], None]
) -> bool:
    """Apply a fault that comes before the response; True when it ended the request."""
    if fault.kind == "reset":
        _drop(handler, rst=True)
        return True
    if fault.kind == "status":
        send_error(fault.status)
        return True
    if fault.kind == "stall":
        if _pause(handler, fault.stall_s):
            return False  # a finite stall: then answer normally
        _drop(handler, rst=False)
        return True
    return False


def _send(
    handler: BaseHTTPRequestHandler,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes | Iterable[bytes],
    *,
    reason: str | None = None,
    limit: int | None = None,
    end: str = "keep",
) -> None:
    """Write a response: the status line, ``headers`` as given, at most ``limit`` body bytes
    (counted in ``bytes_served`` when the status is 200 or 206)."""
    handler.send_response_only(status, reason)
    for k, v in headers:
        handler.send_header(k, v)
    handler.end_headers()
    sent = 0
    plan: FaultPlan = handler.server.plan  # type: ignore[attr-defined]
    try:
        for chunk in (body,) if isinstance(body, bytes) else body:
            if limit is not None and sent + len(chunk) > limit:
                chunk = chunk[: limit - sent]
            if chunk:
                handler.wfile.write(chunk)
                sent += len(chunk)
            if limit is not None and sent >= limit:
                break
    finally:
        if status in (200, 206):
            plan.count_bytes(sent)
    if end == "close":
        handler.close_connection = True
    elif end == "reset":
        _drop(handler, rst=True)


def file_chunks(path: str, start: int, n: int, block: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        fh.seek(start)
        while n > 0:
            data = fh.read(min(block, n))
            if not data:
                return
            n -= len(data)
            yield data


def read_at(path: str, start: int, n: int) -> bytes:
    return b"".join(file_chunks(path, start, n))


class _Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer on 127.0.0.1, serving in a daemon thread, that tracks its
    connections so ``stop`` ends every one of them (stalled ones included)."""

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler], plan: FaultPlan, name: str):
        super().__init__(("127.0.0.1", 0), handler)
        self.plan = plan
        self.name = name
        self.upstream: tuple[str, int] = ("", 0)
        self.closing = threading.Event()
        self._live: dict[threading.Thread, socket.socket] = {}
        self._live_lock = threading.Lock()
        self.thread = threading.Thread(
            target=self.serve_forever, args=(0.05,), name=name, daemon=True
        )
        self.thread.start()

    @property
    def faults(self) -> FaultPlan:
        """Legacy name of ``plan``."""
        return self.plan

    def process_request(self, request: Any, client_address: Any) -> None:
        t = threading.Thread(
            target=self._serve_one,
            args=(request, client_address),
            name=f"{self.name}-conn",
            daemon=True,
        )
        with self._live_lock:
            self._live[t] = request
        t.start()

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._live_lock:
                self._live.pop(threading.current_thread(), None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet for connections the client dropped (or we did); loud for anything else."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, http.client.HTTPException)):
            return
        if isinstance(exc, OSError) and self.closing.is_set():
            return
        super().handle_error(request, client_address)

    def live_threads(self) -> list[threading.Thread]:
        """The connection threads still running."""
        with self._live_lock:
            return list(self._live)

    def stop(self, timeout: float = 5.0) -> None:
        """Wake stalled requests, stop accepting, shut every connection, join the threads."""
        self.closing.set()
        if self.thread.is_alive():
            self.shutdown()
            self.thread.join(timeout)
        with self._live_lock:
            live = list(self._live.items())
        for _, sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for t, _ in live:
            t.join(max(0.0, deadline - time.monotonic()))
        self.server_close()


# ---------------------------------------------------------------------------------------------
# The static file server

_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)$")


def parse_range(header: str, size: int) -> tuple[int, int] | int:
    """(start, end) inclusive, or the HTTP status to answer (400 malformed, 416 unsatisfiable)."""
    m = _RANGE_RE.match(header.strip())
    if not m or m.groups() == ("", ""):
        return 400
    a, b = m.groups()
    if a == "":
        start, end = max(0, size - int(b)), size - 1
    else:
        start = int(a)
        end = min(int(b), size - 1) if b else size - 1
    if start >= size or start > end:
        return 416
    return start, end


class _FileHandler(SimpleHTTPRequestHandler):
    """Static files with single-range GETs, under a FaultPlan."""

    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        return

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        plan = self.server.plan
        rng = None if head else self.headers.get("Range")
        plan.count_request(rng is not None)
        path = self.translate_path(self.path)
        size = os.path.getsize(path) if os.path.isfile(path) else None
        span = parse_range(rng, size) if rng is not None and size is not None else None
        start, end = span if isinstance(span, tuple) else (0, (size or 0) - 1)
        n = end - start + 1
        applicable = applicable_faults(size, span, get=not head, n=n, start=start)
        fault = plan.decide(self.command, unquote(self.path), applicable, ("GET", "HEAD"))
        if not _pause(self, plan.latency_s):
            _drop(self, rst=False)
            return
        if fault is not None and _early_fault(
            self, fault, lambda status: self.send_error(status, "injected failure")
        ):
            return
        if size is None and head:  # a directory listing, a redirect or a 404: as before
            super().do_HEAD()
        elif size is None:
            super().do_GET()
        elif span == 400:
            self.send_error(400, "bad Range")
        elif span == 416:
            self._send_headers_only(416, [("Content-Range", f"bytes */{size}")])
        elif fault is not None and fault.kind not in EARLY_FAULTS:
            self._send_fault(path, fault, start, n, size, partial=span is not None)
        else:
            self._send_file(path, start, n, size, partial=span is not None, head=head)

    def _file_headers(self, path: str, length: int) -> list[tuple[str, str]]:
        return [
            ("Server", self.version_string()),
            ("Date", self.date_time_string()),
            ("Content-Type", self.guess_type(path)),
            ("Accept-Ranges", "bytes"),
            ("Last-Modified", self.date_time_string(int(os.path.getmtime(path)))),
            ("Content-Length", str(length)),
        ]

    def _send_headers_only(self, status: int, headers: list[tuple[str, str]]) -> None:
        base = [("Server", self.version_string()), ("Date", self.date_time_string())]
        _send(self, status, [*base, *headers, ("Content-Length", "0")], b"")

    def _send_file(
        self, path: str, start: int, n: int, size: int, *, partial: bool, head: bool
    ) -> None:
        headers = self._file_headers(path, n)
        if partial:
            headers.append(("Content-Range", f"bytes {start}-{start + n - 1}/{size}"))
        _send(self, 206 if partial else 200, headers, b"" if head else file_chunks(path, start, n))

    def _send_fault(
        self, path: str, fault: Fault, start: int, n: int, size: int, *, partial: bool
    ) -> None:
        m = mangle_file(fault.kind, path, start, n, size, partial=partial)
        headers = self._file_headers(path, m.length)
        if m.content_range:
            headers.append(("Content-Range", m.content_range))
        _send(self, m.status, headers, m.body, limit=m.limit, end=m.end)


class RangeHTTPServer:
    """A static file server for ``directory`` on 127.0.0.1 with Range support, in a thread,
    that injects the faults of ``faults`` (a FaultPlan; also reachable as ``plan``)."""

    def __init__(self, directory: str, plan: FaultPlan | None = None) -> None:
        directory = os.path.abspath(directory)

        class Handler(_FileHandler):
            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, directory=directory, **kw)

        self.httpd = _Server(Handler, plan if plan is not None else FaultPlan(), "range-http")
        self.thread = self.httpd.thread
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def faults(self) -> FaultPlan:
        """The fault plan (settable)."""
        return self.httpd.plan

    @faults.setter
    def faults(self, plan: FaultPlan) -> None:
        self.httpd.plan = plan

    plan = faults

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving; stalled requests are dropped, connection threads joined."""
        self.httpd.stop(timeout)

    def __enter__(self) -> RangeHTTPServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# The S3 reverse proxy

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "expect",  # answered here (100 Continue); botocore does not sign it
    }
)
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+)$")


def _span_of(resp: http.client.HTTPResponse, n: int) -> tuple[int, int] | None:
    """(start, object size) of a 200 or 206 answer carrying ``n`` bytes, else None."""
    if resp.status == 200:
        return 0, n
    m = _CONTENT_RANGE_RE.match(resp.getheader("Content-Range", "").strip())
    if resp.status != 206 or not m:
        return None
    return int(m.group(1)), int(m.group(3))


def _resp_chunks(resp: http.client.HTTPResponse, block: int = 1 << 20) -> Iterator[bytes]:
    while chunk := resp.read(block):
        yield chunk


class _ProxyHandler(BaseHTTPRequestHandler):
    """Forwards every request to ``server.upstream`` unchanged (Host included, so SigV4 still
    verifies) over a keep-alive connection, and relays the answer under the FaultPlan."""

    protocol_version = "HTTP/1.1"
    server: _Server
    _up: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        return

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def finish(self) -> None:
        if self._up is not None:
            self._up.close()
        super().finish()

    def _op(self) -> str:
        """The method, except that a GET without an object key (a listing, bucket
        configuration) is "LIST"."""
        if self.command != "GET":
            return self.command
        key = urlsplit(self.path).path.lstrip("/").partition("/")[2]
        return "GET" if key else "LIST"

    def _proxy(self) -> None:
        plan = self.server.plan
        body = self._read_body()
        op = self._op()
        ranged = op == "GET" and "Range" in self.headers
        plan.count_request(ranged)
        applicable = (
            EARLY_FAULTS
            | (_BODY if op == "GET" else frozenset())
            | (_RANGED if ranged else frozenset())
        )
        fault = plan.decide(op, unquote(self.path), applicable, ("GET",))
        if not _pause(self, plan.latency_s):
            _drop(self, rst=False)
            return
        if fault is not None and _early_fault(self, fault, self._s3_error):
            return
        headers = self._forward_headers(
            body, drop_range=fault is not None and fault.kind == "ignore_range"
        )
        try:
            resp = self._upstream(headers, body)
        except (OSError, http.client.HTTPException):
            if fault is not None and fault.kind not in EARLY_FAULTS:
                plan._refund(fault)
            self._s3_error(502)
            return
        if fault is not None and fault.kind == "ignore_range" and resp.status != 200:
            plan._refund(fault)  # e.g. a 404: nothing to ignore
        if fault is None or fault.kind in EARLY_FAULTS or fault.kind == "ignore_range":
            self._relay(resp)
        else:
            self._relay_faulted(resp, fault, headers)

    def _read_body(self) -> bytes:
        """The request body (de-chunked if the client sent it chunked)."""
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""
        parts = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline().strip():
                    continue  # trailers
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    def _forward_headers(self, body: bytes, drop_range: bool) -> list[tuple[str, str]]:
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        skip = {"range"} if drop_range else set()
        if chunked:
            skip.add("content-length")
        out = [
            (k, v)
            for k, v in self.headers.items()
            if k.lower() not in _HOP_BY_HOP and k.lower() not in skip
        ]
        if chunked:
            out.append(("Content-Length", str(len(body))))
        return out

    def _upstream(self, headers: list[tuple[str, str]], body: bytes) -> http.client.HTTPResponse:
        """Send the request upstream; a reused connection the server has closed is retried
        once on a fresh one."""
        host, port = self.server.upstream
        for attempt in range(2):
            if self._up is None:
                self._up = http.client.HTTPConnection(host, port, timeout=60)
            fresh = self._up.sock is None
            try:
                self._up.putrequest(
                    self.command, self.path, skip_host=True, skip_accept_encoding=True
                )
                for k, v in headers:
                    self._up.putheader(k, v)
                self._up.endheaders(body or None)
                return self._up.getresponse()
            except (ConnectionError, http.client.RemoteDisconnected):
                self._up.close()
                if fresh or attempt:
                    raise
        raise AssertionError("unreachable")

    def _relay(self, resp: http.client.HTTPResponse) -> None:
        """Relay an upstream answer unchanged, streaming its body."""
        headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
        if self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200:
            resp.read()
            body: bytes | Iterable[bytes] = b""
        elif resp.getheader("Content-Length") is None:
            body = resp.read()
            headers.append(("Content-Length", str(len(body))))
        else:
            body = _resp_chunks(resp)
        _send(self, resp.status, headers, body, reason=resp.reason)

    def _relay_faulted(
        self, resp: http.client.HTTPResponse, fault: Fault, headers: list[tuple[str, str]]
    ) -> None:
        """Relay a GET answer damaged by a body or range fault (unchanged if it cannot apply)."""
        data = resp.read()
        span = _span_of(resp, len(data))
        keep = [
            (k, v)
            for k, v in resp.getheaders()
            if k.lower() not in _HOP_BY_HOP and k.lower() not in ("content-length", "content-range")
        ]
        ok = span is not None and fault_fits(
            fault.kind,
            get=True,
            ranged=resp.status == 206,
            n=len(data),
            start=span[0],
            size=span[1],
        )
        if not ok or span is None:
            self.server.plan._refund(fault)
            cr = resp.getheader("Content-Range")
            keep += [("Content-Range", cr)] if cr else []
            _send(self, resp.status, [*keep, ("Content-Length", str(len(data)))], data)
            return
        try:
            m = mangle(
                fault.kind,
                resp.status,
                data,
                span[0],
                span[1],
                lambda off, k: self._fetch_range(headers, off, k),
            )
        except (OSError, http.client.HTTPException):  # the other range could not be read
            self.server.plan._refund(fault)
            m = _Mangled(resp.status, data, len(data), resp.getheader("Content-Range"))
        keep.append(("Content-Length", str(m.length)))
        if m.content_range:
            keep.append(("Content-Range", m.content_range))
        _send(self, m.status, keep, m.body, limit=m.limit, end=m.end)

    def _fetch_range(self, headers: list[tuple[str, str]], start: int, n: int) -> bytes:
        """Bytes [start, start+n) of the same object (the request re-sent with another Range,
        which a server that checks signatures would refuse)."""
        moved = [(k, v) for k, v in headers if k.lower() != "range"]
        moved.append(("Range", f"bytes={start}-{start + n - 1}"))
        resp = self._upstream(moved, b"")
        data = resp.read()
        if resp.status != 206 or len(data) != n:
            raise OSError(f"upstream answered {resp.status} with {len(data)} bytes for a range")
        return data

    def _s3_error(self, status: int) -> None:
        """Answer like S3 does: the status and an XML <Error> body that botocore parses."""
        code, message = S3_ERROR_CODES.get(status, ("InjectedFault", "An injected failure."))
        rid = uuid.uuid4().hex[:16].upper()
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>"
            f"<Resource>{escape(unquote(urlsplit(self.path).path))}</Resource>"
            f"<RequestId>{rid}</RequestId></Error>"
        ).encode()
        headers = [
            ("x-amz-request-id", rid),
            ("Date", self.date_time_string()),
            ("Server", "AmazonS3"),
            ("Content-Type", "application/xml"),
            ("Content-Length", str(len(xml))),
        ]
        _send(self, status, headers, b"" if self.command == "HEAD" else xml)


class S3FaultProxy:
    """An HTTP reverse proxy on 127.0.0.1, in a thread, in front of an S3 endpoint (a URL, or
    a LoopbackS3), that injects the faults of ``plan``; ``endpoint`` is its URL."""

    def __init__(
        self,
        upstream: str | LoopbackS3,
        plan: FaultPlan | None = None,
        *,
        bucket: str | None = None,
    ) -> None:
        endpoint = upstream if isinstance(upstream, str) else upstream.endpoint
        self.upstream_endpoint = endpoint
        parts = urlsplit(self.upstream_endpoint)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(
                f"S3FaultProxy needs an http:// upstream, not {self.upstream_endpoint!r}"
            )
        self.bucket: str = bucket or getattr(upstream, "bucket", None) or "gpuload"
        self.httpd = _Server(_ProxyHandler, plan if plan is not None else FaultPlan(), "s3-proxy")
        self.httpd.upstream = (parts.hostname, parts.port or 80)
        self.thread = self.httpd.thread
        self.port = self.httpd.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    @property
    def plan(self) -> FaultPlan:
        """The fault plan (settable; also reachable as ``faults``)."""
        return self.httpd.plan

    @plan.setter
    def plan(self, plan: FaultPlan) -> None:
        self.httpd.plan = plan

    faults = plan

    @property
    def storage_options(self) -> dict[str, Any]:
        """s3fs options for the proxy."""
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        }

    def url(self, path: str) -> str:
        return f"s3://{self.bucket}/{path.lstrip('/')}"

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client through the proxy; ``config`` goes to botocore's Config (e.g.
        ``retries={"max_attempts": 1}``)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
            config=Config(**config),
        )

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving; stalled requests are dropped, connection threads joined."""
        self.httpd.stop(timeout)

    def __enter__(self) -> S3FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
