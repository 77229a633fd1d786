"""benchmarks/windows_bench.py (issue 15's episode-window benchmark): the alternatives it times
build the same windows as gpuload, and its quick mode runs every case end to end on a tiny
episode table and records positive rates and the expected batch shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gpuload
from gpuload.demo import ensure_episode_table

from ..helpers import benchmark_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def wb():
    yield benchmark_script("windows_bench")
    sys.modules.pop("windows_bench", None)


@pytest.fixture(scope="module")
def episodes(tmp_path_factory):
    """A bench cache folder holding the 3-episode 48x64 table (the quick run below finds it
    there instead of generating it again)."""
    root = tmp_path_factory.mktemp("episodes")
    path, _ = ensure_episode_table(root, 3, size=(48, 64))
    return root, path


@pytest.fixture(scope="module")
def table(episodes):
    return gpuload.open_table(episodes[1])


def test_alternatives_read_gpuload_windows(wb, table):
    """Anchor, window values, camera bytes and pad masks of both alternatives equal gpuload's
    own map-style windows, at episode edges too (the comparison is apples to apples)."""
    window = {k: list(v) for k, v in wb.WINDOW.items()}
    ref = gpuload.pytorch(table, episode="episode_index", window=window, columns=list(wb.COLUMNS))
    ends = np.flatnonzero(np.diff(table[:]["episode_index"])) + 1
    anchors = sorted({0, 1, int(ends[0]) - 1, int(ends[0]), len(table) - 1})
    for alt in (wb.RowByRow(table), wb.LeRobotStyle(table)):
        for i in anchors:
            want = ref[i]
            item, values = alt.raw(i)
            assert item["frame_index"] == want["frame_index"], (type(alt).__name__, i)
            assert item["episode_index"] == want["episode_index"]
            for k in wb.WINDOW:
                np.testing.assert_array_equal(item[f"{k}_is_pad"].numpy(), want[f"{k}_is_pad"])
                if k in wb.CAMS:
                    assert [bytes(b) for b in values[k]] == [bytes(b) for b in want[k]]
                else:
                    np.testing.assert_array_equal(np.stack(values[k]), want[k])
        batch = alt[anchors[-1]]
        assert tuple(batch["cam_high"].shape) == (2, 3, 224, 224)
        assert batch["cam_high"].dtype.is_floating_point


QUICK_BATCH = 8  # the workload's batch is 64; a smoke run's rates need no more than this


@pytest.mark.slow
def test_quick_run_records_every_case(wb, episodes, tmp_path):
    """Every case runs in its own process, its first batch has the shapes the windows give
    (at the run's batch size), and rates, CPU, memory and ratios are recorded."""
    env = {**os.environ, "GPULOAD_BENCH_CACHE": str(episodes[0])}
    cmd = [sys.executable, "benchmarks/windows_bench.py", "--quick", "--episodes", "3",
           "--size", "48x64", "--min-time", "0.1", "--batch-size", str(QUICK_BATCH),
           "--out", str(tmp_path)]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| gpuload.windows |" in p.stdout and "machine:" in p.stdout
    assert f"batch {QUICK_BATCH}," in p.stdout
    result = json.loads((tmp_path / "windows.json").read_text())
    assert result["table"]["episodes"] == 3 and result["table"]["size"] == "48x64"
    assert result["table"]["path"] == episodes[1]
    assert result["machine"]["cpu"]
    assert result["workload"]["batch_size"] == QUICK_BATCH
    runs = {r["case"]: r for r in result["runs"]}
    assert set(runs) == set(wb.CASES)
    for case, r in runs.items():
        assert "error" not in r, r
        assert r["samples_per_s"] > 0 and r["frames_decoded_per_s"] > 0, case
        assert r["cpu_pct"] > 0 and r["peak_rss_mb"] > 0
        want = {k: list(v) for k, v in wb.expected_shapes(case, QUICK_BATCH).items()}
        assert r["shapes"] == want and r["shapes_ok"]
    assert runs["gpuload.windows"]["shapes"]["action_is_pad"] == [QUICK_BATCH, 50]
    assert wb.expected_shapes("gpuload.windows")["action_is_pad"] == (64, 50)  # the default
    for name in ("gpuload.windows / alt.row_by_row", "gpuload.windows / alt.lerobot_style"):
        assert result["ratios"][name]["value"] > 0
