"""The fault-injection suite (gpuload.testing.faults), small: every storage fault either delivers
every row exactly or raises one clear gpuload error within its bound; corrupt chunks and hostile
manifests never deliver a wrong byte or allocate what a file claims; Ctrl-C exits a stalled read.
benchmarks/bench_faults.py runs the same cases larger and records the counters."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import replace

import pytest

import gpuload
from gpuload.errors import FetchError
from gpuload.retry import RetryPolicy
from gpuload.testing import faults
from gpuload.testing.servers import FaultPlan, RangeHTTPServer, S3FaultProxy

pytestmark = pytest.mark.timeout(300)

# short timeouts so stalls end quickly; the deadline bounds a permanent fault
POLICY = faults.suite_policy(deadline=3.0, read_timeout=0.5, connect_timeout=0.5)


def _fast(case):
    return replace(case, stall_s=1.5) if case.stall_s is not None and case.stall_s < 10 else case


@pytest.fixture(scope="module")
def fault_http_table(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-http")
    faults.make_fault_table(str(root / "t"), 200, chunk_bytes=128 << 10)
    with RangeHTTPServer(str(root)) as server:
        yield server, f"{server.url}/t"


@pytest.mark.parametrize(
    "case", faults.HTTP_CASES, ids=lambda c: f"{c.kind}-{c.schedule}-{c.target}-cached{c.cached}"
)
def test_http_fault(fault_http_table, case):
    server, url = fault_http_table
    r = faults.run_case(_fast(case), "http", url, server, seed=3, policy=POLICY)
    assert r.rows_wrong == 0, r
    assert r.ok, r
    if r.outcome == "exact":
        assert r.rows_delivered == 200 * (2 if r.cached else 1)
    if r.expect == "error":
        # one clear error within the retry deadline plus one try's timeout (and some slack)
        assert r.seconds < POLICY.deadline + POLICY.read_timeout + 3.0, r
    if case.schedule.startswith(("p=", "next")) and case.kind not in ("stall",):
        assert r.faults > 0, "the schedule injected nothing"


@pytest.mark.s3
@pytest.mark.parametrize(
    "case",
    [c for c in faults.S3_CASES if c.kind != "stall" or c.schedule != "always"],
    ids=lambda c: f"{c.kind}-{c.status}-{c.schedule}-{c.target}-cached{c.cached}",
)
def test_s3_fault_through_proxy(s3, tmp_path_factory, case):
    url = s3.url(f"faults-{uuid.uuid4().hex[:8]}")
    src = tmp_path_factory.mktemp("faults-s3") / "t"
    faults.make_fault_table(str(src), 120, chunk_bytes=64 << 10)
    gpuload.ingest(url, gpuload.open_table(src), storage_options=s3.storage_options)
    with S3FaultProxy(s3) as proxy:
        r = faults.run_case(_fast(case), "s3", url, proxy, proxy.storage_options, 5, POLICY)
    assert r.rows_wrong == 0 and r.ok, r
    if r.outcome == "exact":
        assert r.rows_delivered == 120 * (2 if r.cached else 1)


def test_permanent_fault_surfaces_within_30s_with_the_default_policy(fault_http_table):
    """Retries never multiply across layers: a server that always answers 503 gives one
    FetchError naming the table and object after gpuload's default deadline, not minutes."""
    server, url = fault_http_table
    t = gpuload.open_table(url, cache=False)
    server.plan = FaultPlan(kind="status", status=503, probability=1.0, path="/chunks/")
    t0 = time.perf_counter()
    with pytest.raises(FetchError, match=r"table 't', chunk chunks/\w+\.chunk, bytes") as e:
        t[0].to_dict()
    took = time.perf_counter() - t0
    assert took < 32, took
    assert "503" in str(e.value) and "failed after" in str(e.value)
    assert server.plan.snapshot()["faults_total"] > 3  # it did retry, in one layer
    server.plan = FaultPlan()


def test_open_retries_and_names_the_table(fault_http_table):
    server, url = fault_http_table
    server.plan = FaultPlan(kind="status", status=503, probability=1.0, path="manifest.json")
    with pytest.raises(FetchError, match=r"manifest\.json failed after \d+ tries"):
        gpuload.open_table(url, fetch=gpuload.FetchOptions(retry=POLICY))
    server.plan = FaultPlan(kind="reset", fail_next=3, path="manifest.json")
    assert len(gpuload.open_table(url, fetch=gpuload.FetchOptions(retry=POLICY))) == 200
    server.plan = FaultPlan()


def test_bad_s3_endpoint_is_a_gpuload_error():
    policy = RetryPolicy(deadline=1.0, connect_timeout=0.5, read_timeout=0.5)
    opts = {
        "key": "k",
        "secret": "s",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
    }
    with pytest.raises(FetchError, match=r"s3://nobucket/t/manifest\.json failed after"):
        gpuload.open_table(
            "s3://nobucket/t", storage_options=opts, fetch=gpuload.FetchOptions(retry=policy)
        )


def test_corrupt_chunks_never_deliver_wrong_bytes(tmp_path):
    cases = faults.corrupt_chunk_cases(str(tmp_path), rows=150)
    assert len(cases) == 5
    for c in cases:
        assert c.rows_wrong == 0 and c.outcome == "error", c
        assert c.rows_delivered < 150, c  # the damaged rows raised
    flip = cases[0]
    assert flip.error == "IntegrityError" and flip.rows_delivered > 100, flip  # only its page


def test_hostile_manifests_are_refused_within_bounded_memory(tmp_path):
    r = faults.hostile_manifest_cases(str(tmp_path), limit_bytes=3 << 30)
    assert len(r["results"]) == len(faults.HOSTILE_MANIFESTS)
    for name, outcome in r["results"]:
        assert outcome.startswith("error: "), (name, outcome)
        assert "raw" not in outcome and outcome != "accepted", (name, outcome)
    assert r["peak_rss"] < 1 << 30


def test_ctrl_c_exits_a_stalled_read_within_2s(tmp_path):
    r = faults.sigint_during_stall(str(tmp_path))
    assert r["stalled_requests"] >= 1, r
    assert r["returncode"] is not None and r["exit_seconds"] < 2.0, r


def test_symlinked_chunks_are_not_followed(tmp_path):
    t = faults.make_fault_table(str(tmp_path / "t"), 50)
    m = gpuload.open_table(t).manifest
    outside = tmp_path / "outside.bin"
    chunk = tmp_path / "t" / m.chunks[0].file
    outside.write_bytes(chunk.read_bytes())
    chunk.unlink()
    chunk.symlink_to(outside)
    with pytest.raises(gpuload.errors.FormatError, match="does not follow links"):
        gpuload.open_table(t)[0].to_dict()
    # a chunks/ directory that is a link out of the table
    chunk.unlink()
    os.rename(tmp_path / "t" / "chunks", tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / os.path.basename(m.chunks[0].file)).write_bytes(outside.read_bytes())
    (tmp_path / "t" / "chunks").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(gpuload.errors.FormatError, match="does not follow links"):
        gpuload.open_table(t)[0].to_dict()
