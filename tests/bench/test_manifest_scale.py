"""benchmarks/manifest_scale.py (issue 16 part 4): its synthetic table is a table gpuload writes
(the manifest round-trips byte for byte and opens; the rows made real read back as written), and
a quick run records every measurement with plausible values."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gpuload
from gpuload.format import Manifest

from ..helpers import benchmark_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ms():
    yield benchmark_script("manifest_scale")
    sys.modules.pop("manifest_scale", None)


def test_synthetic_table_is_what_gpuload_writes(ms, tmp_path):
    """The streamed manifest is byte for byte what ``Manifest.dumps`` writes for it, the pointer
    equals the version file, the table opens with every chunk, and every row of a chunk made
    real reads back as ``row_values`` says, in every column."""
    path = str(tmp_path / "t")
    info = ms.write_table(path, 40, 50, 1500)
    with open(os.path.join(path, "versions", "v000000000001.json"), "rb") as f:
        raw = f.read()
    with open(os.path.join(path, "manifest.json"), "rb") as f:
        assert f.read() == raw
    m = Manifest.loads(raw, "synthetic")
    assert m.dumps() == raw
    assert m.version == 1 and len(m.chunks) == 40 and m.num_rows == 2000
    assert info["manifest_bytes"] == len(raw)
    real = set(info["real_chunks"])
    assert 0 in real and {r // 50 for r in info["rows_read"]["access"]} <= real
    on_disk = set(os.listdir(os.path.join(path, "chunks")))
    assert {os.path.basename(m.chunks[k].file) for k in real} == on_disk
    t = gpuload.open_table(path)
    assert len(t) == 2000 and t.num_chunks == 40
    pool = ms.image_pool(1500)
    for k in sorted(real)[:3]:
        rows = np.arange(k * 50, (k + 1) * 50)
        got = t[rows].to_dict()
        want = ms.row_values(rows, pool)
        np.testing.assert_array_equal(got["label"], want["label"])
        np.testing.assert_array_equal(got["state"], want["state"])
        assert got["instruction"] == want["instruction"]
        assert got["image"] == want["image"]
    assert all(len(b) == 1500 for b in pool) and len(set(pool)) == len(pool)
    g = info["rows_read"]["access"][0]
    assert t[g]["label"] == g


def test_quick_run_records_every_measurement(tmp_path):
    out = tmp_path / "scale.json"
    cmd = [sys.executable, "benchmarks/manifest_scale.py", "--chunks", "100,300",
           "--rows-per-chunk", "100", "--image-bytes", "2000", "--timeout", "120",
           "--work", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| N chunks |" in p.stdout and "machine:" in p.stdout
    doc = json.loads(out.read_text())
    assert doc["machine"]["cores"] >= 1
    assert [r["n"] for r in doc["results"]] == [100, 300]
    for r in doc["results"]:
        n = r["n"]
        assert r["table"]["rows"] == 100 * n
        assert r["table"]["manifest_bytes"] > 300 * n  # ~430 bytes a chunk entry
        for kind in ("phases", "open", "access", "batch_full", "batch_block", "append"):
            assert r[kind]["ok"], (n, kind, r[kind])
        o, ph, a = r["open"], r["phases"], r["access"]
        assert 0 < o["open_s"] < 30 and o["rss_after"] >= o["rss_before"] > 0
        assert o["peak_rss"] >= o["rss_after"] * 0.5
        assert 0 < ph["json_s"] <= ph["manifest_loads_s"] and ph["reader_init_s"] > 0
        assert ph["dumps_bytes"] == r["table"]["manifest_bytes"]
        assert a["rows_checked"] == 9 and 0 < a["row_cold_s"] < 5 and 0 < a["label_warm_s"] < 5
        for kind in ("batch_full", "batch_block"):
            assert r[kind]["rows_checked"] == 128 and 0 < r[kind]["first_batch_s"] < 30
        assert 0 < r["append"]["append_s"] < 30
        assert r["append"]["manifest_bytes_after"] > r["table"]["manifest_bytes"]
    assert not os.path.exists(tmp_path / "work" / "n100")  # tables are removed unless --keep
