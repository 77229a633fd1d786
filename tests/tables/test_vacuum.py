"""Vacuum: files no commit names (left by killed writers) go; nothing committed is touched."""

import os
import time
import uuid

import numpy as np
import pytest

import gpuload
from gpuload.cli import main as cli_main
from gpuload.errors import CommitConflictError, TableNotFoundError
from gpuload.storage import Store
from gpuload.vacuum import vacuum_store

from ..helpers import kill_writer_midway, robot_columns


def _same(t, cols):
    d = t[:].to_dict()
    assert d["image"] == list(cols["image"])
    np.testing.assert_array_equal(d["state"], np.asarray(cols["state"]))
    np.testing.assert_array_equal(d["label"], np.asarray(cols["label"]))


def _age(paths, seconds):
    for p in paths:
        st = os.stat(p)
        os.utime(p, (st.st_atime - seconds, st.st_mtime - seconds))


def test_vacuum_removes_a_killed_writers_chunks_only(tmp_path):
    root = tmp_path / "root"
    c = gpuload.Client(root)
    cols = robot_columns(40)
    c.ingest("t", cols, chunk_bytes=16 << 10)
    c.ingest("t", {k: v[:5] for k, v in cols.items()}, mode="append", chunk_bytes=16 << 10)
    full = {
        k: np.concatenate([v, v[:5]]) if isinstance(v, np.ndarray) else list(v) + list(v[:5])
        for k, v in cols.items()
    }
    kill_writer_midway(root, "t", cols["image"][0])
    chunk_dir = root / "t" / "chunks"
    t = c.open_table("t")
    named = {os.path.basename(ch.file) for ch in t.manifest.chunks}
    orphans = set(os.listdir(chunk_dir)) - named
    assert orphans and named <= set(os.listdir(chunk_dir))
    # a leftover temporary manifest of a writer killed inside its atomic publish
    tmp_manifest = root / "t" / f"manifest.json.tmp-{uuid.uuid4().hex}"
    tmp_manifest.write_bytes(b"{")

    # the default grace period (24 h) keeps them: they might belong to a running ingest
    r = c.vacuum("t")
    assert r.removed == () and set(r.recent) == {f"chunks/{o}" for o in orphans} | {
        tmp_manifest.name
    }
    # once old enough they go, the dry run first
    _age([chunk_dir / o for o in orphans] + [tmp_manifest], 2 * 86400)
    _age([chunk_dir / n for n in named], 5 * 86400)  # named chunks stay whatever their age
    dry = c.vacuum("t", dry_run=True)
    assert set(dry.removed) == {f"chunks/{o}" for o in orphans} | {tmp_manifest.name}
    assert dry.bytes_removed > 0 and set(os.listdir(chunk_dir)) == named | orphans
    r = c.vacuum("t")
    assert set(r.removed) == set(dry.removed) and r.bytes_removed == dry.bytes_removed
    assert set(os.listdir(chunk_dir)) == named and not tmp_manifest.exists()
    t = c.open_table("t")
    assert len(t) == 45 and t.version == 2
    _same(t, full)
    assert c.vacuum("t", older_than=0).removed == ()


def test_vacuum_leaves_unknown_files_and_names_missing_tables(tmp_path, caplog):
    c = gpuload.Client(tmp_path / "root")
    c.ingest("t", robot_columns(10))
    stray = tmp_path / "root" / "t" / "chunks" / "notes.txt"
    stray.write_text("mine")
    _age([stray], 10 * 86400)
    with caplog.at_level("WARNING", logger="gpuload.vacuum"):
        assert c.vacuum("t", older_than=0).removed == ()
    assert stray.exists() and "notes.txt" in caplog.text
    with pytest.raises(TableNotFoundError, match="nope"):
        c.vacuum("nope")
    with pytest.raises(ValueError, match="older_than"):
        c.vacuum("t", older_than=-1)


def test_commit_refuses_when_its_chunks_were_vacuumed(tmp_path):
    """A vacuum with too short a grace period during an ingest fails that ingest, loudly."""
    root = tmp_path / "root"
    c = gpuload.Client(root)
    cols = robot_columns(20)
    c.ingest("t", cols)
    store = Store(str(root / "t"))
    more = robot_columns(8, seed=3)
    vacuumed = []

    def rows():
        for i in range(3000):
            if i == 2500:  # chunks of this ingest are on disk, unnamed yet: vacuum them
                vacuumed.extend(vacuum_store(store, "t", older_than=0).removed)
            yield {k: v[i % 8] for k, v in more.items()}

    with pytest.raises(CommitConflictError, match="disappeared"):
        c.ingest("t", rows(), mode="append", chunk_bytes=64 << 10)
    assert vacuumed
    t = c.open_table("t")
    assert len(t) == 20 and t.version == 1
    _same(t, cols)


def test_cli_vacuum(tmp_path, capsys):
    root = tmp_path / "root"
    c = gpuload.Client(root)
    c.ingest("t", robot_columns(10))
    orphan = root / "t" / "chunks" / f"{uuid.uuid4().hex}.chunk"
    orphan.write_bytes(b"x" * 100)
    _age([orphan], 3 * 3600)
    assert (
        cli_main(["--root", str(root), "vacuum", "t", "--older-than-hours", "2", "--dry-run"]) == 0
    )
    assert "would remove 1" in capsys.readouterr().out and orphan.exists()
    assert cli_main(["vacuum", str(root / "t"), "--older-than-hours", "4"]) == 0
    assert orphan.exists()
    assert cli_main(["--root", str(root), "vacuum", "t", "--older-than-hours", "2"]) == 0
    assert "removed 1" in capsys.readouterr().out and not orphan.exists()
    assert len(c.open_table("t")) == 10
    with pytest.raises(SystemExit):  # argparse's usage error, not a traceback
        cli_main(["--root", str(root), "vacuum", "t", "--older-than-hours", "-1"])
    assert "hours >= 0" in capsys.readouterr().err


@pytest.mark.s3
def test_vacuum_on_s3(s3):
    """Object stores give modification times too (S3 LastModified)."""
    url = s3.url(f"v-{uuid.uuid4().hex[:8]}")
    cols = robot_columns(30)
    t = gpuload.ingest(
        url, cols, chunk_bytes=16 << 10, storage_options=s3.storage_options, cache=False
    )
    store = Store(url, s3.storage_options)
    orphan = f"chunks/{uuid.uuid4().hex}.chunk"
    store.write_new(orphan, [b"y" * 64])
    r = vacuum_store(store, "v", older_than=3600)
    assert r.removed == () and r.recent == (orphan,)
    r = vacuum_store(store, "v", older_than=3600, now=time.time() + 7200)
    assert r.removed == (orphan,) and r.bytes_removed == 64
    assert not store.exists(orphan)
    t = gpuload.open_table(url, storage_options=s3.storage_options, cache=False)
    assert len(t) == 30 and t[7]["image"] == cols["image"][7]
