"""Tables on a real S3 endpoint (moto on 127.0.0.1) and a local HTTP server with Range support."""

import uuid

import numpy as np
import pytest

import gpuload
from gpuload.errors import FetchError, TableNotFoundError
from gpuload.fetch import FetchOptions, RetryPolicy
from gpuload.testing.servers import RangeHTTPServer

from ..helpers import robot_columns

pytestmark = pytest.mark.s3


def test_s3_client_roundtrip(s3, tmp_path):
    root = s3.url(f"root-{uuid.uuid4().hex[:8]}")
    c = gpuload.Client(root, storage_options=s3.storage_options, cache=str(tmp_path / "cache"))
    cols = robot_columns(120)
    t = c.ingest("robot", cols, chunk_bytes=32 << 10)
    assert t.num_chunks > 2
    c.ingest("other", {"x": [1, 2]})
    assert c.list_tables() == ["other", "robot"]
    t = c.open_table("robot")
    assert t[5]["image"] == cols["image"][5]
    assert t[-1]["text"] == cols["text"][-1]
    got = sum((b["image"] for b in t.batches(32)), [])
    assert got == cols["image"]
    c.ingest("robot", {k: v[:10] for k, v in cols.items()}, mode="append")
    assert len(c.open_table("robot")) == 130
    c.delete_table("other")
    assert c.list_tables() == ["robot"]
    with pytest.raises(TableNotFoundError):
        c.open_table("other")


def test_s3_shuffled_batches_from_cache(s3, tmp_path):
    url = s3.url(f"t-{uuid.uuid4().hex[:8]}")
    cols = robot_columns(200)
    gpuload.ingest(url, cols, storage_options=s3.storage_options, chunk_bytes=64 << 10)
    t = gpuload.open_table(url, storage_options=s3.storage_options, cache=str(tmp_path / "c"))
    loader = t.batches(25, shuffle=True, seed=0)
    e1 = sum((b["text"] for b in loader), [])
    fetched = t.fetcher.stats["requests"]
    e2 = sum((b["text"] for b in loader), [])  # the loader's next epoch
    assert sorted(e1) == sorted(cols["text"]) == sorted(e2) and e1 != e2
    assert t.fetcher.stats["requests"] == fetched  # the second epoch read only the local cache
    # coalescing: whole-block requests, far fewer than rows x columns
    assert fetched < 20


def test_s3_uncached_block_shuffle_and_coalescing(s3):
    url = s3.url(f"u-{uuid.uuid4().hex[:8]}")
    cols = robot_columns(100)
    gpuload.ingest(url, cols, storage_options=s3.storage_options, chunk_bytes=32 << 10)
    t = gpuload.open_table(url, storage_options=s3.storage_options, cache=False)
    assert not t.is_cached
    it = t.batches(50, shuffle=True, seed=1)
    assert (
        t.epoch_order(True, 0, 0).mode == "block"
    )  # remote without a cache: bounded-memory block shuffle
    got = sum((b["text"] for b in it), [])
    assert sorted(got) == sorted(cols["text"]) and got != cols["text"]
    before = t.fetcher.stats["requests"]
    b = next(iter(t.batches(100, columns=["image"])))  # sequential: adjacent rows coalesce
    assert b["image"] == cols["image"]
    assert t.fetcher.stats["requests"] - before <= t.num_chunks


def test_s3_missing_table(s3):
    with pytest.raises(TableNotFoundError):
        gpuload.open_table(s3.url("does/not/exist"), storage_options=s3.storage_options)


@pytest.fixture
def http_table(tmp_path):
    cols = robot_columns(80)
    gpuload.ingest(tmp_path / "www" / "robot", cols, chunk_bytes=32 << 10)
    with RangeHTTPServer(str(tmp_path / "www")) as server:
        yield server, cols


def test_http_range_reads(http_table, tmp_path):
    server, cols = http_table
    t = gpuload.open_table(f"{server.url}/robot", cache=False)
    assert t[11]["image"] == cols["image"][11]
    np.testing.assert_array_equal(t[[1, 70, 3]]["state"], cols["state"][[1, 70, 3]])
    assert server.faults.range_requests >= 2
    tc = gpuload.open_table(f"{server.url}/robot", cache=str(tmp_path / "cache"))
    assert sum((b["text"] for b in tc.batches(16, shuffle=True, seed=2)), []) != cols["text"]


def test_http_5xx_retried_then_clear_error(http_table):
    server, cols = http_table
    t = gpuload.open_table(
        f"{server.url}/robot",
        cache=False,
        fetch=FetchOptions(retry=RetryPolicy(tries=4, base_delay=0.001)),
    )
    assert t[0]["label"] == cols["label"][0]
    server.faults.fail_next = 3
    assert t[2]["image"] == cols["image"][2]
    assert t.fetcher.stats["retries"] == 3
    server.faults.fail_next = 100
    with pytest.raises(
        FetchError,
        match=r"table 'robot', chunk chunks/\w+\.chunk, bytes \[\d+, \d+\) failed after 4 tries.*503",
    ):
        t[3]["image"]


def test_http_throttling_429_retried(http_table):
    server, cols = http_table
    t = gpuload.open_table(
        f"{server.url}/robot",
        cache=False,
        fetch=FetchOptions(retry=RetryPolicy(tries=5, base_delay=0.001)),
    )
    t[0]["label"]
    server.faults.status = 429
    server.faults.fail_next = 2
    assert t[4]["image"] == cols["image"][4]
