"""Format 4 through Ray: the sink's commit writes one segment per write (a create past the
threshold, then an append), and the source's read tasks (which pickle the table) read every
row of a format-4 table once."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gpuload.index import ENV_THRESHOLD

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def _items(lo: int, hi: int) -> list[dict]:
    return [{"id": i, "x": np.full(14, i, np.float32), "s": f"row {i}"} for i in range(lo, hi)]


def test_sink_appends_one_segment_and_source_reads_every_row(ray_local, tmp_path, monkeypatch):
    import ray.data

    import gpuload.ray

    monkeypatch.setenv(ENV_THRESHOLD, "4")  # the driver commits: its environment decides
    path = tmp_path / "t"
    ds = ray.data.from_items(_items(0, 2000), override_num_blocks=4)
    t = gpuload.ray.write_table(ds, path, chunk_bytes=8 << 10)
    root = json.loads((path / "manifest.json").read_text())
    assert root["format_version"] == 4 and len(root["segments"]) == 1 and t.num_chunks > 4
    first = set(os.listdir(path / "index"))
    more = ray.data.from_items(_items(2000, 2600), override_num_blocks=3)
    t2 = gpuload.ray.write_table(more, path, mode="append", chunk_bytes=8 << 10)
    root = json.loads((path / "manifest.json").read_text())
    assert len(root["segments"]) == 2 and first < set(os.listdir(path / "index"))
    assert len(os.listdir(path / "index")) == 2 and t2.version == 2
    got = gpuload.ray.read_table(path).to_pandas()
    assert sorted(got["id"].tolist()) == list(range(2600))
    assert all(np.all(x == i) for x, i in zip(got["x"], got["id"]))
    assert gpuload.open_table(path)[:]["s"] == [f"row {i}" for i in range(2600)]
