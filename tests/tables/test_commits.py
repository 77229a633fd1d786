"""Commits are atomic and serialisable: concurrent writers never lose rows, losers of a race
either rebase (appends) or raise CommitConflictError, and snapshots live until vacuumed."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import threading

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

import gpuload
from gpuload.errors import CommitConflictError, FetchError, TableExistsError
from gpuload.format import MANIFEST, version_path
from gpuload.schema import Schema
from gpuload.storage import Store
from gpuload.testing.writers import concurrent_append_trials
from gpuload.vacuum import vacuum_store
from gpuload.versions import read_manifest
from gpuload.writer import TableWriter

pytestmark = pytest.mark.timeout(300)

SCHEMA = Schema.from_spec({"id": "int64", "payload": "bytes"})


def _cols(ids):
    return {"id": np.asarray(ids, np.int64), "payload": [b"x" * (int(i) % 50) for i in ids]}


def _ids(t) -> list[int]:
    return np.asarray(t[:]["id"]).tolist() if len(t) else []


def _writer(store, mode, ids, schema=SCHEMA):
    w = TableWriter(store, schema, mode, chunk_bytes=1 << 12, label="t")
    cols = _cols(ids) if schema is SCHEMA else {"id": np.asarray(ids, np.int64)}
    w.write(cols, len(ids))
    return w


def _check_trials(r):
    assert r.errors == 0, r
    assert r.lost_commits == 0 and r.extra_rows == 0 and r.version_mismatches == 0, r
    assert r.commits_ok + r.conflicts == r.trials * r.writers
    assert r.conflicts == 0, "appends rebase on a lost race, they never conflict"
    assert r.rows_found == r.rows_committed


def test_concurrent_appending_processes_lose_nothing(tmp_path):
    """4 real processes append to one table at the same instant, 6 times over, with the data
    source pausing mid-write so commits overlap (it lost rows in 7 of 10 trials before)."""
    _check_trials(concurrent_append_trials(str(tmp_path), writers=4, trials=6, slow=0.05, seed=1))


@pytest.mark.s3
def test_concurrent_appending_processes_on_s3(s3):
    """The same on S3 (moto on 127.0.0.1): a version is a conditional PUT (If-None-Match: *)."""
    base = s3.url(f"commits-{np.random.default_rng().integers(1 << 40)}")
    _check_trials(
        concurrent_append_trials(base, s3.storage_options, writers=3, trials=3, slow=0.05, seed=2)
    )


def test_concurrent_appends_on_memory_store_from_threads():
    """memory:// lives in one process: a process-wide lock makes its create atomic."""
    url = f"memory://commits-{np.random.default_rng().integers(1 << 40)}/t"
    barrier = threading.Barrier(4)
    errors = []

    def append(w):
        try:
            barrier.wait(timeout=30)
            gpuload.ingest(url, _cols(range(w * 100, w * 100 + 20)), mode="append")
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=append, args=(w,)) for w in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors
    t = gpuload.open_table(url)
    assert sorted(_ids(t)) == sorted(i for w in range(4) for i in range(w * 100, w * 100 + 20))
    assert t.version == 4


def test_create_race_has_one_winner(tmp_path):
    store = Store(str(tmp_path / "t"))
    a, b = _writer(store, "create", [1, 2]), _writer(store, "create", [3])
    a.commit()
    with pytest.raises(CommitConflictError, match="changed while writing"):
        b.commit()
    assert _ids(gpuload.open_table(tmp_path / "t")) == [1, 2]
    with pytest.raises(TableExistsError):
        _writer(store, "create", [4])


def test_overwrite_that_loses_the_race_raises(tmp_path):
    gpuload.ingest(tmp_path / "t", _cols([1, 2, 3]))
    store = Store(str(tmp_path / "t"))
    over = _writer(store, "overwrite", [10])
    app = _writer(store, "append", [4])
    app.commit()
    with pytest.raises(CommitConflictError, match="overwrite started from version 1"):
        over.commit()
    assert sorted(_ids(gpuload.open_table(tmp_path / "t"))) == [1, 2, 3, 4]


def test_append_rebases_onto_an_overwrite_with_the_same_columns(tmp_path):
    gpuload.ingest(tmp_path / "t", _cols([1, 2, 3]))
    store = Store(str(tmp_path / "t"))
    app = _writer(store, "append", [4])
    _writer(store, "overwrite", [10, 11]).commit()
    m = app.commit()
    assert m.version == 3
    assert sorted(_ids(gpuload.open_table(tmp_path / "t"))) == [4, 10, 11]


def test_append_after_a_schema_change_conflicts(tmp_path):
    gpuload.ingest(tmp_path / "t", _cols([1, 2, 3]))
    store = Store(str(tmp_path / "t"))
    app = _writer(store, "append", [4])
    _writer(store, "overwrite", [7], Schema.from_spec({"id": "int64"})).commit()
    with pytest.raises(CommitConflictError, match="columns changed"):
        app.commit()
    t = gpuload.open_table(tmp_path / "t")
    assert t.columns == ["id"] and _ids(t) == [7]
    assert not any(
        f.startswith(c.file.split("/")[1])
        for c in app._new_chunks
        for f in (tmp_path / "t" / "chunks").iterdir()
    ), "the loser's chunks were removed"


def test_commit_whose_pointer_update_was_lost_is_still_visible(tmp_path, monkeypatch):
    """A writer killed between publishing versions/vN.json and rewriting manifest.json: readers
    and the next writer move forward from the stale pointer."""
    gpuload.ingest(tmp_path / "t", _cols([1]))
    real = Store.write_atomic

    def lost_pointer(self, rel, data):
        if rel == MANIFEST:
            raise OSError("killed before the pointer update")
        return real(self, rel, data)

    monkeypatch.setattr(Store, "write_atomic", lost_pointer)
    gpuload.ingest(tmp_path / "t", _cols([2]), mode="append")
    monkeypatch.setattr(Store, "write_atomic", real)
    assert b'"version":1,' in (tmp_path / "t" / MANIFEST).read_bytes()  # the stale pointer
    t = gpuload.open_table(tmp_path / "t")
    assert t.version == 2 and _ids(t) == [1, 2]
    gpuload.ingest(tmp_path / "t", _cols([3]), mode="append")
    t = gpuload.open_table(tmp_path / "t")
    assert t.version == 3 and _ids(t) == [1, 2, 3]


def test_first_commit_without_a_pointer_is_found(tmp_path):
    gpuload.ingest(tmp_path / "t", _cols([5, 6]))
    (tmp_path / "t" / MANIFEST).unlink()
    assert gpuload.Client(tmp_path).exists("t")
    assert _ids(gpuload.open_table(tmp_path / "t")) == [5, 6]


def test_versions_are_never_replaced(tmp_path):
    store = Store(str(tmp_path / "t"))
    assert store.create_exclusive(version_path(1), b"one")
    assert not store.create_exclusive(version_path(1), b"two")
    assert (tmp_path / "t" / version_path(1)).read_bytes() == b"one"
    assert not [p for p in (tmp_path / "t" / "versions").iterdir() if ".tmp-" in p.name]


def test_retried_conditional_put_that_landed_counts_as_won():
    """A PUT whose answer was lost is retried; finding its own bytes there is a win."""
    url = f"memory://commits-{np.random.default_rng().integers(1 << 40)}/t"
    store = Store(url)
    fs = store.fs
    calls = []

    class LostAnswer:
        def __getattr__(self, k):
            return getattr(fs, k)

        def pipe_file(self, path, data, **kw):
            fs.pipe_file(path, data, **kw)
            calls.append(path)
            if len(calls) == 1:
                raise ConnectionResetError("answer lost")

    store._fs = LostAnswer()
    assert store.create_exclusive("versions/v000000000001.json", b"mine")
    assert not store.create_exclusive("versions/v000000000001.json", b"theirs")


class _PlainMemory(MemoryFileSystem):
    """A store with no atomic create (gpuload falls back to single-writer mode)."""

    protocol = ("plainmem",)
    store: dict = {}
    pseudo_dirs = [""]
    clobber = False

    def pipe_file(self, path, value, mode="overwrite", **kw):
        if self.clobber and "/versions/" in path:
            super().pipe_file(path, b'{"someone": "else"}', **kw)
            return
        super().pipe_file(path, value, **kw)


def test_store_without_atomic_create_runs_single_writer(monkeypatch):
    fsspec.register_implementation("plainmem", _PlainMemory, clobber=True)
    url = f"plainmem://t{np.random.default_rng().integers(1 << 40)}"
    store = Store(url)
    assert not store.atomic_create
    gpuload.ingest(url, _cols([1, 2]))
    gpuload.ingest(url, _cols([3]), mode="append")
    assert _ids(gpuload.open_table(url)) == [1, 2, 3]
    # another process overwriting the version file is detected, not reported as success
    monkeypatch.setattr(_PlainMemory, "clobber", True)
    with pytest.raises(CommitConflictError, match="one writing process at a time"):
        gpuload.ingest(url, _cols([4]), mode="append")


def test_reader_keeps_its_snapshot_across_an_overwrite_until_vacuum(tmp_path):
    """An overwrite no longer deletes the replaced chunks: a reader that opened the old version
    (here and in another process) finishes its epoch with the old data; vacuum removes them
    only once the grace period has passed since the overwrite."""
    c = gpuload.Client(tmp_path)
    c.ingest("t", _cols(range(300)), chunk_bytes=1 << 12)
    old = c.open_table("t")
    it = iter(old.batches(50, columns=["id"]))
    first = next(it)["id"].tolist()
    c.ingest("t", _cols([7, 8]), mode="overwrite")
    rest = [i for b in it for i in b["id"].tolist()]
    assert first + rest == list(range(50)) + list(range(50, 300))
    assert _ids(c.open_table("t")) == [7, 8]

    child = textwrap.dedent(
        """
        import pickle, sys, numpy as np
        t = pickle.loads(sys.stdin.buffer.read())
        print(int(np.asarray(t[:]["id"]).sum()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", child],
        input=pickle.dumps(old),
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert int(out.stdout) == sum(range(300))

    store = Store(str(tmp_path / "t"))
    r = vacuum_store(store, "t", older_than=3600)
    assert r.removed == ()
    later = read_manifest(store).updated + 3601
    r = vacuum_store(store, "t", older_than=3600, now=later)
    assert len(r.removed) == old.num_chunks
    assert _ids(c.open_table("t")) == [7, 8]
    stale = pickle.loads(pickle.dumps(old))  # no descriptors still open on removed files
    with pytest.raises(FetchError, match="table 't', chunk chunks/"):
        stale[0]["payload"]


def test_a_commit_whose_answer_was_lost_keeps_its_rows(tmp_path, monkeypatch):
    """The version file was created but the call raised (an S3 PUT answered too late): the
    writer looks, finds its own version, and reports success; nothing is deleted."""
    gpuload.ingest(tmp_path / "t", _cols([1]))
    real = Store.create_exclusive

    def landed_then_failed(self, rel, data):
        real(self, rel, data)
        raise OSError("connection reset after the request was sent")

    monkeypatch.setattr(Store, "create_exclusive", landed_then_failed)
    t = gpuload.ingest(tmp_path / "t", _cols([2, 3]), mode="append")
    monkeypatch.setattr(Store, "create_exclusive", real)
    assert t.version == 2 and _ids(gpuload.open_table(tmp_path / "t")) == [1, 2, 3]


def test_interrupt_after_the_commit_point_deletes_nothing(tmp_path, monkeypatch):
    """Ctrl-C while the pointer is rewritten: the version is committed, so the writer's clean-up
    must not remove its chunks."""
    gpuload.ingest(tmp_path / "t", _cols([1]))
    real = Store.write_atomic

    def interrupted(self, rel, data):
        if rel == MANIFEST:
            raise KeyboardInterrupt
        return real(self, rel, data)

    monkeypatch.setattr(Store, "write_atomic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gpuload.ingest(tmp_path / "t", _cols([2]), mode="append")
    monkeypatch.setattr(Store, "write_atomic", real)
    t = gpuload.open_table(tmp_path / "t")
    assert t.version == 2 and _ids(t) == [1, 2]  # every chunk it names is still there


def test_a_create_that_did_not_land_removes_its_chunks(tmp_path, monkeypatch):
    gpuload.ingest(tmp_path / "t", _cols([1]))
    before = set((tmp_path / "t" / "chunks").iterdir())

    def failed(self, rel, data):
        raise OSError("disk full")

    monkeypatch.setattr(Store, "create_exclusive", failed)
    with pytest.raises(OSError, match="disk full"):
        gpuload.ingest(tmp_path / "t", _cols([2]), mode="append")
    assert set((tmp_path / "t" / "chunks").iterdir()) == before
