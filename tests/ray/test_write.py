"""Writing a Ray Dataset: one version per write, every row once and in order, failures and
retries leave no rows twice and nothing half-published, concurrent writers are serialised."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

import gpuload
import gpuload.ray
from gpuload.adapters import ray as ray_adapter
from gpuload.errors import CommitConflictError, SchemaError, TableExistsError

from .helpers import check_rows, chunk_files, columns, dataset, named_chunks

pytestmark = pytest.mark.timeout(240)

ROWS = 20_000  # tiny JPEGs: 8 write tasks of several 256 KB chunks each (~55 in all)


def test_round_trip_one_version_rows_in_order(ray_local, tmp_path):
    ds = dataset(0, ROWS, blocks=8)
    sink = gpuload.ray.TableSink(tmp_path / "a", chunk_bytes=256 << 10)
    ds.write_datasink(sink)
    assert len(sink.task_rows) >= 4, sink.task_rows
    assert sum(sink.task_rows.values()) == ROWS
    t = gpuload.open_table(tmp_path / "a")
    assert t.version == 1 and len(t) == ROWS
    assert t.num_chunks >= 2 * len(sink.task_rows), "tasks write several chunks each"
    assert t.schema.describe() == (
        "id: int64, image: image/jpeg, state: float32[14], label: int64, text: text"
    )
    check_rows(t, range(ROWS))
    seen = np.concatenate([b["id"] for b in t.batches(4096, columns=["id", "image"])])
    assert np.array_equal(seen, np.arange(ROWS))
    # the same dataset written again: an identical table
    t2 = gpuload.ray.write_table(ds, tmp_path / "b", chunk_bytes=256 << 10)
    assert t2.version == 1 and t2.chunk_rows == t.chunk_rows
    a, b = t[:].to_dict(), t2[:].to_dict()
    assert a["image"] == b["image"] and a["text"] == b["text"]
    assert np.array_equal(a["state"], b["state"]) and np.array_equal(a["id"], b["id"])
    assert chunk_files(tmp_path / "a") == {c.file for c in t.manifest.chunks}


def test_numpy_rows_and_ragged_columns(ray_local, tmp_path):
    """Rows of numpy arrays (Ray's tensor extension types) take ingest's column kinds:
    fixed arrays, and ragged arrays whose first dimension varies."""
    import ray.data

    items = [
        {"state": np.full(14, i, np.float32), "traj": np.full((i % 4, 2), i, np.float32), "n": i}
        for i in range(40)
    ]
    t = gpuload.ray.write_table(ray.data.from_items(items, override_num_blocks=4), tmp_path / "r")
    assert t.schema.describe() == "state: float32[14], traj: float32[*,2], n: int64"
    got = t[:].to_dict()
    assert np.array_equal(got["n"], np.arange(40))
    assert all(
        np.array_equal(r, np.full((i % 4, 2), i, np.float32)) for i, r in enumerate(got["traj"])
    )


def test_client_and_ingest_dispatch_a_ray_dataset(ray_local, tmp_path):
    client = gpuload.Client(tmp_path / "root")
    t = client.ingest("rt", dataset(0, 300, blocks=3))
    assert t.version == 1
    check_rows(t, range(300))
    t = client.ingest("rt", dataset(300, 500, blocks=2), mode="append")
    assert t.version == 2
    check_rows(client.open_table("rt"), range(500))
    t = gpuload.ingest(tmp_path / "u", dataset(0, 100, blocks=2))
    check_rows(t, range(100))


def test_importing_gpuload_does_not_import_ray():
    code = "import sys, gpuload, gpuload.ray; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def _fail_on_third_block(batch):
    if int(batch["id"][0]) == 2100:  # the third of 8 blocks of 1000 rows (from row 100)
        raise RuntimeError("the third block is broken")
    return batch


def test_failed_job_leaves_the_table_unchanged(ray_local, tmp_path):
    base = gpuload.ingest(tmp_path / "t", columns(0, 100))
    before = (base.version, base[:]["id"].tolist())
    ds = dataset(100, 8100, blocks=8).map_batches(_fail_on_third_block, batch_size=None)
    with pytest.raises(Exception, match="the third block is broken"):
        gpuload.ray.write_table(ds, tmp_path / "t", mode="append", chunk_bytes=16 << 10)
    t = gpuload.open_table(tmp_path / "t")
    assert (t.version, t[:]["id"].tolist()) == before
    gpuload.Client(tmp_path).vacuum("t", older_than=0)
    assert chunk_files(tmp_path / "t") == named_chunks(tmp_path / "t")


class FlakySink(gpuload.ray.TableSink):
    """Task 1's first attempt dies on its third block, after staging chunks; the marker file
    says it happened (and how many chunk files the table had then)."""

    def __init__(self, *args, marker: str, how: str, **kw):
        super().__init__(*args, **kw)
        self.marker, self.how = marker, how

    @property
    def min_rows_per_write(self):
        return 2000  # several blocks per task

    def write(self, blocks, ctx):
        def gen():
            for i, block in enumerate(blocks):
                if ctx.task_idx == 1 and i == 2 and not os.path.exists(self.marker):
                    staged = len(os.listdir(os.path.join(self.url, "chunks")))
                    with open(self.marker, "w") as f:
                        f.write(str(staged))
                    if self.how == "exit":
                        os._exit(1)  # the worker dies: a system failure Ray retries
                    raise RuntimeError("first attempt fails")
                yield block

        return super().write(gen(), ctx)


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_retried_task_writes_its_rows_once(ray_local, tmp_path, how):
    marker = str(tmp_path / "failed-once")
    ds = dataset(0, 8000, blocks=16)
    # 32 KB chunks: the two blocks (1000 rows, ~750 KB) before the failure stage ~20 of them
    sink = FlakySink(tmp_path / "t", marker=marker, how=how, chunk_bytes=32 << 10)
    ds.write_datasink(sink, ray_remote_args={"max_retries": 3, "retry_exceptions": True})
    assert os.path.exists(marker), "the first attempt of task 1 did fail"
    with open(marker) as f:
        assert int(f.read()) > 0, "the table held staged chunks when it failed"
    t = gpuload.open_table(tmp_path / "t")
    assert t.version == 1
    check_rows(t, range(8000))
    # the dead attempt's chunks (there were some) are gone: only committed chunks remain
    assert chunk_files(tmp_path / "t") == {c.file for c in t.manifest.chunks}


def _commit_between(monkeypatch, action):
    """Run ``action`` on the driver after every write task finished, just before the Ray
    write commits (between on_write_start and the commit)."""
    real = ray_adapter.TableSink.on_write_complete

    def wrapped(self, result):
        action()
        return real(self, result)

    monkeypatch.setattr(ray_adapter.TableSink, "on_write_complete", wrapped)


def test_concurrent_append_rebases(ray_local, tmp_path, monkeypatch):
    client = gpuload.Client(tmp_path)
    client.ingest("t", columns(0, 100))
    _commit_between(monkeypatch, lambda: client.ingest("t", columns(100, 200), mode="append"))
    t = client.ingest("t", dataset(200, 1200, blocks=4), mode="append")
    assert t.version == 3
    check_rows(client.open_table("t"), range(1200))  # base, the other append, then Ray's


def test_overwrite_that_loses_the_race_raises(ray_local, tmp_path, monkeypatch):
    client = gpuload.Client(tmp_path)
    client.ingest("t", columns(0, 100))
    _commit_between(monkeypatch, lambda: client.ingest("t", columns(100, 200), mode="append"))
    with pytest.raises(CommitConflictError, match="overwrite started from version 1"):
        gpuload.ray.write_table(dataset(500, 900, blocks=4), "t", "overwrite", root=tmp_path)
    t = client.open_table("t")
    assert t.version == 2
    check_rows(t, range(200))
    assert chunk_files(tmp_path / "t") == {c.file for c in t.manifest.chunks}


def test_create_races(ray_local, tmp_path, monkeypatch):
    client = gpuload.Client(tmp_path)
    client.ingest("t", columns(0, 10))
    with pytest.raises(TableExistsError):
        gpuload.ray.write_table(dataset(0, 10, blocks=1), "t", root=tmp_path)
    _commit_between(monkeypatch, lambda: client.ingest("u", columns(0, 10)))
    with pytest.raises(CommitConflictError, match="create started from version 0"):
        gpuload.ray.write_table(dataset(50, 90, blocks=2), "u", root=tmp_path)
    check_rows(client.open_table("u"), range(10))


def test_bad_input_is_one_clear_error_and_commits_nothing(ray_local, tmp_path):
    import ray.data

    good = pa.table({"x": pa.array(["a"] * 5), "y": pa.array(np.arange(5))})
    bad = pa.table({"x": pa.array(["a", "b", None, "c"]), "y": pa.array(np.arange(4))})
    ds = ray.data.from_arrow([good, bad])
    with pytest.raises(SchemaError, match=r"row 2, column 'x': null value.*Ray write task"):
        gpuload.ray.write_table(ds, tmp_path / "bad")
    assert not os.path.exists(tmp_path / "bad" / "versions")
    assert chunk_files(tmp_path / "bad") == set()
    mixed = ray.data.from_arrow([good, pa.table({"x": pa.array([1, 2]), "y": pa.array([1, 2])})])
    with pytest.raises(SchemaError, match="task 0 inferred .* but task 1 inferred"):
        gpuload.ray.write_table(mixed, tmp_path / "mixed")
    with pytest.raises(SchemaError, match=r"table 'typed', row 0, column 'x': expected str"):
        gpuload.ray.write_table(mixed, tmp_path / "typed", schema={"x": "text", "y": "int64"})
    assert chunk_files(tmp_path / "typed") == set()


@pytest.mark.s3
def test_round_trip_through_s3(ray_local, s3):
    url = s3.url(f"ray-{np.random.default_rng().integers(1 << 40)}/t")
    t = gpuload.ray.write_table(
        dataset(0, 2000, blocks=4), url, storage_options=s3.storage_options, chunk_bytes=64 << 10
    )
    assert t.version == 1
    check_rows(gpuload.open_table(url, storage_options=s3.storage_options), range(2000))
    ds = gpuload.ray.read_table(url, storage_options=s3.storage_options)
    assert ds.count() == 2000
    ids = np.concatenate([b["id"] for b in ds.iter_batches(batch_format="numpy")])
    assert sorted(ids.tolist()) == list(range(2000))
