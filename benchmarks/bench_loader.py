"""Loader benchmark (issue: loader): the fast path, torch DataLoader over the map-style dataset
(shuffle, workers), the same from loopback S3 after the first epoch, Deeplake's own loader on a
local copy of the same rows, and peak memory as the table grows. Fresh process per measurement.

    python benchmarks/bench_loader.py --rows 20000 --repeats 3 --out benchmarks/results/loader.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import fmt, machine, peak_rss_bytes, run_child, summarize  # noqa: E402

HERE = os.path.abspath(__file__)


def child_fast(a: dict) -> dict:
    import torch  # noqa: F401

    import gpuload

    t = gpuload.open_table(a["url"], storage_options=a.get("storage_options"), cache=a.get("cache"))
    loader = gpuload.pytorch(
        t,
        batch_size=a["batch_size"],
        shuffle=True,
        seed=0,
        device="cpu",
        columns=["image", "state", "label"],
    )
    res = []
    for _ in range(a.get("epochs", 1)):
        n, t0 = 0, time.perf_counter()
        for k, b in enumerate(loader):
            if k == 3 and not res:  # warm-up excluded in the first epoch
                n, t0 = 0, time.perf_counter()
            n += len(b["label"])
        res.append(n / (time.perf_counter() - t0))
    return {"rows_s": res, "peak_rss": peak_rss_bytes()}


def child_dataloader(a: dict) -> dict:
    import torch
    from torch.utils.data import DataLoader

    import gpuload

    t = gpuload.open_table(a["url"], storage_options=a.get("storage_options"), cache=a.get("cache"))
    ds = gpuload.pytorch(t, columns=["image", "state", "label"])
    w = a["workers"]
    dl = DataLoader(
        ds,
        batch_size=a["batch_size"],
        shuffle=True,
        num_workers=w,
        persistent_workers=w > 0,
        multiprocessing_context="fork" if w else None,
        generator=torch.Generator().manual_seed(0),
    )
    res = []
    for _ in range(a.get("epochs", 1)):
        n, t0 = 0, time.perf_counter()
        for k, b in enumerate(dl):
            if k == 3 and not res:
                n, t0 = 0, time.perf_counter()
            n += len(b["label"])
        res.append(n / (time.perf_counter() - t0))
    return {"rows_s": res, "peak_rss": peak_rss_bytes()}


def child_deeplake(a: dict) -> dict:
    import deeplake
    import torch
    from torch.utils.data import DataLoader

    ds = deeplake.open_read_only(a["url"])
    dl = DataLoader(
        ds.pytorch(),
        batch_size=a["batch_size"],
        shuffle=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(0),
    )
    n, t0 = 0, time.perf_counter()
    deadline = t0 + a.get("max_seconds", 60)
    for k, b in enumerate(dl):
        if k == 3:
            n, t0 = 0, time.perf_counter()
        n += len(b["label"])
        if time.perf_counter() > deadline:
            break
    return {"rows_s": [n / (time.perf_counter() - t0)]}


CHILDREN = {"fast": child_fast, "dataloader": child_dataloader, "deeplake": child_deeplake}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "gpuload-bench"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("TASK", "ARGS"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return
    from bench_tables import ensure_demo

    import gpuload

    os.makedirs(args.workdir, exist_ok=True)
    demo = ensure_demo(args.rows, args.workdir)
    R, bs = args.repeats, args.batch_size
    res: dict = {"machine": machine(), "rows": args.rows, "batch_size": bs, "repeats": R}

    def med(task, a, idx=0):
        return summarize([run_child(HERE, task, a)["rows_s"][idx] for _ in range(R)])

    res["fast_path_shuffle"] = med("fast", {"url": demo, "batch_size": bs})
    res["dataloader_w2_shuffle"] = med("dataloader", {"url": demo, "batch_size": bs, "workers": 2})
    res["dataloader_w0_shuffle"] = med("dataloader", {"url": demo, "batch_size": bs, "workers": 0})

    # peak memory vs table size (fast path, shuffled): 1x and 4x the rows
    big = os.path.join(args.workdir, f"demo-{args.rows}-x4")
    if (
        not os.path.exists(os.path.join(big, "manifest.json"))
        or len(gpuload.open_table(big)) != 4 * args.rows
    ):
        shutil.rmtree(big, ignore_errors=True)
        for k in range(4):
            gpuload.ingest(big, gpuload.open_table(demo), mode="append" if k else "create")
    res["peak_memory_mb"] = {
        label: run_child(HERE, "fast", {"url": url, "batch_size": bs})["peak_rss"] / 1e6
        for label, url in (("1x", demo), ("4x", big))
    }

    if not args.no_s3:
        from gpuload.bench.servers import LoopbackS3

        with LoopbackS3() as s3:
            url = s3.url("demo")
            gpuload.ingest(url, gpuload.open_table(demo), storage_options=s3.storage_options)
            so = s3.storage_options
            runs = []
            for _ in range(R):
                cache = tempfile.mkdtemp(prefix="gpuload-cache-")
                runs.append(
                    run_child(
                        HERE,
                        "dataloader",
                        {
                            "url": url,
                            "storage_options": so,
                            "cache": cache,
                            "batch_size": bs,
                            "workers": 0,
                            "epochs": 2,
                        },
                    )["rows_s"]
                )
                shutil.rmtree(cache, ignore_errors=True)
            res["s3_dataloader_w0_shuffle_epoch1"] = summarize([r[0] for r in runs])
            res["s3_dataloader_w0_shuffle_epoch2"] = summarize([r[1] for r in runs])
            runs = []
            for _ in range(R):
                cache = tempfile.mkdtemp(prefix="gpuload-cache-")
                runs.append(
                    run_child(
                        HERE,
                        "fast",
                        {
                            "url": url,
                            "storage_options": so,
                            "cache": cache,
                            "batch_size": bs,
                            "epochs": 2,
                        },
                    )["rows_s"]
                )
                shutil.rmtree(cache, ignore_errors=True)
            res["s3_fast_path_epoch1"] = summarize([r[0] for r in runs])
            res["s3_fast_path_epoch2"] = summarize([r[1] for r in runs])

    try:
        import deeplake

        dl = os.path.join(args.workdir, "deeplake-copy")
        if not os.path.exists(dl):
            run_child(
                os.path.join(os.path.dirname(HERE), "bench_tables.py"),
                "deeplake_ingest",
                {"source": demo, "dest": dl},
            )
        del deeplake
        res["deeplake_dataloader_w0_shuffle"] = med("deeplake", {"url": dl, "batch_size": bs})
        res["fast_path_vs_deeplake"] = (
            res["fast_path_shuffle"]["median"] / res["deeplake_dataloader_w0_shuffle"]["median"]
        )
    except ImportError:
        res["deeplake"] = "missing (pip install deeplake)"

    text = json.dumps(res, indent=2)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    for k in ("fast_path_shuffle", "dataloader_w2_shuffle", "dataloader_w0_shuffle"):
        print(f"{k:28s} {fmt(res[k])} rows/s", file=sys.stderr)


if __name__ == "__main__":
    main()
