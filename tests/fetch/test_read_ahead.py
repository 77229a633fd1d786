"""Read-ahead over a slow link: a loader on a remote table with the block cache downloads the
blocks of the batches after the one it assembles, so round trips overlap (several requests in
flight where a batch at a time would have one), and every row stays exact."""

from __future__ import annotations

import threading
import urllib.request

import numpy as np
import pytest

import gpuload
from gpuload import CacheOptions
from gpuload.testing.shaped import STATS_PATH, ShapedHTTPServer, Shaping

from ..helpers import robot_columns

ROWS = 96


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    cols = robot_columns(ROWS, seed=5)
    gpuload.ingest(root / "robot", cols, chunk_bytes=64 << 10)
    with ShapedHTTPServer(root, Shaping(delay_s=0.02)) as srv:
        yield srv, gpuload.open_table(root / "robot")


def _remote(srv, tmp_path, monkeypatch):
    monkeypatch.setenv("GPULOAD_CACHE_DIR", str(tmp_path / "cache"))
    # small blocks, so one epoch spans many of them
    return gpuload.open_table(f"{srv.url}/robot", cache=CacheOptions(block_bytes=16 << 10))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shuffle", [False, True])
def test_read_ahead_overlaps_round_trips_and_keeps_rows_exact(
    served, tmp_path, monkeypatch, shuffle
):
    srv, local = served
    t = _remote(srv, tmp_path, monkeypatch)
    before = srv.stats()
    got = list(t.batches(8, shuffle=shuffle, seed=3, columns=["image", "state", "label"]))
    want = list(local.batches(8, shuffle=shuffle, seed=3, columns=["image", "state", "label"]))
    assert len(got) == len(want) == ROWS // 8
    for g, w in zip(got, want):
        assert g["image"] == w["image"]
        np.testing.assert_array_equal(g["state"], w["state"])
        np.testing.assert_array_equal(g["label"], w["label"])
    stats = t._fetcher.stats
    assert stats["prefetched"] > 0
    # one assembling thread: without read-ahead a batch's blocks are the only ones in flight
    assert srv.stats()["peak_in_flight"] > 2
    assert srv.stats()["requests"] - before["requests"] < 3 * stats["cache_misses"] + 40


@pytest.mark.timeout(120)
def test_no_read_ahead_without_the_cache(served):
    srv, _ = served
    t = gpuload.open_table(f"{srv.url}/robot", cache=False)
    assert not t.prefetches
    assert sum(len(b["label"]) for b in t.batches(8)) == ROWS
    assert t._fetcher.stats["prefetched"] == 0


@pytest.mark.timeout(120)
def test_read_ahead_plans_each_batch_once_off_the_main_thread(served, tmp_path, monkeypatch):
    """The read-ahead runs on its own thread (the loop handing out batches never waits on its
    round trips) and plans each batch once, not once per batch handed out."""
    srv, _ = served
    t = _remote(srv, tmp_path, monkeypatch)
    calls: list[tuple[str, bool]] = []
    original = type(t).prefetch

    def counting(self, indices, columns=None):
        done = original(self, indices, columns)
        calls.append((threading.current_thread().name, done))
        return done

    monkeypatch.setattr(type(t), "prefetch", counting)
    nbatches = ROWS // 8
    assert sum(len(b["label"]) for b in t.batches(8, columns=["image", "label"])) == ROWS
    assert calls, "no read-ahead happened"
    assert all(name != "MainThread" for name, _ in calls)
    # each batch after the first is planned completely once (a batch the fetcher's bound left
    # incomplete is taken up again: those calls return False)
    assert sum(done for _, done in calls) <= nbatches


def _get(url: str) -> None:
    with urllib.request.urlopen(url, timeout=10) as r:
        r.read()


@pytest.mark.timeout(120)
def test_sections_of_several_chunks_are_fetched_together(served):
    """What a batch reads whole (here a small column's data section in every chunk the rows
    lie in) is fetched in one round of concurrent requests, not one chunk after another."""
    srv, local = served
    t = gpuload.open_table(f"{srv.url}/robot", cache=False)
    rows = np.arange(0, ROWS, 7)
    assert len(np.unique(np.searchsorted(np.cumsum(t.chunk_rows), rows, side="right"))) >= 3
    # sizes and image offsets of every chunk known first: what follows reads label sections
    assert sum(len(b["image"]) for b in t.batches(32, columns=["image"])) == ROWS
    _get(f"{srv.url}{STATS_PATH}?reset_peak=1")
    got = t.read(rows, columns=["label"])["label"]
    peak = srv.stats()["peak_in_flight"]
    np.testing.assert_array_equal(got, local.read(rows, columns=["label"])["label"])
    assert peak >= 2, f"the label sections were fetched one chunk at a time (peak {peak})"
