"""Loader benchmark (issue 3): the fast path, torch DataLoader over the map-style dataset
(shuffle, workers), the same from loopback S3 after the first epoch, Deeplake's own loader on a
local copy of the same rows, and peak memory as the table grows. A thin wrapper over the
``stream`` and ``memory`` suites of ``gpuload bench`` (gpuload/bench/suites.py): fresh process
per measurement, warm-up excluded, medians with min-max.

    python benchmarks/bench_loader.py --rows 20000 --repeats 3 --out benchmarks/results/loader.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt, run_suites, write_json  # noqa: E402

WORKERS = 2  # the figure: DataLoader(..., num_workers=2)


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
    r = run_suites(
        ["stream", "memory"],
        rows=N,
        repeats=R,
        workdir=args.workdir,
        batch_sizes=[bs],
        remote=not args.no_s3,
        only=["loader.", "memory.fast."],
        loader_workers=WORKERS,
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
    res["fast_path_shuffle"] = r.metric("loader.fast.shuffle")
    res[f"dataloader_w{WORKERS}_shuffle"] = r.metric(f"loader.dataloader.w{WORKERS}.shuffle")
    res["dataloader_w0_shuffle"] = r.metric("loader.dataloader.w0.shuffle")
    res["peak_memory_mb"] = {
        size: r.median(f"memory.fast.{size}", "peak_rss_mb") for size in ("1x", "4x")
    }
    res["rss_growth_mb"] = {
        size: r.median(f"memory.fast.{size}", "rss_growth_mb") for size in ("1x", "4x")
    }
    if not args.no_s3:
        if r.ok("loader.s3.dataloader.w0.cold"):
            res["s3_dataloader_w0_shuffle_epoch1"] = r.metric("loader.s3.dataloader.w0.cold")
            res["s3_dataloader_w0_shuffle_epoch2"] = r.metric("loader.s3.dataloader.w0.cached")
            res["s3_fast_path_epoch1"] = r.metric("loader.s3.fast.cold")
            res["s3_fast_path_epoch2"] = r.metric("loader.s3.fast.cached")
        else:
            res["s3"] = r.status("loader.s3.dataloader.w0.cold")
    if r.ok("loader.deeplake.w0.shuffle"):
        res["deeplake_dataloader_w0_shuffle"] = r.metric("loader.deeplake.w0.shuffle")
        res["fast_path_vs_deeplake"] = (
            res["fast_path_shuffle"]["median"] / res["deeplake_dataloader_w0_shuffle"]["median"]
        )
    else:
        res["deeplake"] = r.status("loader.deeplake.w0.shuffle")

    write_json(res, args.out)
    for k in ("fast_path_shuffle", f"dataloader_w{WORKERS}_shuffle", "dataloader_w0_shuffle"):
        print(f"{k:28s} {fmt(res[k])} rows/s", file=sys.stderr)


if __name__ == "__main__":
    main()
