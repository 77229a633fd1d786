"""Loopback storage servers for tests and benchmarks: S3 (moto, in a child process) and a static
HTTP server that honours Range requests (with optional injected failures)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["LoopbackS3", "RangeHTTPServer"]

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


@dataclass
class FaultPlan:
    """Injected failures: the next ``fail_next`` requests get HTTP ``status``; with ``reset``
    the connection is dropped instead."""

    fail_next: int = 0
    status: int = 503
    reset: bool = False
    requests: int = 0
    range_requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)$")


class _Handler(SimpleHTTPRequestHandler):
    faults: FaultPlan

    def log_message(self, *args) -> None:  # keep test output clean
        return

    def _fault(self) -> bool:
        f = self.server.faults  # type: ignore[attr-defined]
        with f.lock:
            f.requests += 1
            if f.fail_next > 0:
                f.fail_next -= 1
                fail = True
            else:
                fail = False
        if not fail:
            return False
        if f.reset:
            self.close_connection = True
            self.connection.shutdown(2)
            return True
        self.send_error(f.status, "injected failure")
        return True

    def do_HEAD(self) -> None:
        if self._fault():
            return
        super().do_HEAD()

    def do_GET(self) -> None:
        if self._fault():
            return
        rng = self.headers.get("Range")
        if not rng:
            return super().do_GET()
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        size = os.path.getsize(path)
        m = _RANGE_RE.match(rng.strip())
        if not m:
            self.send_error(400, "bad Range")
            return
        a, b = m.groups()
        if a == "":
            start, end = max(0, size - int(b)), size - 1
        else:
            start = int(a)
            end = min(int(b), size - 1) if b else size - 1
        if start >= size or start > end:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()
            return
        with self.server.faults.lock:  # type: ignore[attr-defined]
            self.server.faults.range_requests += 1  # type: ignore[attr-defined]
        with open(path, "rb") as fh:
            fh.seek(start)
            body = fh.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class RangeHTTPServer:
    """A static file server for ``directory`` on 127.0.0.1 with Range support, in a thread."""

    def __init__(self, directory: str) -> None:
        directory = os.path.abspath(directory)

        class Handler(_Handler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=directory, **kw)

        self.faults = FaultPlan()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.faults = self.faults  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="range-http", daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def __enter__(self) -> RangeHTTPServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
