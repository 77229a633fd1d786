"""The in-flight limit of remote reads: a fixed bound is a bound, and the adaptive one grows
where requests wait on latency alone, and holds where something else saturates (a server's
connection limit, the machine's cores), with a real HTTP server as well as simulated ones."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

import gpuload
from gpuload.fetch import FetchOptions
from gpuload.fetch.inflight import InFlightLimit
from gpuload.testing.shaped import ShapedHTTPServer, Shaping

from ..helpers import robot_columns


def _drive(gate: InFlightLimit, service, seconds: float, threads: int = 72) -> int:
    """``threads`` clients issuing requests through ``gate`` for ``seconds``; ``service()`` is
    one request. Returns the most requests seen inside the gate at once."""
    stop = time.monotonic() + seconds
    inside = [0, 0]  # now, peak
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client() -> None:
        try:
            while time.monotonic() < stop:
                with gate.slot() as moved:
                    with lock:
                        inside[0] += 1
                        inside[1] = max(inside[1], inside[0])
                    service()
                    with lock:
                        inside[0] -= 1
                    moved(1000)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 30)
    assert not errors, errors[0]
    assert not any(t.is_alive() for t in ts)
    return inside[1]


@pytest.mark.timeout(60)
def test_a_fixed_limit_is_never_exceeded_and_never_moves():
    gate = InFlightLimit(5)
    peak = _drive(gate, lambda: time.sleep(0.005), 1.0, threads=20)
    assert peak == 5
    assert gate.limit == gate.peak == 5 and gate.changes == 0 and gate.hi == 5


@pytest.mark.timeout(60)
def test_adaptive_limit_grows_while_latency_alone_bounds_throughput():
    """A server answering every request after 30 ms however many are in flight: each raise
    pays, so the limit climbs from 16 towards the 64 at most."""
    gate = InFlightLimit()
    assert gate.limit == 16 and gate.hi == 64
    peak = _drive(gate, lambda: time.sleep(0.03), 3.0)
    assert gate.peak >= 24, (gate.limit, gate.windows)
    assert peak > 16
    assert gate.limit <= 64


@pytest.mark.timeout(60)
def test_adaptive_limit_holds_when_a_server_serves_8_at_once():
    """Eight requests served at once and the rest queued (a server's worker limit): a raise
    only lengthens the queue, so it is undone and the limit stays near its start."""
    server = threading.Semaphore(8)

    def service() -> None:
        with server:
            time.sleep(0.02)

    gate = InFlightLimit()
    _drive(gate, service, 3.0)
    assert gate.windows >= 4
    assert gate.limit <= 24 and gate.peak <= 36, (gate.limit, gate.peak)


def test_a_transient_error_halves_the_adaptive_limit_and_others_do_not():
    gate = InFlightLimit(start=32, lo=8, hi=64)
    with pytest.raises(FileNotFoundError), gate.slot():
        raise FileNotFoundError("no such chunk")
    assert gate.limit == 32
    with pytest.raises(ConnectionResetError), gate.slot():
        raise ConnectionResetError("connection reset by peer")
    assert gate.limit == 16
    for _ in range(2):
        with pytest.raises(TimeoutError), gate.slot():
            raise TimeoutError("timed out")
    assert gate.limit == 8  # never under lo
    # a burst: 3 requests in flight together fail; the first halves the limit, and the two
    # that started before that back-off do not halve it again
    gate = InFlightLimit(start=64, lo=8, hi=64)
    burst = [gate.slot() for _ in range(3)]
    for cm in burst:
        cm.__enter__()
    err = ConnectionResetError("reset")
    for cm in burst:
        assert cm.__exit__(ConnectionResetError, err, None) is False  # not swallowed
    assert gate.limit == 32
    fixed = InFlightLimit(4)
    with pytest.raises(ConnectionResetError), fixed.slot():
        raise ConnectionResetError("reset")
    assert fixed.limit == 4


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_max_in_flight_is_checked(bad):
    with pytest.raises(ValueError, match="max_in_flight"):
        FetchOptions(max_in_flight=bad)
    assert type(FetchOptions(max_in_flight=np.int64(8)).max_in_flight) is int


ROWS = 1200


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    gpuload.ingest(root / "robot", robot_columns(ROWS, seed=11), chunk_bytes=256 << 10)
    yield root, gpuload.open_table(root / "robot")


def _epoch(url: str, fetch: FetchOptions):
    # max_gap=0: no coalescing across rows, so that a shuffled epoch is ~one request a row
    t = gpuload.open_table(url, cache=False, fetch=dataclasses.replace(fetch, max_gap=0))
    out = list(t.batches(64, shuffle=True, seed=2, columns=["image", "label"]))
    return t, out


def _rows(batches) -> list:
    return sorted(
        (int(label), bytes(img))
        for b in batches
        for label, img in zip(np.asarray(b["label"]).tolist(), b["image"])
    )


@pytest.mark.timeout(180)
def test_over_http_at_40_ms_adaptive_raises_and_a_pinned_limit_is_kept(served):
    """Uncached shuffled reads (about one request a row) from a real HTTP server adding 40 ms
    to each answer: the adaptive limit puts more than the 16 of the fixed default in flight,
    max_in_flight=12 puts exactly 12, and every row arrives exactly."""
    root, local = served
    want = list(local.batches(64, columns=["image", "label"]))
    with ShapedHTTPServer(root, Shaping(delay_s=0.04)) as srv:
        url = f"{srv.url}/robot"
        t, got = _epoch(url, FetchOptions())
        assert t.fetcher.limit.peak > 16
        assert srv.stats()["peak_in_flight"] > 16
        # uncached remote shuffles by blocks (another order than local): compare as sets
        assert _rows(got) == _rows(want)
    with ShapedHTTPServer(root, Shaping(delay_s=0.04)) as srv:
        t = gpuload.open_table(
            f"{srv.url}/robot", cache=False, fetch=FetchOptions(max_in_flight=12, max_gap=0)
        )
        it = iter(t.batches(64, shuffle=True, seed=2, columns=["image"]))
        assert sum(len(next(it)["image"]) for _ in range(6)) == 384
        assert t.fetcher.limit.peak == 12
        assert srv.stats()["peak_in_flight"] == 12


@pytest.mark.timeout(180)
def test_over_http_a_server_serving_6_at_once_keeps_the_limit_down(served):
    """The same reads (the first 640 rows) from a server that serves 6 requests at once and
    queues the rest."""
    root, _ = served
    with ShapedHTTPServer(root, Shaping(delay_s=0.04, max_connections=6)) as srv:
        t = gpuload.open_table(f"{srv.url}/robot", cache=False, fetch=FetchOptions(max_gap=0))
        it = iter(t.batches(64, shuffle=True, seed=2, columns=["image"]))
        assert sum(len(next(it)["image"]) for _ in range(10)) == 640
        lim = t.fetcher.limit
        assert lim.windows >= 3
        assert lim.limit <= 24 and lim.peak <= 24, (lim.limit, lim.peak)


@pytest.mark.timeout(60)
def test_a_pool_grows_to_a_raised_limit_for_tasks_already_queued():
    """What the fetcher's pool does when the limit rises: tasks queued behind 2 busy threads
    start on new threads at once, up to the new bound and no further."""
    from gpuload.threads import DaemonThreadPool

    pool = DaemonThreadPool(2, thread_name_prefix="gpuload-test")
    release = threading.Event()
    running = []
    lock = threading.Lock()

    def task(i: int) -> int:
        with lock:
            running.append(i)
        release.wait(30)
        return i

    futs = [pool.submit(task, i) for i in range(7)]

    def running_now(n: int) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with lock:
                if len(running) >= n:
                    return True
            time.sleep(0.01)
        return False

    assert running_now(2)
    time.sleep(0.1)
    assert len(running) == 2
    pool.set_max_workers(5)
    assert running_now(5)
    time.sleep(0.1)
    assert len(running) == 5
    release.set()
    assert sorted(f.result(timeout=30) for f in futs) == list(range(7))
    pool.shutdown(wait=True, timeout=10)
