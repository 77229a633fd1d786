"""The benchmark runner (`gpuload bench`) end to end on a tiny demo table, and its helpers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from gpuload.bench.measure import Meter, percentile, summarize
from gpuload.bench.runner import ZERO_ALLOWED
from gpuload.stats import STAGES

SUITES = ("ingest", "stream", "decode", "e2e", "train")


def _numbers(x, path="$"):
    """Every number in a JSON value, with where it is."""
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "out"
    env = dict(os.environ, GPULOAD_BENCH_HIDE="deeplake")  # a peer reported as missing
    cmd = [
        sys.executable,
        "-m",
        "gpuload",
        "bench",
        "--quick",
        "--rows",
        "150",
        "--batch-sizes",
        "64",
        "--train-steps",
        "3",
        "--device",
        "cpu",
        # one gpuload e2e variant and one peer are enough here (each gpuload variant compiles
        # the fused kernel, ~5 s; each DataLoader starts worker processes)
        "--skip",
        "e2e.gpuload.off,e2e.gpuload.fast,e2e.gpuload.tf,e2e.gpuload.dataloader,e2e.dali,"
        "decode.pil.pool,loader.dataloader.w0",
        "--cache-dir",
        str(tmp / "cache"),
        "--out",
        str(out),
        "--json",
        "--no-progress",
    ]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    took = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr[-4000:]
    return {"doc": json.loads(p.stdout), "stderr": p.stderr, "out": out, "took": took}


@pytest.mark.slow
def test_results_json_structure(bench_run):
    doc = bench_run["doc"]
    out = bench_run["out"]
    with open(out / "results.json") as f:
        on_disk = json.load(f)
    assert on_disk["results"] == doc["results"]
    assert doc["format"] == "gpuload-bench/1"
    m = doc["machine"]
    assert isinstance(m["cpu"], str) and m["cores"] >= 1 and m["ram_gib"] > 0 and "gpu" in m
    for lib in (
        "gpuload",
        "numpy",
        "numba",
        "torch",
        "tensorflow",
        "simplejpeg",
        "pillow",
        "dali",
        "nvimgcodec",
        "deeplake",
    ):
        assert isinstance(doc["versions"][lib], str) and doc["versions"][lib]
    assert doc["config"]["rows"] == 150 and doc["table"]["rows"] == 150
    assert doc["total_s"] > 0

    entries = doc["results"]
    assert {e["suite"] for e in entries} == set(SUITES)
    by_id = {e["id"]: e for e in entries}
    assert len(by_id) == len(entries), "ids are unique"
    for e in entries:
        assert e["status"] in ("ok", "missing", "not run", "failed"), e
        assert e["status"] != "failed", (e["id"], e.get("error"))
        if e["status"] == "ok":
            for key in ("rows_s", "mb_s", "gbit_s", "cpu_util_pct", "peak_rss_mb"):
                s = e["metrics"][key]
                assert s["min"] <= s["median"] <= s["max"] and s["n"] >= 1, (e["id"], key)
        else:
            # a peer that is absent is reported as such, never as numbers
            assert "metrics" not in e and "reps" not in e and e["reason"], e
    # every suite measured something of gpuload's
    for suite in SUITES:
        assert any(
            e["suite"] == suite and e["status"] == "ok" and e["system"] == "gpuload"
            for e in entries
        ), suite
    # the hidden peer is missing wherever it appears; the GPU rows are not run without a GPU
    dl = [e for e in entries if e["system"] == "deeplake"]
    assert dl and all(e["status"] == "missing" and "deeplake" in e["reason"] for e in dl)
    from gpuload.device import cuda_available

    if not cuda_available():
        gpu = [e for e in entries if e["id"].startswith("decode.gpuload.gpu_")]
        assert gpu and all(e["status"] == "not run" for e in gpu)
    # baselines ran
    for id in (
        "decode.raw_libjpeg",
        "e2e.gpuload.on",
        "e2e.torch_pil",
        "train.synthetic",
        "train.gpuload",
        "train.torch_pil",
        "stream.local.seq.bs64",
        "ingest.gpuload.150",
    ):
        assert by_id[id]["status"] == "ok", by_id[id]
    assert "x_limit" in by_id["e2e.gpuload.on"]["ratios"]
    assert by_id["train.gpuload"]["metrics"]["steps_s"]["median"] > 0
    assert 0 < by_id["train.gpuload"]["metrics"]["wait_pct"]["median"] <= 100


@pytest.mark.slow
def _metric_name(where: str) -> str:
    """The metric a path names: ``x.metrics.NAME.median`` or ``x.reps[i].NAME``."""
    parts = where.split(".")
    if len(parts) >= 3 and parts[-3] == "metrics":
        return parts[-2]
    return parts[-1]


def test_every_reported_number_is_positive_and_finite(bench_run):
    doc = bench_run["doc"]
    found = 0
    for e in doc["results"]:
        for where, v in _numbers(
            {k: e.get(k) for k in ("metrics", "reps", "ratios", "latency_ms")}, e["id"]
        ):
            found += 1
            if _metric_name(where) in ZERO_ALLOWED:  # e.g. no RSS growth at all: a good result
                assert math.isfinite(v) and v >= 0, (where, v)
            else:
                assert math.isfinite(v) and v > 0, (where, v)
    for where, v in _numbers(doc["ratios"], "ratios"):
        assert math.isfinite(v) and v > 0, (where, v)
    assert found > 100


@pytest.mark.slow
def test_report_and_plots(bench_run):
    out = bench_run["out"]
    doc = bench_run["doc"]
    md = (out / "report.md").read_text()
    assert "# gpuload bench report" in md and "MISSING" in md and "rows/s" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "latency.png" in pngs and {f"throughput_{s}.png" for s in SUITES} <= set(pngs)
    for name in pngs:
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the terminal table (on stderr with --json) is shaped like the reference's tables
    err = bench_run["stderr"]
    for text in ("rows/s", "MB/s", "Gb/s", "images/s", "MISSING", "total time"):
        assert text in err, text
    assert doc["config"]["quick"] is True


def test_stage_times_come_from_the_loaders_own_stats(bench_run):
    """gpuload's loaders report time to first batch and per-stage shares (from loader.stats()),
    in results.json, the terminal table and report.md; peers have none."""
    doc = bench_run["doc"]
    by_id = {e["id"]: e for e in doc["results"] if e["status"] == "ok"}
    fast = by_id["loader.fast.shuffle"]["metrics"]
    assert fast["first_batch_s"]["median"] > 0
    shares = [fast[f"stage_{s}_pct"]["median"] for s in STAGES]
    assert abs(sum(shares) - 100) < 1e-6 and fast["stage_read_pct"]["median"] > 0
    e2e = by_id["e2e.gpuload.on"]["metrics"]
    assert e2e["stage_decode_pct"]["median"] > 0 and e2e["stage_kernel_pct"]["median"] > 0
    dataloader = next(e for i, e in by_id.items() if i.startswith("loader.dataloader.w"))
    assert not any(k.startswith("stage_") for k in dataloader["metrics"])
    assert (
        "Where gpuload's loaders spend their time" in (bench_run["out"] / "report.md").read_text()
    )
    assert "Where gpuload's loaders spend their time" in bench_run["stderr"]


def test_python_m_gpuload_bench_help():
    p = subprocess.run(
        [sys.executable, "-m", "gpuload.bench", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0 and "--batch-sizes" in p.stdout and "--remote" in p.stdout


def test_meter_excludes_warmup_and_stops_after_the_window():
    m = Meter(warmup=2, min_time=0.05, min_batches=3)
    ticks = 0
    while m.tick(10, 100):
        ticks += 1
        time.sleep(0.01)
        assert ticks < 100
    r = m.result()
    assert r["rows"] == 10 * len(r["latencies"]) and len(r["latencies"]) >= 3
    assert r["wall_s"] >= 0.05 and r["bytes"] == 100 * len(r["latencies"])
    assert r["peak_rss"] > 0 and r["cpu_s"] >= 0
    assert m.ticks == len(r["latencies"]) + 2  # the two warm-up batches are not timed


def test_summaries():
    assert summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0


def test_a_ratio_above_its_ceiling_is_flagged_as_a_busy_machine():
    from gpuload.bench.runner import add_ratios, ceiling_warnings
    from gpuload.bench.suites import Measurement, Ratio

    def m(id, ratios=()):
        return Measurement(id, "train", "g", id, "x", "train", {}, ratios=ratios)

    bound = Ratio("x_compute_bound", "train.synthetic", ceiling=1.0)
    ms = [m("train.synthetic"), m("train.gpuload", (bound,)), m("train.torch_pil", (bound,))]

    def entry(id, v):
        return {"id": id, "status": "ok", "metrics": {"rows_s": {"median": v}}}

    entries = [
        entry("train.synthetic", 100.0),
        entry("train.gpuload", 93.0),
        entry("train.torch_pil", 200.0),
    ]
    flat = add_ratios(entries, ms)
    assert flat == {"train.gpuload:x_compute_bound": 0.93, "train.torch_pil:x_compute_bound": 2.0}
    warnings = ceiling_warnings(entries, ms)
    assert len(warnings) == 1 and "train.torch_pil" in warnings[0] and "busy" in warnings[0]
    assert entries[2]["above_ceiling"] == ["x_compute_bound"] and "above_ceiling" not in entries[1]


def test_plots_carry_the_run_context_and_warnings(bench_run, tmp_path):
    from gpuload.bench.report import plots, run_context

    doc = dict(bench_run["doc"])
    ctx = run_context(doc)
    m = doc["machine"]
    for part in (f"{m['cores']} cores", "GPU: ", f"{doc['table']['rows']:,} rows", "gpuload "):
        assert part in ctx
    doc["warnings"] = [
        "train.x: x_compute_bound = 2.00, above its ceiling of 1: the machine was busy"
    ]
    images = plots(doc, str(tmp_path))
    assert images and all((tmp_path / f).stat().st_size > 1000 for f in images.values())
    from gpuload.bench.report import markdown

    assert "**Warning**: train.x" in markdown(doc, images)
