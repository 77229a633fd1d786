import os
import pickle

import numpy as np
import pytest

import gpuload
from gpuload.errors import FetchError, FormatError
from gpuload.fetch import (
    BlockCache,
    CacheOptions,
    Fetcher,
    FetchOptions,
    Read,
    RetryPolicy,
    coalesce,
    is_transient,
)
from gpuload.storage import Store

from ..helpers import robot_columns


def test_coalesce_merges_adjacent_and_small_gaps():
    reads = [
        Read("a", 100, 10, 0),
        Read("a", 0, 50, 10),
        Read("a", 50, 50, 60),
        Read("b", 0, 5, 110),
    ]
    g = coalesce(reads, max_gap=0)
    assert [(f, s, e, len(rs)) for f, s, e, rs in g] == [("a", 0, 110, 3), ("b", 0, 5, 1)]
    g = coalesce([Read("a", 0, 10, 0), Read("a", 20, 10, 10)], max_gap=5)
    assert len(g) == 2
    g = coalesce([Read("a", 0, 10, 0), Read("a", 20, 10, 10)], max_gap=10)
    assert len(g) == 1 and g[0][2] - g[0][1] == 30
    g = coalesce([Read("a", i * 10, 10, i * 10) for i in range(10)], max_request=35)
    assert [e - s for _, s, e, _ in g] == [30, 30, 30, 10]
    # overlapping and nested reads share one request whose end is the furthest end
    g = coalesce([Read("a", 0, 100, 0), Read("a", 10, 5, 100), Read("a", 50, 60, 105)])
    assert [(s, e) for _, s, e, _ in g] == [(0, 110)]
    assert coalesce([Read("a", 0, 0, 0)]) == []


def test_coalesce_random_reads_cover_exactly():
    rng = np.random.default_rng(0)
    reads = [
        Read(f"f{rng.integers(3)}", int(s), int(ln), i)
        for i, (s, ln) in enumerate(rng.integers(0, 1000, (200, 2)))
    ]
    groups = coalesce(reads, max_gap=16, max_request=400)
    served = sorted((r for g in groups for r in g[3]), key=lambda r: r.dest)
    assert served == sorted((r for r in reads if r.length), key=lambda r: r.dest)
    for f, s, e, rs in groups:
        for r in rs:
            assert f == r.file and s <= r.start and r.end <= e
        assert e - s <= 400 or len(rs) == 1
    # no two requests of the same file could have been merged under max_gap
    by_file = {}
    for f, s, e, _ in groups:
        by_file.setdefault(f, []).append((s, e))
    for spans in by_file.values():
        spans.sort()
        for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
            assert s2 - e1 > 16 or max(e1, e2) - s1 > 400


def _local_file(tmp_path, n=1 << 16):
    data = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8).tobytes()
    os.makedirs(tmp_path / "t" / "chunks", exist_ok=True)
    (tmp_path / "t" / "chunks" / "f.bin").write_bytes(data)
    return Store(str(tmp_path / "t")), data


def test_local_reads_land_in_place_including_gaps_and_overlaps(tmp_path):
    store, data = _local_file(tmp_path)
    f = Fetcher(store, "t")
    reads = [
        Read("chunks/f.bin", 10, 100, 0),
        Read("chunks/f.bin", 200, 50, 100),
        Read("chunks/f.bin", 110, 5, 150),
        Read("chunks/f.bin", 205, 10, 155),
    ]  # the last overlaps the second
    out = np.zeros(165, np.uint8)
    f.read_into(reads, out)
    exp = data[10:110] + data[200:250] + data[110:115] + data[205:215]
    assert out.tobytes() == exp
    with pytest.raises(ValueError, match="do not fit"):
        f.read_into([Read("chunks/f.bin", 0, 10, 160)], out)


def test_local_short_read_is_clear(tmp_path):
    store, data = _local_file(tmp_path, 1000)
    f = Fetcher(store, "tbl")
    out = np.zeros(100, np.uint8)
    with pytest.raises(
        FetchError, match=r"table 'tbl', chunk chunks/f.bin, bytes \[950, 1050\).*truncated"
    ):
        f.read_into([Read("chunks/f.bin", 950, 100, 0)], out)


def test_truncated_chunk_names_table_chunk_and_range(tmp_path):
    t = gpuload.ingest(tmp_path / "tt", robot_columns(20))
    ch = t.manifest.chunks[0]
    p = tmp_path / "tt" / ch.file
    p.write_bytes(p.read_bytes()[: ch.data["text"].offset])
    t = gpuload.open_table(tmp_path / "tt")
    # the file's real size is checked before anything is sized from the manifest
    msg = rf"table 'tt', chunk {ch.file}: the manifest says {ch.size} bytes, the file has"
    with pytest.raises(FormatError, match=msg):
        t[3]["text"]
    with pytest.raises(FormatError, match=msg):
        t[3]["label"]


class FlakyFS:
    """Wraps a filesystem: the first `fail` cat_file calls raise `exc`."""

    def __init__(self, fs, fail, exc):
        self.fs, self.fail, self.exc, self.calls = fs, fail, exc, 0

    def cat_file(self, path, start=None, end=None):
        self.calls += 1
        if self.calls <= self.fail:
            raise self.exc
        return self.fs.cat_file(path, start=start, end=end)

    def __getattr__(self, k):
        return getattr(self.fs, k)


def _memory_table(name, n=50):
    url = f"memory://gpuload-tests/{name}"
    import fsspec

    mem = fsspec.filesystem("memory")
    if mem.exists(f"/gpuload-tests/{name}"):
        mem.rm(f"/gpuload-tests/{name}", recursive=True)
    cols = robot_columns(n)
    gpuload.ingest(url, cols)
    return url, cols


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError("reset by peer"),
        TimeoutError("timed out"),
        OSError("503 Service Unavailable"),
        RuntimeError("SlowDown: please reduce your request rate"),
    ],
)
def test_transient_errors_retried(exc):
    assert is_transient(exc)
    url, cols = _memory_table("flaky")
    t = gpuload.open_table(
        url, cache=False, fetch=FetchOptions(retry=RetryPolicy(tries=4, base_delay=0.001))
    )
    flaky = FlakyFS(t.store.fs, 3, exc)
    t.store._fs = flaky
    assert t[7]["image"] == cols["image"][7]
    assert t.fetcher.stats["retries"] == 3


def test_retries_exhausted_clear_error():
    url, _ = _memory_table("flaky2")
    t = gpuload.open_table(
        url, cache=False, fetch=FetchOptions(retry=RetryPolicy(tries=3, base_delay=0.001))
    )
    t.store._fs = FlakyFS(t.store.fs, 100, ConnectionResetError("reset"))
    with pytest.raises(
        FetchError,
        match=r"table 'flaky2', chunk chunks/[0-9a-f]+\.chunk, bytes \[\d+, \d+\) failed after 3 tries",
    ):
        t[1]["image"]


def test_permanent_errors_not_retried():
    assert not is_transient(PermissionError("denied"))
    assert not is_transient(FileNotFoundError("gone"))
    url, _ = _memory_table("perm")
    t = gpuload.open_table(
        url, cache=False, fetch=FetchOptions(retry=RetryPolicy(tries=5, base_delay=0.001))
    )
    flaky = FlakyFS(t.store.fs, 100, PermissionError("denied"))
    t.store._fs = flaky
    with pytest.raises(FetchError, match="failed after 1 try"):
        t[1]["label"]
    assert flaky.calls == 1


def test_cached_remote_reads_do_not_refetch(tmp_path):
    url, cols = _memory_table("cached", n=120)
    t = gpuload.open_table(
        url, cache=CacheOptions(enabled=True, directory=str(tmp_path / "c"), block_bytes=1 << 14)
    )
    a = [b["image"] for b in t.batches(32, shuffle=True, seed=1)]
    first = dict(t.fetcher.stats)
    b = [b["image"] for b in t.batches(32, shuffle=True, seed=1)]
    assert t.fetcher.stats["requests"] == first["requests"]  # second epoch: all from local disk
    assert sorted(sum(a, [])) == sorted(cols["image"]) == sorted(sum(b, []))
    # a new Table object (a new process would be the same) reuses the disk cache
    t2 = gpuload.open_table(
        url, cache=CacheOptions(enabled=True, directory=str(tmp_path / "c"), block_bytes=1 << 14)
    )
    assert t2[5]["image"] == cols["image"][5] and t2.fetcher.stats["requests"] == 0


def test_cache_is_size_bounded(tmp_path):
    url, cols = _memory_table("bounded", n=200)
    opts = CacheOptions(
        enabled=True, directory=str(tmp_path / "c"), max_bytes=64 << 10, block_bytes=8 << 10
    )
    t = gpuload.open_table(url, cache=opts)
    for i in range(0, 200, 3):
        assert t[i]["image"] == cols["image"][i]
    assert t.fetcher.cache.total_bytes() <= 64 << 10
    assert t.fetcher.stats["cache_misses"] > 0


def test_block_cache_atomic_files(tmp_path):
    c = BlockCache("ns", CacheOptions(enabled=True, directory=str(tmp_path)))
    p = c.store("chunks/x.chunk", 3, b"abc")
    with open(p, "rb") as fh:
        assert fh.read() == b"abc"
    assert c.lookup("chunks/x.chunk", 3) == p
    assert c.lookup("chunks/x.chunk", 4) is None
    assert not [f for f in os.listdir(c.dir) if f.endswith(".tmp")]


def test_fetcher_pickles_without_handles(tmp_path):
    store, data = _local_file(tmp_path)
    f = Fetcher(store, "t")
    out = np.zeros(10, np.uint8)
    f.read_into([Read("chunks/f.bin", 0, 10, 0)], out)
    g = pickle.loads(pickle.dumps(f))
    out2 = np.zeros(10, np.uint8)
    g.read_into([Read("chunks/f.bin", 0, 10, 0)], out2)
    assert out.tobytes() == out2.tobytes() == data[:10]
