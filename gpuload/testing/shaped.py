"""A static HTTP object server on aiohttp's web server (a production HTTP stack) with Range
support, behind a latency/bandwidth-shaping layer of gpuload's own: a delay before every answer,
a bandwidth cap shared by all connections, a limit on requests served at once. The same layer
injects the faults of a FaultPlan (gpuload.testing.servers), so reliability tests and benchmarks
see real latency from a real server. It runs on its own event loop in a daemon thread, or in a
child process (``process=True``) so that a benchmark's server does not share the client's GIL."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.utils
import http.client
import json
import logging
import math
import mimetypes
import os
import select
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from .servers import (
    EARLY_FAULTS,
    Fault,
    FaultPlan,
    applicable_faults,
    file_chunks,
    mangle_file,
    parse_range,
)

if TYPE_CHECKING:
    from types import ModuleType

    from aiohttp import web

__all__ = ["STATS_PATH", "ShapedHTTPServer", "Shaping"]

log = logging.getLogger("gpuload.testing")

#: GET this path for the server's counters as JSON (never shaped, faulted or counted);
#: ``?reset_peak=1`` then restarts ``peak_in_flight`` from the requests in flight now.
STATS_PATH = "/__gpuload_stats"
_PIECE = 64 << 10  # bytes per paced write under a bandwidth cap
_BLOCK = 1 << 20  # bytes per write without one
_GRACE_S = 0.25  # on close, in-flight requests get this long to finish before being cancelled
_START_TIMEOUT_S = 60.0
_CHILD = "import sys; from gpuload.testing.shaped import _child_main; _child_main(sys.argv[1])"


def _web() -> ModuleType:
    """aiohttp.web, imported on first use so that importing this module needs nothing extra."""
    try:
        from aiohttp import web
    except ImportError as e:
        from gpuload.errors import MissingDependencyError

        raise MissingDependencyError(
            "ShapedHTTPServer needs aiohttp (pip install 'gpuload[http]')"
        ) from e
    return web


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class Shaping:
    """How the server shapes its answers: ``delay_s`` before the headers of every answer,
    ``bandwidth_bps`` response-body bytes per second across all connections together (None: no
    cap), ``max_connections`` requests served at once, the rest waiting for a slot (None: no
    limit), like a server's worker limit."""

    delay_s: float = 0.0
    bandwidth_bps: float | None = None
    max_connections: int | None = None

    def __post_init__(self) -> None:
        if not _is_number(self.delay_s) or self.delay_s < 0:
            raise ValueError(f"Shaping.delay_s must be a finite number >= 0, not {self.delay_s!r}")
        bw = self.bandwidth_bps
        if bw is not None and (not _is_number(bw) or bw <= 0):
            raise ValueError(
                f"Shaping.bandwidth_bps must be None or a finite number > 0, not {bw!r}"
            )
        mc = self.max_connections
        if mc is not None and (not isinstance(mc, int) or isinstance(mc, bool) or mc < 1):
            raise ValueError(f"Shaping.max_connections must be None or an int >= 1, not {mc!r}")


class _Link:
    """The bandwidth cap: one link shared by every connection, carrying ``rate`` bytes/s; each
    piece leaves once the link would have finished carrying it (after every piece before it)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._free_at = 0.0  # loop time at which the link has carried everything booked so far

    async def carry(self, n: int) -> None:
        now = asyncio.get_running_loop().time()
        self._free_at = max(now, self._free_at) + n / self.rate
        await asyncio.sleep(self._free_at - now)


def _pieces(chunks: Iterable[bytes], size: int) -> Iterable[bytes]:
    for chunk in chunks:
        for i in range(0, len(chunk), size):
            yield chunk[i : i + size]


def _drop(request: web.BaseRequest, rst: bool) -> web.StreamResponse:
    """End the connection now (a TCP reset with ``rst``, else a clean close); the response
    returned for aiohttp is never sent, as the connection is gone."""
    transport = request.transport
    if transport is not None:
        if rst:
            sock = transport.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()
    return _web().Response(status=500)


async def _flushed(request: web.BaseRequest, timeout: float = 1.0) -> None:
    """Wait (at most ``timeout``) until what was written has left the transport's buffer, so a
    reset does not discard the part of a body that a fault lets through."""
    transport = request.transport
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while transport is not None and transport.get_write_buffer_size() and loop.time() < deadline:
        await asyncio.sleep(0.001)


async def _finish(request: web.BaseRequest, resp: web.StreamResponse) -> web.StreamResponse:
    """Send a whole small answer now, while the request still holds its connection slot."""
    await resp.prepare(request)
    await resp.write_eof()
    return resp


class _Core:
    """The server proper, on one event loop: shaping, faults, counters and file answers.
    Counters are read from other threads (``stats``), hence the lock."""

    def __init__(self, directory: str, shaping: Shaping, plan: FaultPlan | None) -> None:
        self.directory = directory
        self.shaping = shaping
        self.plan = plan
        self.lock = threading.Lock()
        self.counts = dict.fromkeys(
            ("requests", "range_requests", "bytes_served", "in_flight", "peak_in_flight"), 0
        )
        self._runner: web.ServerRunner | None = None
        self._sock: socket.socket | None = None
        self._closing: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._link: _Link | None = None

    async def start(self) -> int:
        """Listen on 127.0.0.1 (a free port) and return the port."""
        web = _web()
        self._closing = asyncio.Event()
        mc, bw = self.shaping.max_connections, self.shaping.bandwidth_bps
        self._slots = asyncio.Semaphore(mc) if mc is not None else None
        self._link = _Link(bw) if bw is not None else None
        # handler_cancellation: a client that hangs up frees its slot at once
        server = web.Server(self._handle, handler_cancellation=True, access_log=None)
        self._runner = web.ServerRunner(server, shutdown_timeout=_GRACE_S)
        await self._runner.setup()
        self._sock = socket.create_server(("127.0.0.1", 0))
        await web.SockSite(self._runner, self._sock).start()
        return int(self._sock.getsockname()[1])

    async def stop(self) -> None:
        """Wake stalled requests, stop listening, close every connection (cancelling requests
        still running after a short grace), then cancel whatever is left on the loop."""
        if self._closing is not None:
            self._closing.set()
        if self._sock is not None:
            # stop accepting first, and let connections already accepted get their transport:
            # closing the listener under an accept in progress leaks that socket (Python 3.11)
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            for _ in range(2):
                await asyncio.sleep(0)
        if self._runner is not None:
            server = self._runner.server
            await self._runner.cleanup()
            for conn in server.connections if server is not None else ():
                if conn.transport is not None:  # accepted while the runner was closing
                    conn.transport.abort()
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not me]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()  # the site closed it already; this makes sure
        for _ in range(3):  # let closed transports' connection_lost callbacks free the sockets
            await asyncio.sleep(0)

    def stats(self) -> dict[str, Any]:
        """The counters; with a plan also its injected faults per kind and their total."""
        with self.lock:
            out: dict[str, Any] = dict(self.counts)
        plan = self.plan
        if plan is not None:
            snap = plan.snapshot()
            out["faults"], out["faults_total"] = snap["faults"], snap["faults_total"]
        return out

    # -- counters --------------------------------------------------------------------------

    def count_request(self, plan: FaultPlan | None, ranged: bool, *, to_plan: bool) -> None:
        with self.lock:
            self.counts["requests"] += 1
            self.counts["range_requests"] += int(ranged)
        if plan is not None and to_plan:
            plan.count_request(ranged)

    def count_bytes(self, plan: FaultPlan | None, n: int) -> None:
        with self.lock:
            self.counts["bytes_served"] += n
        if plan is not None:
            plan.count_bytes(n)

    def _in_flight(self, delta: int) -> None:
        with self.lock:
            self.counts["in_flight"] += delta
            self.counts["peak_in_flight"] = max(
                self.counts["peak_in_flight"], self.counts["in_flight"]
            )

    # -- requests --------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Every request: the stats page, else the file answer inside a connection slot."""
        if request.path == STATS_PATH:
            stats = self.stats()
            if request.query.get("reset_peak"):  # a new stretch: its peak starts from now
                with self.lock:
                    self.counts["peak_in_flight"] = self.counts["in_flight"]
            return _web().json_response(stats)
        slot = self._slots if self._slots is not None else contextlib.nullcontext()
        async with slot:
            self._in_flight(+1)
            try:
                return await self._serve(request, self.plan)
            except ConnectionError:  # the client went away mid-answer: nothing left to send
                return _drop(request, rst=False)
            finally:
                self._in_flight(-1)

    async def _serve(self, request: web.BaseRequest, plan: FaultPlan | None) -> web.StreamResponse:
        """One GET or HEAD, as _FileHandler._serve does it: decide the fault, wait out the
        delay, then answer (a fault, an error, or the file or its range)."""
        web = _web()
        get, head = request.method == "GET", request.method == "HEAD"
        if not (get or head):
            self.count_request(plan, False, to_plan=False)
            return await _finish(request, web.Response(status=405, headers={"Allow": "GET, HEAD"}))
        rng = request.headers.get("Range") if get else None
        path = self._file_of(request.path)
        size = os.path.getsize(path) if path is not None else None
        span = parse_range(rng, size) if rng is not None and size is not None else None
        start, end = span if isinstance(span, tuple) else (0, (size or 0) - 1)
        n = end - start + 1
        self.count_request(plan, rng is not None, to_plan=True)
        fault = None
        if plan is not None:
            applicable = applicable_faults(size, span, get=get, n=n, start=start)
            fault = plan.decide(
                request.method, unquote(request.raw_path), applicable, ("GET", "HEAD")
            )
        latency = plan.latency_s if plan is not None else 0.0
        if not await self._pause(self.shaping.delay_s + latency):
            return _drop(request, rst=False)
        if fault is not None and fault.kind in EARLY_FAULTS:
            early = await self._early_fault(request, fault)
            if early is not None:
                return early
        if path is None or size is None:
            return await _finish(request, web.Response(status=404, text="not found"))
        if span == 400:
            return await _finish(request, web.Response(status=400, text="bad Range"))
        if span == 416:
            return await _finish(
                request, web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            )
        partial = span is not None
        if fault is not None and fault.kind not in EARLY_FAULTS:  # a body or range fault
            return await self._send_fault(request, plan, fault, path, start, n, size, partial)
        return await self._send_file(request, plan, path, start, n, size, partial, head)

    def _file_of(self, url_path: str) -> str | None:
        """The regular file under the served directory that a (decoded) URL path names; None
        for anything else (missing, a directory, a path that climbs out with '..')."""
        parts = [p for p in url_path.split("/") if p not in ("", ".")]
        if ".." in parts or any("\0" in p or os.sep in p for p in parts):
            return None
        full = os.path.join(self.directory, *parts)
        return full if os.path.isfile(full) else None

    async def _pause(self, seconds: float | None) -> bool:
        """Wait ``seconds`` (None: until the server closes); False when the server is closing."""
        closing = self._closing
        assert closing is not None
        if seconds is None:
            await closing.wait()
            return False
        if seconds <= 0:
            return not closing.is_set()
        try:
            await asyncio.wait_for(closing.wait(), seconds)
        except asyncio.TimeoutError:
            return True
        return False

    async def _early_fault(
        self, request: web.BaseRequest, fault: Fault
    ) -> web.StreamResponse | None:
        """Apply a fault that comes before the response: the answer that ends the request, or
        None when a finite stall is over and the request is answered normally."""
        if fault.kind == "reset":
            return _drop(request, rst=True)
        if fault.kind == "status":
            resp = _web().Response(status=fault.status, text="injected failure")
            return await _finish(request, resp)
        if await self._pause(fault.stall_s):  # a stall
            return None
        return _drop(request, rst=False)

    # -- answers ---------------------------------------------------------------------------

    def _headers(self, path: str, length: int) -> dict[str, str]:
        return {
            "Content-Type": mimetypes.guess_type(path)[0] or "application/octet-stream",
            "Accept-Ranges": "bytes",
            "Last-Modified": email.utils.formatdate(os.path.getmtime(path), usegmt=True),
            "Content-Length": str(length),
        }

    async def _send_file(
        self,
        request: web.BaseRequest,
        plan: FaultPlan | None,
        path: str,
        start: int,
        n: int,
        size: int,
        partial: bool,
        head: bool,
    ) -> web.StreamResponse:
        """The true answer: the file (200) or its range (206), the body paced by the link."""
        resp = _web().StreamResponse(status=206 if partial else 200, headers=self._headers(path, n))
        if partial:
            resp.headers["Content-Range"] = f"bytes {start}-{start + n - 1}/{size}"
        await resp.prepare(request)
        if not head:
            block = _PIECE if self._link is not None else _BLOCK
            await self._write_body(resp, plan, file_chunks(path, start, n, block), None)
        await resp.write_eof()
        return resp

    async def _send_fault(
        self,
        request: web.BaseRequest,
        plan: FaultPlan | None,
        fault: Fault,
        path: str,
        start: int,
        n: int,
        size: int,
        partial: bool,
    ) -> web.StreamResponse:
        """A GET answer damaged by a body or range fault (see servers.mangle): ``limit`` bytes
        of the damaged body, then the connection kept, closed or reset."""
        m = mangle_file(fault.kind, path, start, n, size, partial=partial)
        resp = _web().StreamResponse(status=m.status, headers=self._headers(path, m.length))
        if m.content_range:
            resp.headers["Content-Range"] = m.content_range
        await resp.prepare(request)
        await self._write_body(resp, plan, (m.body,), m.limit)
        if m.end == "keep":
            await resp.write_eof()
            return resp
        if m.end == "reset":
            await _flushed(request)
        return _drop(request, rst=m.end == "reset")

    async def _write_body(
        self,
        resp: web.StreamResponse,
        plan: FaultPlan | None,
        chunks: Iterable[bytes],
        limit: int | None,
    ) -> int:
        """Write at most ``limit`` bytes of ``chunks`` (None: all), each piece paced by the
        bandwidth cap; the bytes written are counted (here and in the plan) even on failure."""
        link, sent = self._link, 0
        try:
            for piece in _pieces(chunks, _PIECE if link is not None else _BLOCK):
                if limit is not None:
                    piece = piece[: limit - sent]
                if piece:
                    if link is not None:
                        await link.carry(len(piece))
                    await resp.write(piece)
                    sent += len(piece)
                if limit is not None and sent >= limit:
                    break
        finally:
            self.count_bytes(plan, sent)
        return sent


# ---------------------------------------------------------------------------------------------
# The server, in a thread or a child process


class ShapedHTTPServer:
    """Files under ``directory`` over HTTP on 127.0.0.1 (``url``, ``port``), from aiohttp's web
    server under ``shaping``: GET and HEAD, single byte ranges (206/416/400), 404 for anything
    that is not a regular file. In-process (the default) it serves on its own event loop in a
    daemon thread and injects the faults of ``plan`` (also ``faults``; settable; an empty
    FaultPlan when None is given, as RangeHTTPServer does); with ``process=True`` it runs in a
    child Python process, shaping only. ``stats()`` gives the counters in both modes."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        shaping: Shaping = Shaping(),
        plan: FaultPlan | None = None,
        *,
        process: bool = False,
    ) -> None:
        if not isinstance(shaping, Shaping):
            raise TypeError(f"shaping must be a Shaping, not {type(shaping).__name__}")
        if process and plan is not None:
            raise ValueError(
                "a FaultPlan cannot be used with process=True (the child process shapes only; "
                "serve in-process to inject faults)"
            )
        self.directory = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(self.directory):
            raise ValueError(f"ShapedHTTPServer: {self.directory} is not a directory")
        self.shaping = shaping
        self.process = process
        self.thread: threading.Thread | None = None
        self.proc: subprocess.Popen[str] | None = None
        self._core: _Core | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._final: dict[str, Any] | None = None
        self.port = 0
        if process:
            self.port = self._start_child()
        else:
            self._core = _Core(self.directory, shaping, plan if plan is not None else FaultPlan())
            self.port = self._start_thread(self._core)
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def plan(self) -> FaultPlan | None:
        """The fault plan (in-process; settable); always None with ``process=True``."""
        return self._core.plan if self._core is not None else None

    @plan.setter
    def plan(self, plan: FaultPlan | None) -> None:
        if self._core is None:
            if plan is not None:
                raise ValueError("a FaultPlan cannot be used with process=True")
            return
        self._core.plan = plan

    faults = plan

    def stats(self) -> dict[str, Any]:
        """requests, range_requests, bytes_served (200/206 bodies), in_flight, peak_in_flight,
        and with a plan its faults and faults_total; fetched from the child with process=True
        (after close: the last counters)."""
        if self._core is not None:
            return self._core.stats()
        if self._final is not None:
            return dict(self._final)
        if self._closed:
            raise RuntimeError("the server's child process ended before its counters were read")
        return self._fetch_stats()

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving: stalled and in-flight requests are dropped, the thread joined or the
        child ended, the port freed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.proc is not None:
            self._stop_child(timeout)
        else:
            self._stop_thread(timeout)

    def __enter__(self) -> ShapedHTTPServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- in a thread -----------------------------------------------------------------------

    def _start_thread(self, core: _Core) -> int:
        """Run an event loop in a daemon thread and start serving on it."""
        self._loop = loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=loop.run_forever, name="shaped-http", daemon=True)
        self.thread.start()
        try:
            return asyncio.run_coroutine_threadsafe(core.start(), loop).result(_START_TIMEOUT_S)
        except BaseException:
            self._closed = True
            self._stop_thread(5.0)
            raise

    def _stop_thread(self, timeout: float) -> None:
        loop, thread, core = self._loop, self.thread, self._core
        assert loop is not None and thread is not None and core is not None
        fut = asyncio.run_coroutine_threadsafe(core.stop(), loop)
        try:
            fut.result(timeout)
        except concurrent.futures.TimeoutError:
            log.warning(
                "ShapedHTTPServer on port %s: stopping took over %.1f s", self.port, timeout
            )
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("ShapedHTTPServer on port %s: its thread did not end", self.port)
            return
        loop.close()

    # -- in a child process ----------------------------------------------------------------

    def _start_child(self) -> int:
        """Start the child, which prints its port, and return the port."""
        import gpuload

        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(gpuload.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        config = json.dumps({"directory": self.directory, "shaping": asdict(self.shaping)})
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, config],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], _START_TIMEOUT_S)
        line = self.proc.stdout.readline().strip() if ready else ""
        if not line.isdigit():
            self._closed = True
            self._stop_child(5.0)
            raise RuntimeError(f"the shaped HTTP server's child did not start (printed {line!r})")
        return int(line)

    def _fetch_stats(self) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", STATS_PATH)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise RuntimeError(f"the stats page answered HTTP {resp.status}")
        return json.loads(body)

    def _stop_child(self, timeout: float) -> None:
        """Keep the last counters, then close the child's stdin (its signal to stop) and wait
        for it; killed if it does not end within ``timeout``."""
        proc = self.proc
        assert proc is not None
        if proc.poll() is None and self.port:
            try:
                self._final = self._fetch_stats()
            except (OSError, http.client.HTTPException, RuntimeError, ValueError) as e:
                log.warning("ShapedHTTPServer child: could not read its counters (%s)", e)
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        if proc.stdout is not None:
            proc.stdout.close()


def _child_main(config: str) -> None:
    """The child process: serve until stdin closes (the parent closed it, or died)."""
    cfg = json.loads(config)
    asyncio.run(_child_serve(cfg["directory"], Shaping(**cfg["shaping"])))


async def _child_serve(directory: str, shaping: Shaping) -> None:
    core = _Core(directory, shaping, None)
    port = await core.start()
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await core.stop()
