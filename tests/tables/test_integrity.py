"""Every byte verified: page checksums written at commit and checked on every read, `gpuload
verify`, tables written before checksums, and names and paths checked whole."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import gpuload
from gpuload.cli import main as cli_main
from gpuload.errors import FormatError, IntegrityError, SchemaError
from gpuload.fetch import FetchOptions

from ..helpers import robot_columns


def _flip(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.fixture
def table(tmp_path):
    cols = robot_columns(60)
    t = gpuload.ingest(tmp_path / "t", cols, chunk_bytes=64 << 10)
    return t, cols


def test_every_chunk_carries_page_checksums(table):
    t, _ = table
    assert t.num_chunks > 1
    for c in t.manifest.chunks:
        assert c.checksums is not None and c.checksums.end == c.size
        assert all(s.end <= c.checksums.covers for s in c.data.values())
    assert t.info()["checksums"].startswith("xxh3-64")


def test_a_flipped_byte_is_an_integrity_error_naming_the_range(table):
    t, cols = table
    c = t.manifest.chunks[0]
    img = c.data["image"]
    _flip(Path(t.store.path(c.file)), img.offset + 5)
    fresh = gpuload.open_table(t.url)
    match = rf"table 't', chunk {c.file}, row 0, column 'image', bytes \[\d+, \d+\): the row"
    with pytest.raises(IntegrityError, match=match):
        fresh[0]["image"]
    # rows outside the damaged page still read, exactly
    last = len(fresh) - 1
    assert fresh[last]["image"] == cols["image"][last]
    # verify_local=False trades the check away: the damaged bytes come through
    loose = gpuload.open_table(t.url, fetch=FetchOptions(verify_local=False))
    assert loose[0]["image"] != cols["image"][0]


def test_gpuload_verify_reports_damaged_chunks(table, capsys):
    t, _ = table
    assert cli_main(["verify", t.url]) == 0
    assert f"{t.num_chunks} of {t.num_chunks} chunks verified" in capsys.readouterr().out
    c = t.manifest.chunks[-1]
    _flip(Path(t.store.path(c.file)), c.data["label"].offset)
    assert cli_main(["verify", t.url]) == 1
    out = capsys.readouterr().out
    assert f"BAD {c.file}" in out and "does not match its checksum" in out
    report = gpuload.open_table(t.url).verify()
    assert not report["ok"] and [b["chunk"] for b in report["bad"]] == [c.file]


def test_a_table_written_before_checksums_still_opens(table):
    """Format 1 manifests have no checksums: the table reads as before, unverified, and info
    says so."""
    t, cols = table
    for path in [Path(t.url) / "manifest.json", *sorted((Path(t.url) / "versions").iterdir())]:
        d = json.loads(path.read_bytes())
        d["format_version"] = 1
        for c in d["chunks"]:
            c.pop("checksums")
            for col in c["columns"].values():
                col.pop("rowhash", None)
        path.write_text(json.dumps(d))
    old = gpuload.open_table(t.url)
    assert old.manifest.format_version == 1
    assert old.info()["checksums"].startswith("none")
    assert old[:].to_dict()["image"] == cols["image"]
    assert old.verify()["unverified"] == [c.file for c in old.manifest.chunks]
    # appending to it adds checksummed chunks; reads mix both
    gpuload.ingest(t.url, robot_columns(5, seed=1), mode="append")
    mixed = gpuload.open_table(t.url)
    assert mixed.info()["checksums"].startswith(f"1 of {mixed.num_chunks} chunks")
    assert len(mixed[:].to_dict()["image"]) == 65


def test_a_manifest_that_lies_about_a_size_is_refused_before_allocating(table):
    t, _ = table
    path = Path(t.url) / "manifest.json"
    d = json.loads(path.read_bytes())
    c = d["chunks"][0]
    c.pop("checksums")  # a format-1 chunk: nothing but the size to go by
    for col in c["columns"].values():
        col.pop("rowhash", None)
    c["size"] += 1 << 30
    path.write_text(json.dumps(d))
    for v in (Path(t.url) / "versions").iterdir():
        v.unlink()
    lying = gpuload.open_table(t.url)
    with pytest.raises(FormatError, match="the manifest says .* bytes, the file has"):
        lying[0].to_dict()


@pytest.mark.parametrize("name", ["abc\n", "abc\r", "a/b", "..", ".hidden", "x" * 129])
def test_table_names_must_match_whole(tmp_path, name):
    with pytest.raises(SchemaError, match="invalid table name"):
        gpuload.Client(tmp_path).ingest(name, {"x": [1]})


def test_column_names_must_match_whole(tmp_path):
    with pytest.raises(SchemaError, match="invalid column name"):
        gpuload.ingest(tmp_path / "t", {"label\n": [1, 2]})


def test_cached_remote_reads_never_store_unverified_bytes(tmp_path):
    """memory:// as a remote store: a block whose bytes were damaged in transit is refetched,
    and only verified blocks reach the on-disk cache."""
    url = f"memory://integrity-{np.random.default_rng().integers(1 << 40)}/t"
    cols = robot_columns(40)
    gpuload.ingest(url, cols)
    t = gpuload.open_table(url, cache=str(tmp_path / "cache"))
    fs = t.store.fs
    calls = []

    class Flaky:
        def __getattr__(self, k):
            return getattr(fs, k)

        def cat_file(self, path, start=None, end=None, **kw):
            data = fs.cat_file(path, start=start, end=end, **kw)
            calls.append(path)
            if "chunks/" in path and len(calls) == 2 and len(data) > 100:
                data = data[:50] + bytes([data[50] ^ 1]) + data[51:]
            return data

    t.store._fs = Flaky()
    assert t[:].to_dict()["image"] == cols["image"]
    assert t.fetcher.stats["refetches"] == 1
    again = gpuload.open_table(url, cache=str(tmp_path / "cache"))
    assert again[:].to_dict()["image"] == cols["image"]
    assert again.fetcher.stats["requests"] == 0  # all from the (verified) cache


def test_a_damaged_page_inside_a_long_sequential_read_raises(tmp_path):
    """Long sequential runs of a fixed-size column are read straight into the output buffer; a
    damaged inner page still fails the read (and nothing is returned from it)."""
    rng = np.random.default_rng(0)
    arrays = rng.standard_normal((40, 4096)).astype(np.float32)  # 16 KiB rows, read row by row
    t = gpuload.ingest(tmp_path / "t", {"a": arrays})
    c = t.manifest.chunks[0]
    _flip(Path(t.store.path(c.file)), c.data["a"].offset + 20 * 16384 + 7)  # an inner page
    fresh = gpuload.open_table(t.url)
    with pytest.raises(IntegrityError, match=r"page \d+ does not match"):
        fresh.read(np.arange(40), ["a"])
    np.testing.assert_array_equal(fresh.read(np.arange(0, 10), ["a"])["a"], arrays[:10])


def test_rows_of_variable_columns_are_checked_one_by_one(tmp_path):
    """Shuffled single rows of an image/bytes column are read exactly (no page widening) and
    checked against their own hash; a damaged row is refetched, then an IntegrityError naming
    the table, chunk, row, column and byte range."""
    rng = np.random.default_rng(2)
    blobs = [rng.bytes(int(n)) for n in rng.integers(1000, 30000, 50)]
    t = gpuload.ingest(tmp_path / "t", {"blob": blobs}, schema={"blob": "bytes"})
    c = t.manifest.chunks[0]
    assert set(c.rowhash) == {"blob"} and c.rowhash["blob"].length == 8 * c.rows
    offs = t.chunk_offsets(0, t.schema["blob"])
    _flip(Path(t.store.path(c.file)), c.data["blob"].offset + int(offs[17]) + 5)
    fresh = gpuload.open_table(t.url)
    assert fresh.read([0], ["blob"])["blob"] == blobs[:1]  # offsets and row hashes now cached
    before = fresh.fetcher.stats["bytes"]
    got = fresh.read([3, 40, 16, 18], ["blob"])["blob"]
    assert got == [blobs[3], blobs[40], blobs[16], blobs[18]]
    assert fresh.fetcher.stats["bytes"] - before == sum(len(blobs[i]) for i in (3, 40, 16, 18))
    with pytest.raises(IntegrityError, match=r"row 17, column 'blob', bytes \["):
        fresh.read([5, 17], ["blob"])
    assert fresh.fetcher.stats["refetches"] == 1  # the damaged row was fetched once more


def test_verify_checks_even_when_local_verification_is_off(tmp_path):
    t = gpuload.ingest(tmp_path / "t", robot_columns(20))
    c = t.manifest.chunks[0]
    _flip(Path(t.store.path(c.file)), c.data["image"].offset + 3)
    loose = gpuload.open_table(t.url, fetch=FetchOptions(verify_local=False))
    assert not loose.verify()["ok"]


def test_s3_endpoint_that_ignores_conditions_falls_back_to_single_writer(caplog):
    """An S3-compatible server that ignores If-None-Match would let two writers both 'create'
    one version: gpuload probes once and commits in single-writer mode instead."""
    from fsspec.implementations.memory import MemoryFileSystem

    from gpuload.storage import Store

    class IgnoresConditions(MemoryFileSystem):
        def pipe_file(self, path, value, mode="overwrite", **kw):
            super().pipe_file(path, value, **kw)  # mode="create" ignored, as such servers do

    store = Store("s3://bucket/t")
    store._fs, store._pid = IgnoresConditions(), __import__("os").getpid()
    with caplog.at_level("WARNING", logger="gpuload.storage"):
        assert store.create_exclusive("versions/v000000000001.json", b"one")
        assert not store.create_exclusive("versions/v000000000001.json", b"two")
    assert "does not honour conditional writes" in caplog.text
    assert store._conditional is False


@pytest.mark.timeout(60)
def test_jobs_started_on_a_fetch_thread_never_wait_behind_the_pool(tmp_path):
    """A verified group runs on the fetch pool and may itself need several block downloads:
    those run on the same thread instead of queueing behind jobs that wait on them (with one
    pool thread that queueing would deadlock at once)."""
    from gpuload.fetch import Fetcher
    from gpuload.storage import Store

    f = Fetcher(Store(str(tmp_path)), "t", FetchOptions(max_in_flight=1))
    done = []

    def outer(name):
        f._run_all([lambda: done.append(f"{name}.1"), lambda: done.append(f"{name}.2")])

    f._run_all([lambda: outer("a"), lambda: outer("b")])
    assert sorted(done) == ["a.1", "a.2", "b.1", "b.2"]
