"""benchmarks/figures.py maps every quoted figure to a case of `gpuload bench`; the decode-backend
and kernel micro-benchmarks are cases of the runner like any other."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gpuload.bench import suites as S

from ..helpers import benchmark_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def figures():
    yield benchmark_script("figures")
    sys.modules.pop("figures", None)


def _case_ids(fs, cores: int = 2) -> set[str]:
    """The ids the set's run would measure (as the runner builds its context)."""
    n = fs.rows
    ctx = S.Context(
        table_url="/nonexistent/demo",
        rows=n,
        image="image",
        label="label",
        columns=["image", "state", "label", "instruction"],
        storage_options=None,
        device="cpu",
        cores=cores,
        batch_sizes=list(fs.batch_sizes),
        remote=fs.remote,
        timing=S.Timing(),
        gpu=False,
        ingest_rows=sorted({min(k, n) for k in (1000, 2000, n)}),
        loader_workers=fs.loader_workers,
    )
    ms = S.build(ctx, fs.suites)
    if fs.only:
        only = [p.format(rows=n) for p in fs.only]
        ms = [m for m in ms if any(m.id.startswith(p) for p in only)]
    return {i for m in ms for i in m.ids()}


def test_every_quoted_figure_names_a_case_its_run_measures(figures):
    for name, fs in figures.FIGURES.items():
        ids = _case_ids(fs)
        assert ids, name
        for fig, ref in fs.figures.items():
            case = ref.format(rows=fs.rows).partition(":")[0]
            assert case in ids, f"{name}: figure {fig!r} names {case!r}, which the run lacks"
        for ratio, (a, b, _) in fs.ratios.items():
            assert a in fs.figures and b in fs.figures, (name, ratio)
        for goal, (fig, _) in fs.goals.items():
            assert fig in fs.figures, (name, goal)


def test_the_startup_set_has_cold_and_warm_rows_for_gpuload_and_one_per_peer(figures):
    ids = _case_ids(figures.FIGURES["startup"])
    for case in ("image", "plain", "dataloader", "tf"):
        assert {f"startup.gpuload.{case}.cold", f"startup.gpuload.{case}.warm"} <= ids
    assert {"startup.torch_pil", "startup.dali"} <= ids
    assert {"startup.gpuload.image.idle", "startup.torch_pil.idle", "startup.dali.idle"} <= ids
    assert figures.FIGURES["startup"].goals["image_warm_first_batch"] == (
        "image_warm_first_batch_s",
        0.3,
    )


def test_the_remote_set_runs_with_remote_and_holds_the_issue_goals_at_20_ms(figures):
    fs = figures.FIGURES["remote"]
    ids = _case_ids(fs)
    assert fs.remote and set(fs.suites) == {"stream", "e2e"}
    rows = {"seq": "stream.http{}.seq", "shuffle": "stream.http{}.shuffle",
            "fast_path": "loader.http{}.fast", "image": "e2e.http{}.image"}  # fmt: skip
    for d in (0, 20, 50):
        for name, case in rows.items():
            assert {case.format(d) + ".cold", case.format(d) + ".cached"} <= ids
            assert fs.figures[f"http{d}_{name}_epoch1"] == case.format(d) + ".cold"
    assert not any(".s3." in i for i in ids), "moto's rows are the tables and loader sets'"
    goals = {k: v[2] for k, v in fs.ratios.items() if v[2] is not None}
    assert goals == {
        "http20_seq_epoch1_over_local": 0.5,
        "http20_shuffle_epoch1_over_local": 0.3,
        "http20_image_epoch1_over_local": 0.9,
    }
    assert fs.figures["http20_seq_epoch1_peak_in_flight"] == "stream.http20.seq.cold:peak_in_flight"


def test_the_micro_benchmarks_are_cases_at_one_thread_and_all_cores(figures):
    ids = _case_ids(figures.FIGURES["codecs"], cores=4) | _case_ids(figures.FIGURES["kernel"], 4)
    for t in (1, 4):
        assert {f"codecs.limit.{t}t", f"codecs.rrc.default.{t}t"} <= ids
        assert f"kernel.rrc_flip_norm.{t}t" in ids
    assert not any(i.endswith(".2t") for i in ids)


@pytest.mark.slow
def test_codec_and_kernel_cases_run_in_fresh_processes(bench_cache):
    only = "codecs.limit.1t,codecs.rrc.default.1t,codecs.cpu_dct2.1t,kernel.rrc_flip_norm.1t"
    cmd = [sys.executable, "-m", "gpuload", "bench", "--quick", "--rows", "150", "--no-progress",
           "--suites", "codecs,kernel", "--only", only, "--cache-dir", str(bench_cache),
           "--min-batches", "2", "--json"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    doc = json.loads(p.stdout)
    by = {e["id"]: e for e in doc["results"]}
    assert set(by) == set(only.split(","))
    assert all(e["status"] == "ok" for e in by.values()), by
    assert by["codecs.rrc.default.1t"]["metrics"]["rows_s"]["median"] > 0
    assert by["kernel.rrc_flip_norm.1t"]["metrics"]["compile_s"]["median"] > 0
    assert doc["ratios"]["codecs.rrc.default.1t:x_limit"] > 0
    assert "Decode backends" in p.stderr and "Fused CPU kernel alone" in p.stderr
