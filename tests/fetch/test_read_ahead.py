"""Read-ahead over a slow link: a loader on a remote table with the block cache downloads the
blocks of the batches after the one it assembles, so round trips overlap (several requests in
flight where a batch at a time would have one), and every row stays exact."""

from __future__ import annotations

import numpy as np
import pytest

import gpuload
from gpuload import CacheOptions
from gpuload.testing.shaped import ShapedHTTPServer, Shaping

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
