"""Tables benchmark (issue 2): ingest, raw batches() streams local and from loopback S3, peak
memory vs table size, and Deeplake 4 on a local copy of the same rows. A thin wrapper over the
``ingest``, ``stream`` and ``memory`` suites of ``gpuload bench`` (gpuload/bench/suites.py):
every measurement runs in fresh processes there, warm-up excluded; medians with min-max.

    python benchmarks/bench_tables.py --rows 20000 --repeats 3 --out benchmarks/results/tables.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt, run_suites, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "gpuload-bench"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-s3", action="store_true")
    args = ap.parse_args()
    N, R, bs = args.rows, args.repeats, args.batch_size
    sizes = sorted({64, bs, 256})
    only = [
        f"ingest.gpuload.{N}",
        f"ingest.deeplake.{N}",
        "stream.local.",
        f"stream.deeplake.seq.bs{bs}",
        "stream.s3.",
        "memory.stream.",
    ]
    r = run_suites(
        ["ingest", "stream", "memory"],
        rows=N,
        repeats=R,
        workdir=args.workdir,
        batch_sizes=sizes,
        remote=not args.no_s3,
        only=only,
    )
    doc = r.doc
    res: dict = {
        "machine": doc["machine"],
        "versions": doc["versions"],
        "rows": N,
        "batch_size": bs,
        "repeats": R,
        "method": doc["method"],
    }
    ing = f"ingest.gpuload.{N}"
    res["ingest"] = {
        k: r.metric(ing, k) for k in ("rows_s", "mb_s", "disk_mb_s", "fraction_of_disk")
    }
    for name, mode in (("seq", "seq"), ("shuffle", "shuffle")):
        sid = f"stream.local.{mode}.bs{bs}"
        res[f"local_{name}"] = {"rows_s": r.metric(sid), "mb_s": r.metric(sid, "mb_s")}
    for name, mode in (("seq", "seq"), ("shuffle", "shuffle")):
        sid = f"stream.local.{mode}.bs{bs}.noverify"  # the same read, checksums not verified
        if r.ok(sid):
            res[f"local_{name}_noverify"] = {"rows_s": r.metric(sid)}
            res[f"verify_cost_{name}"] = (
                res[f"local_{name}"]["rows_s"]["median"] / r.metric(sid)["median"]
            )
    for b2 in (64, 256):
        res[f"local_seq_bs{b2}"] = {"rows_s": r.metric(f"stream.local.seq.bs{b2}")}
    res["shuffle_over_seq"] = (
        res["local_shuffle"]["rows_s"]["median"] / res["local_seq"]["rows_s"]["median"]
    )
    res["peak_memory"] = {
        size: {
            "rows": N * (4 if size == "4x" else 1),
            "peak_rss_mb": r.median(f"memory.stream.{size}", "peak_rss_mb"),
            # what the epoch's streaming added to the process's RSS (sampled, baseline = start)
            "rss_growth_mb": r.median(f"memory.stream.{size}", "rss_growth_mb"),
        }
        for size in ("1x", "4x")
    }

    if not args.no_s3:
        if r.ok("stream.s3.seq.cold"):
            res["s3_seq_cold"] = {
                "rows_s": r.metric("stream.s3.seq.cold"),
                "mb_s": r.metric("stream.s3.seq.cold", "mb_s"),
            }
            res["s3_seq_cached"] = {
                "rows_s": r.metric("stream.s3.seq.cached"),
                "mb_s": r.metric("stream.s3.seq.cached", "mb_s"),
            }
            res["s3_shuffle_cold"] = {"rows_s": r.metric("stream.s3.shuffle.cold")}
            res["s3_shuffle_cached"] = {"rows_s": r.metric("stream.s3.shuffle.cached")}
            res["s3_seq_nocache"] = {
                "rows_s": r.metric("stream.s3.seq_nocache"),
                "mb_s": r.metric("stream.s3.seq_nocache", "mb_s"),
            }
            res["s3_over_local"] = (
                res["s3_seq_cold"]["rows_s"]["median"] / res["local_seq"]["rows_s"]["median"]
            )
        else:
            res["s3"] = r.status("stream.s3.seq.cold")

    if r.ok(f"ingest.deeplake.{N}") and r.ok(f"stream.deeplake.seq.bs{bs}"):
        res["deeplake_ingest"] = {"rows_s": r.metric(f"ingest.deeplake.{N}")}
        res["deeplake_stream"] = {"rows_s": r.metric(f"stream.deeplake.seq.bs{bs}")}
        res["ingest_vs_deeplake"] = (
            res["ingest"]["rows_s"]["median"] / res["deeplake_ingest"]["rows_s"]["median"]
        )
        res["stream_vs_deeplake"] = (
            res["local_seq"]["rows_s"]["median"] / res["deeplake_stream"]["rows_s"]["median"]
        )
    else:
        res["deeplake"] = r.status(f"ingest.deeplake.{N}")

    write_json(res, args.out)
    print(
        f"\ningest           {fmt(res['ingest']['rows_s'])} rows/s, {fmt(res['ingest']['mb_s'])} MB/s, "
        f"{res['ingest']['fraction_of_disk']['median']:.2f} of disk write",
        file=sys.stderr,
    )
    print(f"batches({bs}) seq   {fmt(res['local_seq']['rows_s'])} rows/s", file=sys.stderr)
    print(f"batches({bs}) shuf  {fmt(res['local_shuffle']['rows_s'])} rows/s", file=sys.stderr)


if __name__ == "__main__":
    main()
