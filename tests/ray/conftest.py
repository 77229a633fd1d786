"""The Ray tests' local cluster: one ``ray.init`` per module (2 CPUs, no dashboard)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray of 2 CPUs for this module's tests, shut down after them."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
