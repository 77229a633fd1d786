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


ROWS = 150  # the demo table of every run here, made once in ``bench_cache`` (conftest.py)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, bench_cache):
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
        str(ROWS),
        "--batch-sizes",
        "64",
        "--train-steps",
        "3",
        "--min-batches",  # timed batches per row (default 5): each ran and reported, no more
        "2",
        "--device",
        "cpu",
        # one gpuload e2e variant and one peer are enough here (each gpuload variant compiles
        # the fused kernel, ~5 s; each DataLoader starts worker processes); the rows that only
        # rerun a task with one reader or decoder option changed (verify_local=False, the DCT
        # downscale) are left out too: each is a fresh process (~4 s) through the same code
        "--skip",
        "e2e.gpuload.off,e2e.gpuload.fast,e2e.gpuload.tf,e2e.gpuload.dataloader,e2e.dali,"
        "e2e.gpuload.on.noverify,stream.local.seq.bs64.noverify,"
        "stream.local.shuffle.bs64.noverify,decode.gpuload.cpu_dct2,"
        "decode.pil.pool,loader.dataloader.w0,startup.",  # startup: its own test below
        "--cache-dir",
        str(bench_cache),
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
    assert doc["config"]["rows"] == ROWS and doc["table"]["rows"] == ROWS
    assert doc["config"]["timing"]["min_batches"] == 2  # --min-batches, in the run's config
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
        f"ingest.gpuload.{ROWS}",
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
    assert _positive_and_finite(bench_run["doc"]) > 100


def _positive_and_finite(doc) -> int:
    """Check every number of a results document (> 0, or >= 0 where 0 is a valid result);
    returns how many there were."""
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
    return found


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


STARTUP_TIMES = ("first_batch_s", "second_batch_s", "build_s", "import_s", "harness_s", "process_s")


@pytest.mark.slow
def test_startup_cases_run_cold_and_warm_in_fresh_processes(tmp_path, bench_cache):
    """The startup suite's plain fast path, cold and warm, and the image fast path warm (its
    unmeasured first run compiles the kernel into the run's warm cache, ~10-15 s here): a cold
    process starts with no cached kernel even after that, a warm one with the kernel."""
    only = "startup.gpuload.image.warm,startup.gpuload.plain"
    cmd = [sys.executable, "-m", "gpuload", "bench", "--quick", "--rows", str(ROWS),
           "--no-progress", "--device", "cpu", "--suites", "startup", "--only", only,
           "--cache-dir", str(bench_cache), "--out", str(tmp_path / "out"), "--json"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    doc = json.loads(p.stdout)
    by = {e["id"]: e for e in doc["results"]}
    cold, warm = by["startup.gpuload.plain.cold"], by["startup.gpuload.plain.warm"]
    image = by["startup.gpuload.image.warm"]
    assert set(by) == {cold["id"], warm["id"], image["id"]}
    assert all(e["status"] == "ok" and e["suite"] == "startup" for e in by.values()), by
    assert _positive_and_finite(doc) > 30
    for e in by.values():
        m = {k: v["median"] for k, v in e["metrics"].items()}
        assert all(k in m for k in STARTUP_TIMES + ("kernel_cache_files_at_start",)), e["id"]
        assert m["process_s"] >= m["harness_s"] + m["import_s"] + m["build_s"] + m["first_batch_s"]
        # the loader's own clock starts inside the first next(): it agrees, a little shorter
        assert 0 <= m["first_batch_s"] - m["loader_first_batch_s"] < 0.25, e["id"]
        (note,) = e["notes"]
        assert "gpuload" in note["preimported"], "the harness imports gpuload: said so"
        assert not {"torch", "tensorflow"} & set(note["preimported"]), note
        assert note["cold"] is (e is cold)
    # cold: a new empty cache folder (removed after), though the warm runs before it filled theirs
    assert cold["metrics"]["kernel_cache_files_at_start"]["median"] == 0
    assert cold["metrics"]["numba_cache_files_at_start"]["median"] == 0
    assert not os.path.exists(cold["notes"][0]["cache_dir"])
    for e in (image, warm):  # warm: the run's cache folder, filled by the image case's first run
        assert e["metrics"]["kernel_cache_files_at_start"]["median"] > 0, e["id"]
        assert e["metrics"]["numba_cache_files_at_start"]["median"] > 0, e["id"]
    assert image["notes"][0]["cache_dir"] == warm["notes"][0]["cache_dir"]
    assert image["metrics"]["first_batch_s"]["median"] > 0
    assert (
        "== Startup: time to first batch" in p.stderr
        and "process start to first batch s" in p.stderr
    )
    assert (tmp_path / "out" / "startup.png").stat().st_size > 1000
    assert "![startup](startup.png)" in (tmp_path / "out" / "report.md").read_text()


def test_prime_runs_go_unmeasured_before_the_first_and_max_repeats_caps_a_row(monkeypatch):
    from gpuload.bench import runner
    from gpuload.bench.suites import Measurement

    calls = []

    def fake_run(m, resources):
        calls.append(m.id)
        return {"n": len(calls)}

    monkeypatch.setattr(runner, "_run_once", fake_run)
    ms = [
        Measurement("s.cold", "startup", "g", "cold", "gpuload", "startup", {}, max_repeats=1),
        Measurement("s.warm", "startup", "g", "warm", "gpuload", "startup", {}, prime_runs=1),
    ]
    recs, failed = runner._repeat_all(ms, None, lambda s: 3, None, lambda msg: None)
    assert not failed
    assert calls == ["s.cold", "s.warm", "s.warm", "s.warm", "s.warm"]
    assert recs == {"s.cold": [{"n": 1}], "s.warm": [{"n": 3}, {"n": 4}, {"n": 5}]}


def test_no_run_starts_after_the_time_limit(monkeypatch):
    """A row measured fewer times keeps its runs; a row the limit reached first is 'not run'."""
    from gpuload.bench import runner
    from gpuload.bench.suites import Measurement

    clock = iter(range(100))
    monkeypatch.setattr(runner.time, "monotonic", lambda: float(next(clock)))
    rec = {"rows": 10, "bytes": 100, "wall_s": 1.0, "cpu_s": 0.5, "peak_rss": 1e6}
    monkeypatch.setattr(runner, "_run_once", lambda m, resources: {"": {**rec, "id": m.id}})
    ms = [Measurement(f"k.{i}", "kernel", "g", str(i), "gpuload", "kernel", {}) for i in range(3)]
    # the clock reads 0, 1, 2, ... at each check: k.0 and k.1 start before 1.5, nothing after
    recs, failed = runner._repeat_all(ms, None, lambda s: 2, None, lambda msg: None, 1.5)
    assert not failed and {k: [r[""]["id"] for r in v] for k, v in recs.items()} == {
        "k.0": ["k.0"],
        "k.1": ["k.1"],
        "k.2": [],
    }
    monkeypatch.setattr(runner, "_repeat_all", lambda *a: (recs, {}))
    entries = runner.run_measurements(ms, None, 2, 2, False, log=lambda msg: None, time_limit_s=9)
    assert [e["status"] for e in entries] == ["ok", "ok", "not run"]
    assert "time limit (9 s)" in entries[2]["reason"]


def test_placeholders_resolve_per_run_in_the_environment_too(tmp_path):
    from gpuload.bench import suites as S

    ctx = S.Context("/t", 10, "image", None, ["image"], None, "cpu", 2, [8], False, S.Timing(),
                    False, [10])  # fmt: skip
    res = S.Resources(ctx, str(tmp_path / "work"))
    try:
        env = {"GPULOAD_CACHE_DIR": "@fresh_cache", "NUMBA_CACHE_DIR": "@warm_cache/numba"}
        (a, ca), (b, cb) = res.resolve(env), res.resolve(env)
        assert a["GPULOAD_CACHE_DIR"] != b["GPULOAD_CACHE_DIR"], "a new empty folder per run"
        assert os.listdir(a["GPULOAD_CACHE_DIR"]) == [] and ca == [a["GPULOAD_CACHE_DIR"]]
        assert a["NUMBA_CACHE_DIR"] == b["NUMBA_CACHE_DIR"] and not cb[1:]
        t0 = time.time()
        args, _ = res.resolve({"spawned": "@now", "x": 1})
        assert args["x"] == 1 and t0 <= args["spawned"] <= time.time()
    finally:
        res.close()


def test_min_batches_reaches_every_child_and_only_when_given(tmp_path, monkeypatch):
    """``--min-batches N`` (a cheaper smoke run) is passed to each child's Meter; without it a
    child gets no such argument (each task's own minimum, 5, as in every recorded figure)."""
    from gpuload.bench import runner
    from gpuload.bench import suites as S

    sent = []
    monkeypatch.setattr(runner, "run_child", lambda task, args, **kw: sent.append(args) or {})
    m = S.Measurement("d.x", "decode", "g", "x", "gpuload", "decode", {"min_time": 0.1})
    own = S.Measurement("d.y", "decode", "g", "y", "gpuload", "decode", {"min_batches": 7})
    for given in (None, 2):
        ctx = _remote_ctx(timing=S.Timing(min_batches=given))
        res = S.Resources(ctx, str(tmp_path / "work"))
        try:
            runner._run_once(m, res)
            runner._run_once(own, res)
        finally:
            res.close()
    assert sent == [{"min_time": 0.1}, {"min_batches": 7},
                    {"min_time": 0.1, "min_batches": 2}, {"min_batches": 7}]  # fmt: skip
    assert runner.config_from_args(_bench_args("--min-batches", "3")).min_batches == 3
    assert runner.config_from_args(_bench_args()).min_batches is None
    with pytest.raises(SystemExit, match="--min-batches must be >= 1"):
        runner.config_from_args(_bench_args("--min-batches", "0"))


def _bench_args(*argv):
    import argparse

    from gpuload.bench import runner

    p = argparse.ArgumentParser()
    runner.add_arguments(p)
    return p.parse_args(list(argv))


def _remote_ctx(**kw):
    from gpuload.bench import suites as S

    base = dict(table_url="/data/demo-300-0", rows=300, image="image", label="label",
                columns=["image", "state", "label", "instruction"], storage_options=None,
                device="cpu", cores=2, batch_sizes=[64, 128, 256], remote=True,
                timing=S.Timing(), gpu=False, ingest_rows=[300])  # fmt: skip
    return S.Context(**{**base, **kw})


def test_remote_rows_read_the_http_server_at_each_delay_and_name_their_references():
    """--remote: per delay the same seven rows (cached ones with a cold and a cached epoch) on
    the HTTP server's own placeholders; every ratio names a row of the same run (x_http0: the
    same phase at 0 ms); the S3 rows stay, labelled as measuring moto."""
    from gpuload.bench import suites as S

    ctx = _remote_ctx()
    ms = S.build(ctx, ["stream", "e2e"])
    ids = {i for m in ms for i in m.ids()}
    http = [m for m in ms if (m.info or {}).get("server") == "http"]
    assert len(http) == 7 * len(S.HTTP_DELAYS_MS) == 21
    for d in S.HTTP_DELAYS_MS:
        for case in ("stream.http{}.seq", "stream.http{}.shuffle", "loader.http{}.fast",
                     "e2e.http{}.image"):  # fmt: skip
            assert {case.format(d) + ".cold", case.format(d) + ".cached"} <= ids
        assert {f"stream.http{d}.seq_nocache", f"stream.http{d}.shuffle_nocache"} <= ids
        # the adaptive in-flight limit against the fixed 16 it replaced, in the same run
        pinned = next(m for m in http if m.id == f"stream.http{d}.shuffle_nocache_fixed16")
        assert pinned.args["max_in_flight"] == 16 and pinned.args["cache"] is False
    for m in http:
        d = m.info["delay_ms"]
        assert m.args["url"] == f"@http{d}/demo-300-0" and m.args["server"] == f"@http{d}"
        assert m.needs == ("http",) and f"with {d} ms added per request" in m.group
        assert "FetchOptions" not in repr(m.args) and "fetch" not in m.args  # the defaults
        assert "max_in_flight" not in m.args or m.id.endswith("_fixed16")
        cached = m.args["epochs"] == 2
        assert m.args["cache"] == ("@fresh_cache" if cached else False)
        names = {r.name for r in m.ratios}
        assert names == ({"x_local", "x_http0"} if d else {"x_local"}), m.id
        for r in m.ratios:
            for sfx in m.phases.values():
                assert r.ref_for(sfx) in ids, (m.id, sfx, r)
    image = next(m.args for m in http if m.id == "e2e.http20.image")
    local = next(m.args for m in ms if m.id == "e2e.gpuload.on")
    own = ("url", "server", "epochs", "cache", "min_time", "warmup")
    same = {k: v for k, v in local.items() if k not in own}
    assert {k: v for k, v in image.items() if k not in own} == same, "the e2e default row's"
    assert image["warmup"] == 0 < local["warmup"], "300 rows: too few batches to leave some out"
    big = S.build(_remote_ctx(rows=5000), ["stream"])
    assert next(m.args["warmup"] for m in big if m.id == "e2e.http0.image") == local["warmup"]
    s3 = [m for m in ms if ".s3." in m.id]
    assert len(s3) == 5 and all("measures moto, not the network" in m.group for m in s3)
    local_only = S.build(_remote_ctx(remote=False), ["stream"])
    assert not any(".http" in m.id or ".s3" in m.id for m in local_only)


@pytest.mark.slow
def test_remote_http_rows_go_through_the_shaped_server(bench_cache):
    """The 20 ms and 0 ms sequential rows for real on a small table: rates, ratios to local
    disk and to 0 ms, and the 20 ms run's requests really waited >= 20 ms each (its epoch
    lasted at least 20 ms x requests / peak in flight, by the server's own counters)."""
    only = "stream.local.seq.bs128,stream.http0.seq,stream.http20.seq"
    skip = "stream.local.seq.bs128.noverify,stream.http0.seq_nocache,stream.http20.seq_nocache"
    cmd = [sys.executable, "-m", "gpuload", "bench", "--quick", "--rows", str(ROWS),
           "--no-progress", "--device", "cpu", "--suites", "stream", "--batch-sizes", "128",
           "--remote", "--only", only, "--skip", skip, "--cache-dir", str(bench_cache),
           "--min-batches", "2", "--json"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-4000:]
    doc = json.loads(p.stdout)
    by = {e["id"]: e for e in doc["results"]}
    phases = [f"stream.http{d}.seq.{ph}" for d in (0, 20) for ph in ("cold", "cached")]
    assert set(by) == {"stream.local.seq.bs128", *phases}
    assert all(e["status"] == "ok" for e in by.values()), by
    assert _positive_and_finite(doc) > 20
    for id in phases:
        m = by[id]["metrics"]
        assert m["rows_s"]["median"] > 0 and by[id]["ratios"]["x_local"] > 0, id
        assert (".http20." in id) == ("x_http0" in by[id]["ratios"]), id
    cold = by["stream.http20.seq.cold"]
    m = {k: v["median"] for k, v in cold["metrics"].items()}
    assert m["server_requests"] >= 1 and m["peak_in_flight"] >= 1
    assert m["server_wall_s"] >= 0.02 * m["server_requests"] / m["peak_in_flight"]
    assert m["wall_s"] >= 0.02 and m["first_batch_s"] >= 0.02  # a request before the first batch
    assert m["served_mb_s"] > 0
    # the cached epoch reads its disk cache: no more than a few requests
    assert by["stream.http20.seq.cached"]["metrics"]["server_requests"]["median"] <= 2
    assert doc["ratios"]["stream.http20.seq.cached:x_http0"] > 0
    err = p.stderr
    assert "HTTP object server (aiohttp in a child process) with 20 ms added per request" in err
    assert "peak in flight" in err and "x http0" in err and "HTTP server at 20 ms/request" in err
