"""A script that stops iterating a loader early and exits must exit cleanly: loader threads
killed inside native code at interpreter exit used to abort the process ("terminate called
without an active exception", exit status 134) in about half of such runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import sys, gpuload
t = gpuload.open_table(sys.argv[1])
it = iter(t.batches(16, shuffle=True, seed=0, columns=["state", "label"], prefetch=8))
for _ in range(3):
    next(it)
print("done")
"""  # exits with the loader's threads still prefetching


@pytest.mark.timeout(300)
def test_exiting_mid_epoch_never_aborts(robot_table):
    t, _ = robot_table(2000, seed=4)
    for attempt in range(6):
        r = subprocess.run(
            [sys.executable, "-c", SCRIPT, t.url], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0 and r.stdout.strip() == "done", (
            attempt,
            r.returncode,
            r.stderr[-2000:],
        )
        assert "terminate called" not in r.stderr
