"""Reliability figures (issue 9): the fault-injection suite at full size, from its own counters.

Per fault kind against a loopback HTTP server (Range support) and a proxy in front of moto's
S3: cases, requests, faults injected, retries, refetches, rows delivered, rows wrong (must be 0);
corrupt chunk files; concurrent-writer trials and lost commits (must be 0); hostile manifests and
image headers with peak memory; Ctrl-C during a stalled read; permanent faults with the default
retry policy; and what verifying checksums costs on the raw stream and the image fast path
(ratios within one run, fresh processes, medians of R).

    python benchmarks/bench_faults.py --out benchmarks/results/faults.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from figures import run_suites, write_json  # noqa: E402

from gpuload.bench.machine import machine  # noqa: E402
from gpuload.bench.measure import fmt  # noqa: E402
from gpuload.retry import RetryPolicy  # noqa: E402
from gpuload.testing import faults  # noqa: E402
from gpuload.testing.servers import FaultPlan, LoopbackS3, RangeHTTPServer, S3FaultProxy  # noqa: E402
from gpuload.testing.writers import concurrent_append_trials  # noqa: E402


def storage_cases(work: str, rows: int, seeds: int) -> list[dict]:
    """Every HTTP and S3 case, ``seeds`` times with different fault draws."""
    import gpuload

    src = faults.make_fault_table(os.path.join(work, "t"), rows)
    out = []
    with RangeHTTPServer(work) as server:
        for case in faults.HTTP_CASES:
            for seed in range(seeds if case.schedule.startswith("p=") else 1):
                r = faults.run_case(case, "http", f"{server.url}/t", server, seed=seed)
                out.append(r.as_dict() | {"seed": seed})
                print(_line(r), file=sys.stderr)
    with LoopbackS3() as s3:
        url = s3.url(f"faults-{uuid.uuid4().hex[:8]}")
        gpuload.ingest(url, gpuload.open_table(src), storage_options=s3.storage_options)
        with S3FaultProxy(s3) as proxy:
            for case in faults.S3_CASES:
                for seed in range(seeds if case.schedule.startswith("p=") else 1):
                    r = faults.run_case(case, "s3", url, proxy, proxy.storage_options, seed)
                    out.append(r.as_dict() | {"seed": seed})
                    print(_line(r), file=sys.stderr)
    return out


def _line(r) -> str:
    return (
        f"{r.store:5} {r.kind:18} {r.schedule:7} {r.target:8} cached={r.cached!s:5} "
        f"{r.outcome:6} ok={r.ok!s:5} {r.seconds:6.2f}s req={r.requests} faults={r.faults} "
        f"retries={r.retries} refetch={r.refetches} rows={r.rows_delivered} wrong={r.rows_wrong}"
    )


def default_policy_faults(work: str) -> list[dict]:
    """Permanent faults with gpuload's default retry policy: how long until the one error (a
    503 and a stall over HTTP; S3 SlowDown, which used to take ~105 s through stacked retries)."""
    import gpuload

    src = faults.make_fault_table(os.path.join(work, "d"), 50)
    out = []
    cases = [
        faults.FaultCase("", "status", "always", expect="error", status=503),
        faults.FaultCase("", "stall", "always", expect="error", stall_s=None),
    ]
    with RangeHTTPServer(os.path.dirname(src)) as server:
        for case in cases:
            r = faults.run_case(case, "http", f"{server.url}/d", server, policy=RetryPolicy())
            out.append(r.as_dict() | {"policy": "default"})
            print(_line(r), file=sys.stderr)
            server.plan = FaultPlan()
    with LoopbackS3() as s3:
        url = s3.url(f"d-{uuid.uuid4().hex[:8]}")
        gpuload.ingest(url, gpuload.open_table(src), storage_options=s3.storage_options)
        with S3FaultProxy(s3) as proxy:
            r = faults.run_case(
                cases[0], "s3", url, proxy, proxy.storage_options, policy=RetryPolicy()
            )
            out.append(r.as_dict() | {"policy": "default"})
            print(_line(r), file=sys.stderr)
    return out


def writer_trials(work: str, trials: int) -> list[dict]:
    out = []
    r = concurrent_append_trials(os.path.join(work, "w"), writers=4, trials=trials, slow=0.05)
    out.append(r.as_dict() | {"through": "local disk"})
    with LoopbackS3() as s3:
        base = s3.url(f"w-{uuid.uuid4().hex[:8]}")
        r = concurrent_append_trials(base, s3.storage_options, 4, max(2, trials // 2), 0.05, 1)
        out.append(r.as_dict() | {"through": "moto S3"})
        with S3FaultProxy(s3) as proxy:  # a slow store: 20 ms added to every request
            proxy.plan = FaultPlan(latency_s=0.02)
            base = proxy.url(f"w-{uuid.uuid4().hex[:8]}")
            r = concurrent_append_trials(
                base, proxy.storage_options, 4, max(2, trials // 4), 0.0, 2
            )
            out.append(r.as_dict() | {"through": "moto S3 + 20 ms per request"})
    for r in out:
        print(r, file=sys.stderr)
    return out


def verification_cost(work: str, rows: int, repeats: int) -> dict:
    """Raw stream and image fast path with and without local verification, same run."""
    r = run_suites(
        ["stream", "e2e"],
        rows=rows,
        repeats=repeats,
        workdir=work,
        batch_sizes=[128],
        only=["stream.local.seq.bs128", "stream.local.shuffle.bs128", "e2e.gpuload.on"],
    )
    out = {}
    for name, a, b in (
        ("raw stream, sequential", "stream.local.seq.bs128", "stream.local.seq.bs128.noverify"),
        (
            "raw stream, shuffled",
            "stream.local.shuffle.bs128",
            "stream.local.shuffle.bs128.noverify",
        ),
        (
            "image fast path (decode + RandomResizedCrop + flip + normalize)",
            "e2e.gpuload.on",
            "e2e.gpuload.on.noverify",
        ),
    ):
        on, off = r.metric(a), r.metric(b)
        out[name] = {"verify": on, "no_verify": off, "ratio": on["median"] / off["median"]}
        print(
            f"{name}: verify {fmt(on)} / off {fmt(off)} = {on['median'] / off['median']:.3f}",
            file=sys.stderr,
        )
    return out


def markdown(res: dict) -> str:
    """The figures table of benchmarks/RESULTS.md, from the run's own counters."""
    rows = {}
    for c in res["storage"] + res["default_policy"]:
        what = c["kind"] + (f" {c['status']}" if c["kind"] == "status" else "")
        what += " (manifest)" if c["target"] == "manifest" else ""
        what += ", cached" if c["cached"] else ""
        what += ", default policy" if c.get("policy") == "default" else ""
        key = (c["store"], what, c["schedule"])
        r = rows.setdefault(
            key,
            dict(
                n=0,
                req=0,
                faults=0,
                retries=0,
                refetch=0,
                rows=0,
                wrong=0,
                exact=0,
                error=0,
                secs=0.0,
                ok=0,
            ),
        )
        r["n"] += 1
        for a, b in (
            ("req", "requests"),
            ("faults", "faults"),
            ("retries", "retries"),
            ("refetch", "refetches"),
            ("rows", "rows_delivered"),
            ("wrong", "rows_wrong"),
        ):
            r[a] += c[b]
        r["exact" if c["outcome"] == "exact" else "error"] += 1
        r["ok"] += c["ok"]
        r["secs"] = max(r["secs"], c["seconds"])
    out = [
        "| store | fault | schedule | cases | requests | faults injected | retries | refetches "
        "| rows delivered | rows wrong | outcome | slowest case |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (store, what, sched), r in rows.items():
        outcome = f"{r['exact']} exact, {r['error']} one clear error"
        out.append(
            f"| {store} | {what} | {sched} | {r['n']} | {r['req']:,} | {r['faults']:,} | "
            f"{r['retries']:,} | {r['refetch']} | {r['rows']:,} | **{r['wrong']}** | {outcome} "
            f"| {r['secs']:.1f} s |"
        )
    out += [
        "",
        "| corrupted chunk (local) | rows delivered | rows wrong | error |",
        "| --- | --- | --- | --- |",
    ]
    for c in res["corrupt_chunks"]:
        total = c["extra"]["rows"]
        out.append(
            f"| {c['kind']} | {c['rows_delivered']} of {total} | **{c['rows_wrong']}** | {c['error']} |"
        )
    out += [
        "",
        "| concurrent writers (processes) | trials | appends reported ok | rows committed "
        "| rows found | lost commits | extra rows | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in res["writers"]:
        out.append(
            f"| {w['writers']} writers, {w['through']} | {w['trials']} | {w['commits_ok']} | "
            f"{w['rows_committed']:,} | {w['rows_found']:,} | **{w['lost_commits']}** | "
            f"{w['extra_rows']} | {w['seconds']:.1f} |"
        )
    hm, hi = res["hostile_manifests"], res["hostile_images"]
    refused = sum(o.startswith("error: ") for _, o in hm["results"])
    out += [
        "",
        f"Hostile manifests: {len(hm['results'])} tried, {refused} refused with one FormatError, "
        f"peak RSS {hm['peak_rss'] / 2**20:.0f} MB (child under RLIMIT_AS). Hostile image headers "
        f"({', '.join(hi['kinds'])} claiming 65535x65535): {hi['tried']} tried, {hi['skipped']} "
        f'skipped by on_error="skip", {len(hi["labels"])} good rows delivered, peak RSS '
        f"{hi['peak_rss'] / 2**20:.0f} MB. Ctrl-C during a stalled read: exit after "
        f"{res['sigint']['exit_seconds']:.2f} s.",
        "",
        "| verification cost, same run | verified | not verified (verify_local=False) | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for name, v in res["verification_cost"].items():
        out.append(
            f"| {name} | {fmt(v['verify'])} | {fmt(v['no_verify'])} | **{v['ratio']:.2f}** |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1000, help="rows of the fault table")
    ap.add_argument("--seeds", type=int, default=3, help="fault draws per rate case")
    ap.add_argument("--trials", type=int, default=20, help="concurrent-writer trials (local)")
    ap.add_argument("--cost-rows", type=int, default=5000, help="demo rows for the cost runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "gpuload-bench"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--markdown", default=None, help="only print the tables of this results JSON")
    args = ap.parse_args()
    if args.markdown:
        import json

        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return
    t0 = time.perf_counter()
    work = tempfile.mkdtemp(prefix="gpuload-faults-")
    res = {"machine": machine(), "rows": args.rows, "seeds": args.seeds}
    res["storage"] = storage_cases(work, args.rows, args.seeds)
    res["default_policy"] = default_policy_faults(work)
    res["corrupt_chunks"] = [c.as_dict() for c in faults.corrupt_chunk_cases(work, 600)]
    res["writers"] = writer_trials(work, args.trials)
    res["hostile_manifests"] = faults.hostile_manifest_cases(work)
    res["hostile_images"] = faults.hostile_image_cases(work)
    res["sigint"] = faults.sigint_during_stall(work)
    res["verification_cost"] = verification_cost(args.workdir, args.cost_rows, args.repeats)
    res["seconds"] = time.perf_counter() - t0
    write_json(res, args.out)
    print(markdown(res))
    bad = [c for c in res["storage"] + res["corrupt_chunks"] if not c["ok"]]
    print(f"\n{len(bad)} case(s) not as expected; {res['seconds']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
