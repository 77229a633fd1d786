"""The shaped HTTP object server (gpuload.testing.shaped): aiohttp's web server behind gpuload's
latency/bandwidth/connection shaping, in a thread or a child process. It starts and stops cleanly,
serves every row of a table byte-identical at 20 ms per request, really applies its delay,
bandwidth cap and connection limit, and injects a FaultPlan's faults that gpuload recovers from
(or reports) as it does over RangeHTTPServer."""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpuload
from gpuload.fetch import FetchOptions, RetryPolicy
from gpuload.testing import faults
from gpuload.testing.servers import FaultPlan
from gpuload.testing.shaped import STATS_PATH, ShapedHTTPServer, Shaping

from ..helpers import raw, robot_columns, stall_until_close

pytestmark = pytest.mark.timeout(60)

BLOB = random.Random(7).randbytes(1 << 20)  # 1 MiB
POLICY = faults.suite_policy(deadline=3.0, read_timeout=0.5, connect_timeout=0.5)


@pytest.fixture(scope="module")
def www(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A served folder: a robot table (jpeg images, float32 state, labels, text) in small
    chunks, a 1 MiB blob, and a file beside the folder that must never be served."""
    root = tmp_path_factory.mktemp("shaped")
    cols = robot_columns(80)
    gpuload.ingest(root / "www" / "robot", cols, chunk_bytes=32 << 10)
    (root / "www" / "blob.bin").write_bytes(BLOB)
    (root / "secret.txt").write_text("outside the served folder")
    return root / "www", cols


@pytest.fixture(scope="module")
def child(www: tuple[Path, dict[str, Any]]) -> Iterator[ShapedHTTPServer]:
    """One server in a child process (20 ms per request) shared by the process-mode tests."""
    with ShapedHTTPServer(www[0], Shaping(delay_s=0.02), process=True) as server:
        yield server


def timed_get(port: int, target: str, headers: dict[str, str] | None = None) -> tuple[float, bytes]:
    """Seconds from sending a GET (new keep-alive connection, already connected) to its last
    body byte, and the body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.connect()
        t0 = time.perf_counter()
        conn.request("GET", target, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        took = time.perf_counter() - t0
        assert resp.status in (200, 206), resp.status
        return took, body
    finally:
        conn.close()


def concurrent_gets(port: int, n: int, target: str) -> float:
    """Seconds for ``n`` GETs sent at once, each on its own connection."""
    start = threading.Barrier(n + 1)
    bodies: list[bytes] = []

    def one() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.connect()
        start.wait()
        conn.request("GET", target, headers={"Range": "bytes=0-99"})
        bodies.append(conn.getresponse().read())
        conn.close()

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(20)
    took = time.perf_counter() - t0
    assert bodies == [BLOB[:100]] * n
    return took


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except ConnectionRefusedError:
        return False


def settled(server: ShapedHTTPServer) -> dict[str, Any]:
    """The counters once no request is in flight (a handler may still be returning after its
    client has read the last byte); fails if one stays in flight."""
    deadline = time.monotonic() + 5
    while (stats := server.stats())["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.005)
    assert stats["in_flight"] == 0, stats
    return stats


def same_rows(local: gpuload.Table, remote: gpuload.Table) -> int:
    """Every column of every row of ``remote`` equals ``local``'s, byte for byte (same dtype
    and shape for arrays); returns the number of rows compared."""
    rows = 0
    for a, b in zip(local.batches(16), remote.batches(16), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            x, y = a[k], b[k]
            if isinstance(x, np.ndarray):
                assert isinstance(y, np.ndarray) and (x.dtype, x.shape) == (y.dtype, y.shape), k
                assert x.tobytes() == y.tobytes(), k
            else:
                assert type(x) is type(y) and len(x) == len(y), k
                for u, v in zip(x, y):
                    assert type(u) is type(v) and u == v, k
        rows += len(a["label"])
    return rows


# --- start and stop ------------------------------------------------------------------------------


@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
def test_start_stop(www: tuple[Path, dict[str, Any]], process: bool) -> None:
    server = ShapedHTTPServer(www[0], process=process)
    assert server.url == f"http://127.0.0.1:{server.port}" and server.port > 0
    assert accepts(server.port)
    assert timed_get(server.port, "/blob.bin", {"Range": "bytes=0-9"})[1] == BLOB[:10]
    if process:
        assert server.proc is not None and server.proc.poll() is None
    else:
        assert server.thread is not None and server.thread.is_alive()
    server.close()
    assert not accepts(server.port)
    if process:
        assert server.proc is not None and server.proc.poll() is not None
    else:
        assert server.thread is not None and not server.thread.is_alive()
    server.close()  # idempotent
    assert server.stats()["requests"] == 1  # the last counters stay readable
    with ShapedHTTPServer(www[0], process=process) as again:
        port = again.port
        assert accepts(port)
    assert not accepts(port)


def test_close_ends_a_stall_that_would_last_forever(www: tuple[Path, dict[str, Any]]) -> None:
    server = ShapedHTTPServer(www[0], plan=FaultPlan(kind="stall", probability=1.0))
    stalls = lambda: server.stats()["faults"].get("stall", 0)  # noqa: E731
    stall_until_close(server.port, "/blob.bin", stalls, server.close)
    assert server.thread is not None and not server.thread.is_alive() and not accepts(server.port)


def test_refuses_bad_settings(www: tuple[Path, dict[str, Any]]) -> None:
    for bad in (
        dict(delay_s=-0.1),
        dict(delay_s=float("nan")),
        dict(bandwidth_bps=0),
        dict(bandwidth_bps=float("inf")),
        dict(max_connections=0),
        dict(max_connections=1.5),
        dict(max_connections=True),
    ):
        with pytest.raises(ValueError, match=r"Shaping\.\w+ must be"):
            Shaping(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot be used with process=True"):
        ShapedHTTPServer(www[0], plan=FaultPlan(), process=True)
    with pytest.raises(ValueError, match="not a directory"):
        ShapedHTTPServer(www[0] / "blob.bin")


# --- HTTP semantics ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_ranges_heads_and_missing(
    www: tuple[Path, dict[str, Any]], child: ShapedHTTPServer, mode: str
) -> None:
    server = child if mode == "process" else ShapedHTTPServer(www[0])
    try:
        port, size = server.port, len(BLOB)
        r = raw(port, "/blob.bin", {"Range": "bytes=1000-1999"})
        assert r.status == 206 and r.body == BLOB[1000:2000]
        assert r.headers["content-range"] == f"bytes 1000-1999/{size}"
        assert r.headers["content-length"] == "1000" and r.headers["accept-ranges"] == "bytes"
        assert r.headers["last-modified"].endswith("GMT")
        assert raw(port, "/blob.bin", {"Range": "bytes=-10"}).body == BLOB[-10:]
        assert raw(port, "/blob.bin", {"Range": f"bytes={size - 7}-"}).body == BLOB[-7:]
        whole = raw(port, "/blob.bin")
        assert whole.status == 200 and whole.body == BLOB and "content-range" not in whole.headers
        unsat = raw(port, "/blob.bin", {"Range": f"bytes={size}-"})
        assert unsat.status == 416 and unsat.headers["content-range"] == f"bytes */{size}"
        assert raw(port, "/blob.bin", {"Range": "bytes=a-b"}).status == 400
        head = raw(port, "/blob.bin", method="HEAD")
        assert head.status == 200 and head.headers["content-length"] == str(size)
        assert head.body == b""
        for target in ("/nope", "/robot", "/", "/../secret.txt", "/%2e%2e/secret.txt"):
            assert raw(port, target).status == 404, target
        assert raw(port, "/blob.bin", method="PUT").status == 405
    finally:
        if server is not child:
            server.close()


# --- every row over the server -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["uncached", "cached", "process"])
def test_every_row_byte_identical_at_20ms(
    www: tuple[Path, dict[str, Any]],
    child: ShapedHTTPServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    root, cols = www
    local = gpuload.open_table(root / "robot")
    server = child if mode == "process" else ShapedHTTPServer(root, Shaping(delay_s=0.02))
    try:
        before = server.stats()
        url = f"{server.url}/robot"
        t0 = time.perf_counter()
        if mode == "cached":
            monkeypatch.setenv("GPULOAD_CACHE_DIR", str(tmp_path / "cache"))
            remote = gpuload.open_table(url)
            assert remote.is_cached
        else:
            remote = gpuload.open_table(url, cache=False)
            assert not remote.is_cached
        assert same_rows(local, remote) == len(local) == len(cols["label"])
        took = time.perf_counter() - t0
        stats = settled(server)
        served = stats["requests"] - before["requests"]
        assert stats["range_requests"] > before["range_requests"] and served >= 2
        # each request spent >= 20 ms in flight, at most peak_in_flight at once
        assert took >= 0.02 * served / stats["peak_in_flight"], (took, served, stats)
        if mode == "cached":  # a second pass reads the local cache only
            assert same_rows(local, remote) == len(local)
            assert server.stats()["requests"] == stats["requests"]
            assert any((tmp_path / "cache").rglob("*"))
    finally:
        if server is not child:
            server.close()


# --- shaping -------------------------------------------------------------------------------------


def test_delay_is_applied(www: tuple[Path, dict[str, Any]], child: ShapedHTTPServer) -> None:
    rng = {"Range": "bytes=100-4195"}
    with ShapedHTTPServer(www[0], Shaping(delay_s=0.05)) as slow:
        for _ in range(3):
            took, body = timed_get(slow.port, "/blob.bin", rng)
            assert took >= 0.05 and body == BLOB[100:4196]
        t0 = time.perf_counter()
        assert raw(slow.port, "/nope").status == 404  # errors wait too
        assert time.perf_counter() - t0 >= 0.05
        slow.plan = FaultPlan(latency_s=0.05)  # a plan's latency comes on top
        assert timed_get(slow.port, "/blob.bin", rng)[0] >= 0.1
    with ShapedHTTPServer(www[0]) as fast:
        assert min(timed_get(fast.port, "/blob.bin", rng)[0] for _ in range(3)) < 0.025
    # the child process applies its own 20 ms
    took, body = timed_get(child.port, "/blob.bin", rng)
    assert took >= 0.02 and body == BLOB[100:4196]


def test_bandwidth_cap_is_applied(www: tuple[Path, dict[str, Any]]) -> None:
    with ShapedHTTPServer(www[0], Shaping(bandwidth_bps=4 << 20)) as capped:
        took, body = timed_get(capped.port, "/blob.bin")
        assert body == BLOB and took >= 0.22, took  # 1 MiB at 4 MiB/s: 0.25 s
        # the cap is shared: two 512 KiB ranges at once take as long as the whole
        t0 = time.perf_counter()
        halves: list[bytes] = []
        ts = [
            threading.Thread(
                target=lambda r=r: halves.append(timed_get(capped.port, "/blob.bin", r)[1])
            )
            for r in ({"Range": "bytes=0-524287"}, {"Range": "bytes=524288-"})
        ]
        for t in ts:
            t.start()
        for t in ts:
            t.join(20)
        assert sorted(halves) == sorted([BLOB[: 1 << 19], BLOB[1 << 19 :]])
        assert time.perf_counter() - t0 >= 0.22
        assert settled(capped)["bytes_served"] == 2 << 20
    with ShapedHTTPServer(www[0]) as free:
        took = min(timed_get(free.port, "/blob.bin")[0] for _ in range(3))
        assert took < 0.1, took


def test_connection_limit_is_applied(www: tuple[Path, dict[str, Any]]) -> None:
    with ShapedHTTPServer(www[0], Shaping(delay_s=0.05, max_connections=2)) as limited:
        took = concurrent_gets(limited.port, 8, "/blob.bin")
        stats = settled(limited)
        assert took >= 0.19, took  # 4 rounds of 2 at 50 ms each
        assert stats["peak_in_flight"] == 2 and stats["requests"] == 8
    with ShapedHTTPServer(www[0], Shaping(delay_s=0.05)) as open_:
        took = min(concurrent_gets(open_.port, 8, "/blob.bin") for _ in range(2))
        assert settled(open_)["peak_in_flight"] > 2
        assert took < 0.19, took  # one round


def test_stats_in_both_modes(www: tuple[Path, dict[str, Any]], child: ShapedHTTPServer) -> None:
    keys = {"requests", "range_requests", "bytes_served", "in_flight", "peak_in_flight"}
    for server in (ShapedHTTPServer(www[0], plan=FaultPlan(fail_next=1)), child):
        try:
            before = server.stats()
            assert keys <= before.keys()
            if server is not child:
                assert raw(server.port, "/blob.bin").status == 503
            assert raw(server.port, "/blob.bin").body == BLOB
            assert raw(server.port, "/blob.bin", {"Range": "bytes=0-9"}).body == BLOB[:10]
            after = settled(server)
            assert server.stats() == after  # reading the counters is not counted
            faulted = int(server is not child)
            assert after["requests"] - before["requests"] == 2 + faulted
            assert after["range_requests"] - before["range_requests"] == 1
            assert after["bytes_served"] - before["bytes_served"] == len(BLOB) + 10
            assert after["in_flight"] == 0 and after["peak_in_flight"] >= 1
            # a new stretch: the peak restarts from what is in flight now (nothing)
            assert raw(server.port, STATS_PATH + "?reset_peak=1").status == 200
            assert server.stats()["peak_in_flight"] == 0
            if server is child:
                assert "faults" not in after
                assert raw(child.port, STATS_PATH).status == 200
            else:
                assert after["faults"] == {"status": 1} and after["faults_total"] == 1
                assert server.plan is not None and server.plan.snapshot()["requests"] == 3
        finally:
            if server is not child:
                server.close()


# --- faults through the plan ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShapedHTTPServer]:
    """The fault table served with a small delay and a connection limit, so faults go through
    the shaping layer."""
    root = tmp_path_factory.mktemp("shaped-faults")
    faults.make_fault_table(str(root / "t"), 200, chunk_bytes=128 << 10)
    with ShapedHTTPServer(root, Shaping(delay_s=0.002, max_connections=4)) as server:
        yield server


def test_503s_are_retried(fault_server: ShapedHTTPServer) -> None:
    fault_server.plan = FaultPlan()
    t = gpuload.open_table(
        f"{fault_server.url}/t",
        cache=False,
        fetch=FetchOptions(retry=RetryPolicy(tries=4, base_delay=0.001)),
    )
    assert t[0]["id"] == 0
    settled(fault_server)  # no request of that read is left to take a fault
    fault_server.plan = plan = FaultPlan(fail_next=2)
    got = t[150].to_dict()
    want = faults.fault_row(150)
    assert got["payload"] == want["payload"] and np.array_equal(got["state"], want["state"])
    assert t.fetcher.stats["retries"] == 2
    assert plan.snapshot()["faults"] == {"status": 2} and plan.fail_next == 0
    assert fault_server.stats()["faults_total"] == 2


def _case(kind: str, schedule: str, cached: bool = False) -> faults.FaultCase:
    """The case of faults.HTTP_CASES with this kind, schedule and cache setting."""
    for c in faults.HTTP_CASES:
        if (c.kind, c.schedule, c.cached) == (kind, schedule, cached) and c.target == "chunks":
            return c
    raise LookupError((kind, schedule, cached))


@pytest.mark.parametrize(
    "case",
    [
        _case("reset", "p=0.25"),
        _case("reset_mid", "p=0.25"),
        _case("truncate", "p=0.25"),
        _case("short", "p=0.25"),
        _case("wrong_range", "p=0.25"),
        _case("bitflip", "p=0.05"),
        _case("bitflip", "next 1", cached=True),
        _case("bitflip", "always"),
        _case("ignore_range", "always"),
    ],
    ids=lambda c: f"{c.kind}-{c.schedule}-cached{c.cached}",
)
def test_faults_through_the_shaping_layer(
    fault_server: ShapedHTTPServer, case: faults.FaultCase
) -> None:
    """The cases of the fault suite, as tests/fetch/test_faults.py runs them on RangeHTTPServer:
    every row exact, or one clear gpuload error where the fault is permanent."""
    r = faults.run_case(case, "http", f"{fault_server.url}/t", fault_server, seed=3, policy=POLICY)
    assert r.rows_wrong == 0 and r.ok, r
    if r.outcome == "exact":
        assert r.rows_delivered == 200 * (2 if r.cached else 1)
    if case.schedule != "p=0.05":  # a 5% rate may, by chance, hit nothing in one pass
        assert r.faults > 0, "the schedule injected nothing"
    if case.kind == "bitflip" and case.schedule == "always":
        assert r.error.startswith("IntegrityError"), r
    if case.kind == "bitflip" and case.cached:
        assert r.refetches >= 1 and r.outcome == "exact", r
    fault_server.plan = FaultPlan()


def test_fault_kinds_on_the_wire(fault_server: ShapedHTTPServer) -> None:
    """Each kind does on this server what it does on RangeHTTPServer (the rules name a file of
    their own, so that no late request of an earlier test takes them)."""
    port, target = fault_server.port, "/wire.bin"
    data = BLOB[:5000]
    (Path(fault_server.directory) / "wire.bin").write_bytes(data)
    rng = {"Range": "bytes=1000-1999"}
    want = data[1000:2000]
    fault_server.plan = plan = FaultPlan()
    plan.add("reset", count=1, path=target)
    r = raw(port, target, rng)
    assert isinstance(r.error, ConnectionResetError) and r.status is None and r.body == b""
    plan.add("truncate", count=1, path=target)
    r = raw(port, target, rng)
    assert r.error is None and r.status == 206 and r.headers["content-length"] == "1000"
    assert r.body == want[:500]  # half, then a clean close
    plan.add("reset_mid", count=1, path=target)
    r = raw(port, target, rng)
    assert r.error is not None  # the RST may also discard what had arrived
    if r.status is not None:
        assert r.status == 206 and r.headers["content-length"] == "1000"
        assert len(r.body) < 1000 and r.body == want[: len(r.body)]
    plan.add("short", count=1, path=target)
    r = raw(port, target, rng)
    assert r.status == 206 and r.body == want[:500]
    assert r.headers["content-range"] == "bytes 1000-1499/5000"
    plan.add("bitflip", count=1, path=target)
    r = raw(port, target, rng)
    assert r.status == 206 and len(r.body) == 1000
    assert sum(a != b for a, b in zip(r.body, want)) == 1
    plan.add("ignore_range", count=1, path=target)
    r = raw(port, target, rng)
    assert r.status == 200 and r.body == data and "content-range" not in r.headers
    plan.add("stall", count=1, stall_s=0.3, path=target)
    r = raw(port, target, rng)
    assert r.seconds >= 0.3 and r.status == 206 and r.body == want
    assert raw(port, target, rng).body == want  # every rule used up
    assert plan.snapshot()["faults"] == dict.fromkeys(
        ("reset", "truncate", "reset_mid", "short", "bitflip", "ignore_range", "stall"), 1
    )
    fault_server.plan = FaultPlan()
