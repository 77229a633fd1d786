"""Reading a table as a Ray Dataset: read tasks over contiguous chunk ranges that cover the
table once, Arrow types Ray's numpy batches understand, projection, and Ray's own ops."""

from __future__ import annotations

import numpy as np
import pytest

import gpuload
import gpuload.ray
from gpuload.adapters.ray import TableSource, chunk_ranges
from gpuload.errors import SchemaError, TableNotFoundError

from .helpers import columns

pytestmark = pytest.mark.timeout(180)

ROWS = 3000


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-read")
    cols = columns(0, ROWS)
    cols["traj"] = [np.full((i % 5, 2), i, np.float32) for i in range(ROWS)]
    return gpuload.Client(root).ingest("t", cols, chunk_bytes=64 << 10)


def test_chunk_ranges_cover_every_chunk_once_in_order():
    for sizes in ([5], [1] * 10, [100, 1, 1, 1, 100, 1], list(range(1, 30))):
        for k in (1, 2, 3, 7, 50):
            ranges = chunk_ranges(sizes, k)
            assert len(ranges) == min(k, len(sizes))
            assert ranges[0][0] == 0 and ranges[-1][1] == len(sizes)
            assert all(a < b for a, b in ranges)
            assert all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
    assert chunk_ranges([], 4) == []
    assert chunk_ranges([10, 10, 10, 10], 2) == [(0, 2), (2, 4)]


def test_read_tasks_cover_the_table_exactly_once(table):
    assert table.num_chunks >= 8
    source = TableSource(table)
    tasks = source.get_read_tasks(4)
    assert len(tasks) == 4
    assert sum(t.metadata.num_rows for t in tasks) == len(table)
    assert sum(t.metadata.size_bytes for t in tasks) == source.estimate_inmemory_data_size()
    bounds = [t.read_fn.args[2] for t in tasks]  # row boundaries of each task's chunks
    rows = np.concatenate([np.arange(b[0], b[-1]) for b in bounds])
    assert np.array_equal(rows, np.arange(len(table)))
    starts = set(np.concatenate([[0], np.cumsum(table.chunk_rows)]).tolist())
    assert all(set(b) <= starts for b in bounds), "tasks split at chunk boundaries"
    blocks = [blk for t in tasks for blk in t()]
    assert len(blocks) == table.num_chunks
    ids = np.concatenate([b.column("id").to_numpy() for b in blocks])
    assert np.array_equal(ids, np.arange(ROWS))


def test_read_table_types_projection_and_ops(ray_local, table):
    ds = gpuload.ray.read_table(table)
    assert ds.count() == ROWS
    schema = ds.schema()
    assert schema.names == ["id", "image", "state", "label", "text", "traj"]
    batch = ds.take_batch(16, batch_format="numpy")
    assert batch["state"].shape == (16, 14) and batch["state"].dtype == np.float32
    assert batch["id"].dtype == np.int64
    i = int(batch["id"][3])
    assert batch["image"][3] == table[i]["image"] and batch["text"][3] == f"instruction {i}"
    traj = np.array([np.asarray(x) for x in batch["traj"][3]], np.float32).reshape(-1, 2)
    assert np.array_equal(traj, table[i]["traj"])  # list<fixed_size_list<float, 2>>
    proj = gpuload.ray.read_table(table, columns=["id", "label"])
    assert proj.schema().names == ["id", "label"]
    assert proj.filter(lambda r: r["label"] == 3).count() == ROWS // 10
    doubled = proj.map_batches(lambda b: {"x": b["id"] * 2}, batch_format="numpy")
    assert sorted(doubled.to_pandas()["x"].tolist()) == list(range(0, 2 * ROWS, 2))
    with pytest.raises(SchemaError, match="unknown column 'nope'"):
        gpuload.ray.read_table(table, columns=["nope"])


def test_read_by_name_url_and_round_trip(ray_local, table, tmp_path):
    root = table.url.rsplit("/", 1)[0]
    by_name = gpuload.ray.read_table("t", root=root, columns=["id"])
    by_url = gpuload.ray.read_table(table.url, columns=["id"])
    assert by_name.count() == by_url.count() == ROWS
    with pytest.raises(TableNotFoundError, match="no table named 'missing'"):
        gpuload.ray.read_table("missing", root=root)
    # a table read by Ray and written back is the same table
    copy = gpuload.ray.write_table(gpuload.ray.read_table(table), tmp_path / "copy")
    assert copy.schema.describe() == table.schema.describe()
    a, b = table[:].to_dict(), copy[:].to_dict()
    for k in ("id", "label", "state"):
        assert np.array_equal(a[k], b[k])
    assert a["image"] == b["image"] and a["text"] == b["text"]
    assert all(np.array_equal(x, y) for x, y in zip(a["traj"], b["traj"]))
