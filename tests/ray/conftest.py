"""The Ray tests' local cluster (2 CPUs, no dashboard): started by the first test that needs it
and shared by every later one in this folder (test_read.py and test_write.py), shut down after
the folder's last test. A test that needs another cluster (test_cluster.py's two nodes) stops
it first (``helpers.stop_local``); the next test that needs it starts it again."""

from __future__ import annotations

import pytest

from .helpers import start_local, stop_local


@pytest.fixture(scope="package")
def _ray_package():
    """Shuts the shared local Ray down after this folder's last test."""
    yield
    stop_local()


@pytest.fixture
def ray_local(_ray_package):
    """The local Ray of 2 CPUs, started here if it is not running."""
    return start_local()
