"""Format 4: the chunk index in immutable segments (docs/FORMAT.md, "Format 4"). The index
threshold is lowered (GPULOAD_INDEX_THRESHOLD) so small tables cross it."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import pickle
import threading
import tracemalloc

import numpy as np
import pytest

import gpuload
from gpuload.errors import FormatError
from gpuload.format import Manifest, SegmentLayout, record_dtype, version_path
from gpuload.index import ENV_MAX_SEGMENTS, ENV_THRESHOLD, SegmentIndex, merge_run
from gpuload.reader import TableReader
from gpuload.storage import Store
from gpuload.testing.servers import RangeHTTPServer
from gpuload.vacuum import vacuum_store
from gpuload.versions import read_version

from ..helpers import rewrite_segment, robot_columns, table_root, write_table_root

CHUNK = 8 << 10  # small chunks: ~3 rows each, so 60 rows make ~20 chunks


@pytest.fixture
def low_threshold(monkeypatch):
    monkeypatch.setenv(ENV_THRESHOLD, "4")


@pytest.fixture(scope="module")
def cols():
    return robot_columns(60, seed=4)


def _part(cols, lo, hi):
    return {k: v[lo:hi] for k, v in cols.items()}


def _ingest(path, data, mode="create"):
    return gpuload.ingest(path, data, mode=mode, chunk_bytes=CHUNK, progress=False)


def _pair(tmp_path, monkeypatch, data):
    """The same rows written as format 2 (threshold not crossed) and as format 4."""
    monkeypatch.setenv(ENV_THRESHOLD, "100000")
    t2 = _ingest(tmp_path / "f2", data)
    monkeypatch.setenv(ENV_THRESHOLD, "4")
    t4 = _ingest(tmp_path / "f4", data)
    assert t2.manifest.format_version == 2 and t4.manifest.format_version == 4
    assert t2.num_chunks == t4.num_chunks > 4
    return t2, t4


def _segments(path) -> dict[str, tuple[float, bytes]]:
    d = path / "index"
    return {n: (os.stat(d / n).st_mtime_ns, (d / n).read_bytes()) for n in os.listdir(d)}


def _same_rows(a, b):
    da, db = a[:].to_dict(), b[:].to_dict()
    assert da.keys() == db.keys()
    for k in da:
        if isinstance(da[k], np.ndarray):
            assert da[k].tobytes() == db[k].tobytes(), k
        else:
            assert da[k] == db[k], k


# -- round trips -------------------------------------------------------------------------------
def test_records_round_trip_chunk_entries(tmp_path):
    """A record says exactly what a JSON chunk entry says: checksummed or not, row hashes or
    not, digests above 2^63."""
    import dataclasses
    import uuid

    from gpuload.segments import chunk_from_record, records_from_chunks

    t = gpuload.ingest(tmp_path / "t", robot_columns(8), progress=False)
    (c,) = t.manifest.chunks
    big = dataclasses.replace(c, checksums=dataclasses.replace(c.checksums, digest=(1 << 64) - 5))
    bare = dataclasses.replace(
        c, file=f"chunks/{uuid.uuid4().hex}.chunk", checksums=None, rowhash={}
    )
    rows, recs = records_from_chunks([big, bare], t.schema)
    assert recs.dtype == record_dtype(t.schema) and recs.dtype.itemsize == 176
    for k, want in enumerate((big, bare)):
        assert chunk_from_record(recs[k], rows[k], want.file, t.schema) == want


def test_crossing_the_threshold_writes_format4_with_identical_rows(tmp_path, monkeypatch, cols):
    t2, t4 = _pair(tmp_path, monkeypatch, cols)
    root = table_root(tmp_path / "f4")
    assert "chunks" not in root and root["num_chunks"] == t4.num_chunks
    assert len(root["segments"]) == 1 and root["num_rows"] == 60
    assert root["column_bytes"] == t2.info()["column_bytes"]
    assert os.listdir(tmp_path / "f4" / "chunks") and os.listdir(tmp_path / "f4" / "index")
    t4 = gpuload.open_table(tmp_path / "f4")
    assert isinstance(t4.index, SegmentIndex)
    _same_rows(t2, t4)
    for i in (0, 17, 59, -1):
        assert t4[i].to_dict()["image"] == t2[i].to_dict()["image"]
    rows = [59, 3, 30, 12]  # distinct chunks, not in order
    for k, v in t4[rows].to_dict().items():
        assert (
            np.array_equal(v, t2[rows].to_dict()[k])
            if isinstance(v, np.ndarray)
            else v == [t2[i].to_dict()[k] for i in rows]
        )
    chunks = np.array([7, 2, 5])  # records in the order asked (ids differ: other files)
    r4, r2 = t4.index.records(chunks), t2.index.records(chunks)
    for f in r4.dtype.names[1:]:
        assert np.array_equal(r4[f], r2[f]), f
    assert [t4.index.chunk(c).file for c in chunks] == [
        n for n in (t4.index.files(chunks)[c] for c in chunks)
    ]
    assert t4.verify()["ok"] and t4.verify()["verified"] == t4.num_chunks
    assert t4.nbytes == t2.nbytes and t4.checksum_status() == t2.checksum_status()
    np.testing.assert_array_equal(t4.chunk_rows, t2.chunk_rows)


def test_small_tables_stay_format2_and_ragged_ones_format3(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_THRESHOLD, "4")
    t = _ingest(tmp_path / "small", _part(robot_columns(4), 0, 4))
    assert t.num_chunks <= 4 and table_root(tmp_path / "small")["format_version"] == 2
    rag = {"x": [np.ones((i % 3, 2), np.float32) * i for i in range(400)], "y": np.arange(400)}
    t3 = gpuload.ingest(tmp_path / "r3", rag, chunk_bytes=1 << 20, progress=False)
    assert table_root(tmp_path / "r3")["format_version"] == 3
    t4 = gpuload.ingest(tmp_path / "r4", rag, chunk_bytes=512, progress=False)
    assert table_root(tmp_path / "r4")["format_version"] == 4 and t4.num_chunks > 4
    for t in (gpuload.open_table(tmp_path / "r3"), gpuload.open_table(tmp_path / "r4")):
        got = t[:]["x"]
        assert all(np.array_equal(g, w) for g, w in zip(got, rag["x"])) and len(got) == 400
    assert t3.verify()["ok"] and t4.verify()["ok"]


def test_appends_add_one_segment_and_never_rewrite_older_ones(tmp_path, low_threshold, cols):
    p = tmp_path / "t"
    _ingest(p, _part(cols, 0, 30))
    before = _segments(p)
    assert len(before) == 1
    for lo in (30, 40, 50):
        t = _ingest(p, _part(cols, lo, lo + 10), mode="append")
        after = _segments(p)
        assert set(before) < set(after) and len(after) == len(before) + 1
        assert all(after[n] == before[n] for n in before)  # same bytes, same mtime
        assert [s["file"] for s in table_root(p)["segments"]][:-1] == [
            s.file for s in read_version(Store(str(p)), t.version - 1).index.segments
        ]
        before = after
    ref = _ingest(tmp_path / "ref", cols)
    _same_rows(ref, gpuload.open_table(p))


def test_an_append_crossing_the_threshold_converts_the_table(tmp_path, low_threshold, cols):
    p = tmp_path / "t"
    _ingest(p, _part(cols, 0, 9))
    assert table_root(p)["format_version"] == 2
    t = _ingest(p, _part(cols, 9, 60), mode="append")
    root = table_root(p)
    assert root["format_version"] == 4 and len(root["segments"]) == 2  # the old chunks, the new
    assert gpuload.open_table(p)[:].to_dict()["text"] == list(cols["text"])
    store = Store(str(p))
    old = TableReader(store, read_version(store, 1))  # time travel: version 1 is format 2
    assert old.manifest.format_version == 2 and len(old) == 9 and t.version == 2
    assert old.read(np.arange(9))["text"] == list(cols["text"][:9])


def test_more_than_32_segments_are_merged(tmp_path, low_threshold):
    data = robot_columns(56, seed=9)
    p = tmp_path / "t"
    _ingest(p, _part(data, 0, 20))
    for i in range(20, 56):  # one row, one chunk, one segment per append
        _ingest(p, _part(data, i, i + 1), mode="append")
        assert len(table_root(p)["segments"]) <= 32
    root = table_root(p)
    assert root["num_chunks"] == gpuload.open_table(p).num_chunks and root["num_rows"] == 56
    counts = [s["chunks"] for s in root["segments"]]
    assert len(counts) < 32 and max(counts) > 2  # merged: some segment holds many appends
    assert gpuload.open_table(p)[:].to_dict()["label"].tolist() == data["label"].tolist()
    # merged-away segments stay on disk for readers of older versions, until vacuum
    assert len(os.listdir(p / "index")) > len(counts)


def test_the_merge_rule_rewrites_each_record_a_logarithmic_number_of_times():
    segs, written, total = [], 0, 0
    rng = np.random.default_rng(0)
    for _ in range(20_000):
        n = int(rng.integers(1, 50))
        total += n
        counts = [*segs, n]
        k = merge_run(counts, 32)
        if k:
            assert k >= 2 and len(counts) - k + 1 <= 32
            segs = [*counts[:-k], sum(counts[-k:])]
        else:
            segs = counts
        written += segs[-1] if k else n
        assert len(segs) <= 32 and sum(segs) == total
    assert written / total < math.log2(total)
    assert merge_run([5] * 32, 32) == 0 and merge_run([100, 1, 1], 2) == 2


def test_max_segments_can_be_lowered(tmp_path, low_threshold, monkeypatch, cols):
    monkeypatch.setenv(ENV_MAX_SEGMENTS, "3")
    p = tmp_path / "t"
    _ingest(p, _part(cols, 0, 20))
    for lo in range(20, 60, 8):
        _ingest(p, _part(cols, lo, lo + 8), mode="append")
        assert len(table_root(p)["segments"]) <= 3
    assert gpuload.open_table(p)[:].to_dict()["text"] == list(cols["text"])


def test_a_conversion_merged_at_once(tmp_path, low_threshold, monkeypatch, cols):
    monkeypatch.setenv(ENV_MAX_SEGMENTS, "1")
    p = tmp_path / "t"
    _ingest(p, _part(cols, 0, 9))  # format 2
    t = _ingest(p, _part(cols, 9, 60), mode="append")  # converted, then merged into one
    root = table_root(p)
    assert root["format_version"] == 4 and len(root["segments"]) == 1
    assert set(os.listdir(p / "index")) == {root["segments"][0]["file"].split("/")[1]}
    assert t[:].to_dict()["text"] == list(cols["text"]) and t.verify()["ok"]


@pytest.mark.timeout(120)
def test_concurrent_appends_keep_every_row_exactly_once(tmp_path, low_threshold):
    p = tmp_path / "t"
    base = robot_columns(20, seed=1)
    _ingest(p, base)
    errors = []

    def writer(w: int) -> None:
        try:
            for j in range(6):
                part = robot_columns(3, seed=100 * w + j)
                part["label"] = np.arange(3) + 1000 * (w + 1) + 10 * j
                _ingest(p, part, mode="append")
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(100)
    assert not errors and not any(th.is_alive() for th in threads)
    t = gpuload.open_table(p)
    labels = t[:]["label"].tolist()
    want = base["label"].tolist() + [
        1000 * (w + 1) + 10 * j + r for w in range(2) for j in range(6) for r in range(3)
    ]
    assert sorted(labels) == sorted(want) and len(labels) == len(want)
    assert t.version == 13 and len(table_root(p)["segments"]) == 13
    assert t.verify()["ok"]


def test_a_crash_before_the_root_is_published_leaves_the_old_version(
    tmp_path, low_threshold, monkeypatch, cols
):
    p = tmp_path / "t"
    t = _ingest(p, _part(cols, 0, 30))
    segs = set(os.listdir(p / "index"))

    def crash(store, manifest):
        assert manifest.index is not None and len(os.listdir(p / "index")) == len(segs) + 1
        raise RuntimeError("killed before the commit point")

    monkeypatch.setattr("gpuload.writer.create_version", crash)
    with pytest.raises(RuntimeError, match="killed"):
        _ingest(p, _part(cols, 30, 60), mode="append")
    again = gpuload.open_table(p)
    assert again.version == t.version and len(again) == 30
    assert set(os.listdir(p / "index")) == segs  # the unpublished segment was removed


def test_overwrite_of_a_format4_table(tmp_path, low_threshold, cols):
    p = tmp_path / "t"
    _ingest(p, cols)
    small = _ingest(p, _part(cols, 0, 3), mode="overwrite")
    assert table_root(p)["format_version"] == 2 and len(small) == 3
    big = _ingest(p, cols, mode="overwrite")
    assert table_root(p)["format_version"] == 4 and len(table_root(p)["segments"]) == 1
    assert big[:].to_dict()["text"] == list(cols["text"])


# -- reads -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [True, "block"])
def test_shuffled_sharded_resumed_batches_equal_the_format2_copys(
    tmp_path, monkeypatch, cols, shuffle
):
    t2, t4 = _pair(tmp_path, monkeypatch, cols)

    def labels(t, **kw):
        return [b["label"].tolist() for b in t.batches(7, shuffle=shuffle, seed=3, **kw)]

    assert labels(t4) == labels(t2) and sorted(sum(labels(t4), [])) == sorted(cols["label"])
    for rank in range(2):
        assert labels(t4, rank=rank, world_size=2) == labels(t2, rank=rank, world_size=2)
    loader = t4.batches(7, shuffle=shuffle, seed=3)
    it = iter(loader)
    first = [next(it)["label"].tolist() for _ in range(3)]
    state = loader.state_dict()
    resumed = t4.batches(7, shuffle=shuffle, seed=3)
    resumed.load_state_dict(state)
    assert first + [b["label"].tolist() for b in resumed] == labels(t2)


def _read_in_child(t, q) -> None:
    q.put(t[[3, 40, 59]].to_dict()["text"])


def test_pickling_a_format4_table_sends_the_root_not_the_index(tmp_path, monkeypatch, cols):
    t2, t4 = _pair(tmp_path, monkeypatch, cols)
    blob = pickle.dumps(t4)
    assert len(blob) < 8 << 10 and b"index/" in blob  # the root names its segments
    back = pickle.loads(blob)
    _same_rows(back, t2)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=_read_in_child, args=(t4, q))
    proc.start()
    got = q.get(timeout=60)
    proc.join(30)
    assert got == [cols["text"][i] for i in (3, 40, 59)]


@pytest.mark.parametrize("cache", [False, True])
def test_remote_read_over_http(tmp_path, low_threshold, cols, cache):
    t = _ingest(tmp_path / "www" / "t", cols)
    with RangeHTTPServer(str(tmp_path / "www")) as server:
        r = gpuload.open_table(f"{server.url}/t", cache=str(tmp_path / "cache") if cache else False)
        assert r.num_chunks == t.num_chunks and not r.is_local
        _same_rows(r, t)
        got = sum((b["label"].tolist() for b in r.batches(8, shuffle=True, seed=1)), [])
        assert sorted(got) == sorted(cols["label"].tolist())
        assert r.verify()["ok"]


def test_memory_store_write_and_read(low_threshold, cols):
    url = "memory://gpuload-f4/t"
    t = _ingest(url, _part(cols, 0, 40))
    _ingest(url, _part(cols, 40, 60), mode="append")
    r = gpuload.open_table(url)
    assert r.manifest.format_version == 4 and len(r.manifest.index.segments) == 2
    assert r[:].to_dict()["text"] == list(cols["text"]) and t.version == 1
    Store(url).remove_tree()


def test_s3_write_append_and_read(s3, low_threshold, cols):
    url = s3.url("f4/t")
    opts = s3.storage_options
    gpuload.ingest(url, _part(cols, 0, 40), chunk_bytes=CHUNK, storage_options=opts, progress=False)
    gpuload.ingest(url, _part(cols, 40, 60), mode="append", chunk_bytes=CHUNK,
                   storage_options=opts, progress=False)  # fmt: skip
    r = gpuload.open_table(url, storage_options=opts, cache=False)
    assert r.manifest.format_version == 4 and len(r.manifest.index.segments) == 2
    assert r[:].to_dict()["text"] == list(cols["text"]) and r.verify()["ok"]


def test_an_older_gpuload_refuses_format4(tmp_path, low_threshold, monkeypatch, cols):
    _ingest(tmp_path / "t", cols)
    monkeypatch.setattr("gpuload.format.SUPPORTED_VERSIONS", (1, 2, 3))
    with pytest.raises(FormatError, match="format version 4 is not supported.*upgrade gpuload"):
        gpuload.open_table(tmp_path / "t")


# -- damage ------------------------------------------------------------------------------------
@pytest.fixture
def damaged(tmp_path, low_threshold, cols):
    """A format-4 table of 60 one-row chunks: a 3-page segment, records in blocks of 23."""
    p = tmp_path / "t"
    gpuload.ingest(p, cols, chunk_bytes=1, progress=False)
    root = table_root(p)
    seg = root["segments"][0]
    m = Manifest.loads(json.dumps(root).encode(), "t")
    lay = SegmentLayout(seg["chunks"], record_dtype(m.schema).itemsize, seg["checksums"]["page"])
    return p, seg["file"], lay


def test_a_corrupted_rows_byte_fails_the_open_naming_segment_and_chunk(damaged):
    p, file, lay = damaged
    raw = bytearray((p / file).read_bytes())
    raw[lay.rows_offset + 8 * 5] ^= 0x10  # chunk 5's row count
    (p / file).write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=rf"segment {file}, chunks \d+-\d+:.*checksum"):
        gpuload.open_table(p)


def test_a_corrupted_record_byte_fails_the_read_of_its_chunk(damaged, cols):
    p, file, lay = damaged
    raw = bytearray((p / file).read_bytes())
    last = lay.chunks - 1
    raw[lay.records_offset + last * lay.record_nbytes + 20] ^= 0x01
    (p / file).write_bytes(bytes(raw))
    t = gpuload.open_table(p)  # the rows sections are intact
    with pytest.raises(FormatError, match=rf"segment {file}, chunks \d+-{last}:.*checksum"):
        t[len(t) - 1].to_dict()


def test_a_truncated_segment_fails_the_open(damaged):
    p, file, lay = damaged
    os.truncate(p / file, lay.size // 2)
    with pytest.raises(FormatError, match=rf"segment {file}.*the manifest says {lay.size} bytes"):
        gpuload.open_table(p)


def test_a_record_pointing_outside_its_chunk_names_segment_and_chunk(damaged):
    p, file, lay = damaged

    def edit(rows, recs):
        recs["c1.data"][7, 0] = recs["size"][7]  # column "state" of chunk 7 starts past its end

    rewrite_segment(p, 0, edit)
    t = gpuload.open_table(p)  # one row per chunk
    assert t[40]["label"] is not None  # a chunk whose record is in another block reads fine
    with pytest.raises(FormatError, match=rf"segment {file}, chunk 7: column 'state' data section"):
        t[7]["state"]


def test_row_totals_that_disagree_are_refused(damaged):
    p, file, lay = damaged
    root = table_root(p)
    root["num_rows"] += 1
    write_table_root(p, root)
    with pytest.raises(FormatError, match="the root says .* rows, its segments hold"):
        gpuload.open_table(p)
    root["segments"][0]["rows"] += 1  # the root agrees with itself, not with the rows section
    write_table_root(p, root)
    with pytest.raises(FormatError, match=rf"segment {file}, chunks 0-\d+: the rows section sums"):
        gpuload.open_table(p)


def test_a_chunk_with_no_rows_is_refused(damaged):
    p, file, lay = damaged

    def edit(rows, recs):
        rows[3], rows[4] = 0, rows[4] + rows[3]

    rewrite_segment(p, 0, edit)
    with pytest.raises(FormatError, match=rf"segment {file}, chunk 3: has 0 rows"):
        gpuload.open_table(p)


def test_a_lying_root_is_refused_before_any_large_allocation(damaged):
    p, file, lay = damaged
    root = table_root(p)
    seg = root["segments"][0]
    n = 50_000_000  # 400 MB of rows and 9 GB of records, if anyone believed it
    big = SegmentLayout(n, lay.record_nbytes, lay.page)
    seg.update(chunks=n, rows=n, size=big.size)
    seg["checksums"].update(covers=big.covers)
    root.update(num_chunks=n, num_rows=n)
    write_table_root(p, root)
    tracemalloc.start()
    try:
        with pytest.raises(
            FormatError, match=rf"segment {file}.*the manifest says {big.size} bytes"
        ):
            gpuload.open_table(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20


# -- vacuum ------------------------------------------------------------------------------------
def _age(paths, seconds):
    for f in paths:
        st = os.stat(f)
        os.utime(f, (st.st_atime - seconds, st.st_mtime - seconds))


def test_vacuum_keeps_named_segments_and_removes_replaced_ones(
    tmp_path, low_threshold, monkeypatch
):
    monkeypatch.setenv(ENV_MAX_SEGMENTS, "2")
    data = robot_columns(40, seed=2)
    p = tmp_path / "t"
    _ingest(p, _part(data, 0, 20))
    _ingest(p, _part(data, 20, 30), mode="append")
    _ingest(p, _part(data, 30, 40), mode="append")  # 3 segments > 2: merged
    named = {s["file"].split("/")[1] for s in table_root(p)["segments"]}
    on_disk = set(os.listdir(p / "index"))
    replaced = on_disk - named
    assert replaced and named < on_disk
    orphan = p / "index" / ("0" * 32 + ".idx")  # a crashed writer's unpublished segment
    orphan.write_bytes(b"x")
    store = Store(str(p))
    r = vacuum_store(store, "t")  # within the grace period: nothing goes
    assert r.removed == ()
    _age([p / "index" / n for n in on_disk] + [orphan], 3 * 86400)
    _age(list((p / "chunks").iterdir()), 3 * 86400)
    for v in (1, 2, 3):  # every version replaced long ago
        raw = json.loads((p / version_path(v)).read_text())
        raw["updated"] -= 3 * 86400
        write_table_root(p, raw)  # the pointer last: version 3
    r = vacuum_store(store, "t")
    assert {x.split("/")[1] for x in r.removed if x.startswith("index/")} == replaced | {
        orphan.name
    }
    assert set(os.listdir(p / "index")) == named
    assert not [x for x in r.removed if x.startswith("chunks/")]  # every chunk is still named
    t = gpuload.open_table(p)
    assert t.verify()["ok"] and t[:]["label"].tolist() == data["label"].tolist()


def test_vacuum_keeps_what_a_recent_version_names(tmp_path, low_threshold, monkeypatch, cols):
    monkeypatch.setenv(ENV_MAX_SEGMENTS, "1")
    p = tmp_path / "t"
    _ingest(p, _part(cols, 0, 30))
    _ingest(p, _part(cols, 30, 60), mode="append")  # merged into one: the first one replaced
    assert len(os.listdir(p / "index")) == 2
    _age([p / "index" / n for n in os.listdir(p / "index")], 3 * 86400)
    r = vacuum_store(Store(str(p)), "t")  # version 1 was replaced just now: a reader may hold it
    assert r.removed == () and len(os.listdir(p / "index")) == 2
    old = TableReader(Store(str(p)), read_version(Store(str(p)), 1))
    assert old.read(np.arange(30))["text"] == list(cols["text"][:30])
