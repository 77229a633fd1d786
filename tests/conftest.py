"""Shared fixtures. GPU-only tests carry @pytest.mark.gpu and are reported as skipped (not run)
with a reason wherever no CUDA GPU exists; they never pass silently."""

from __future__ import annotations

import pytest

from gpuload.device import cuda_available


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip_gpu = pytest.mark.skip(
        reason="NOT RUN: needs a CUDA GPU and none is present on this machine"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    gpu = [r for r in skipped if "needs a CUDA GPU" in str(r.longrepr)]
    if gpu:
        terminalreporter.write_sep("=", f"{len(gpu)} GPU-only tests NOT RUN (no CUDA GPU here)")
        for r in gpu:
            terminalreporter.write_line(f"  not run: {r.nodeid}")


@pytest.fixture(scope="session")
def s3():
    """A real S3 endpoint (moto server) on 127.0.0.1, in a child process, for the whole session."""
    pytest.importorskip("s3fs", reason="the s3 extra is part of the test environment")
    from gpuload.bench.servers import LoopbackS3

    server = LoopbackS3()
    yield server
    server.close()
