"""A two-node Ray cluster on one machine (a head and one worker node, one CPU each): write
tasks on both nodes stage chunks, the driver commits one version, and Ray reads it back."""

from __future__ import annotations

import numpy as np
import pytest

import gpuload
import gpuload.ray

from .helpers import check_rows, dataset, stop_local

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    stop_local()  # the other modules' local Ray, if one runs: the driver joins this cluster
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        cluster.wait_for_nodes(timeout=120)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield ray
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_round_trip_on_two_nodes(two_nodes, tmp_path):
    ray = two_nodes
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    sink = gpuload.ray.TableSink(tmp_path / "t", chunk_bytes=32 << 10)
    dataset(0, 4000, blocks=8).write_datasink(sink)
    assert len(sink.task_rows) >= 4
    t = gpuload.open_table(tmp_path / "t")
    assert t.version == 1
    check_rows(t, range(4000))
    ids = gpuload.ray.read_table(t, columns=["id"]).to_pandas()["id"].to_numpy()
    assert np.array_equal(np.sort(ids), np.arange(4000))
