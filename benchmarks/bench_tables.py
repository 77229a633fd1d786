"""Tables benchmark (issue: tables): ingest, raw batches() streams local and from loopback S3,
peak memory vs table size. Every measurement runs in a fresh process; medians with min-max.

    python benchmarks/bench_tables.py --rows 20000 --repeats 3 --out benchmarks/results/tables.json
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


# -- children (run in fresh processes) ---------------------------------------------------------
def child_ingest(a: dict) -> dict:
    import gpuload

    src = gpuload.open_table(a["source"])
    cols = src[:].to_dict()  # the already-encoded rows, in memory (untimed)
    n = len(src)
    nbytes = (
        sum(len(x) for x in cols["image"])
        + sum(len(x.encode()) for x in cols["instruction"])
        + n * (14 * 4 + 8)
    )
    dest = a["dest"]
    shutil.rmtree(dest, ignore_errors=True)
    t = time.perf_counter()
    gpuload.ingest(
        dest,
        cols,
        schema=dict(src.schema.to_json() and {c.name: c.type_string() for c in src.schema}),
    )
    dt = time.perf_counter() - t
    # the disk's sequential write rate, same bytes, same run: 8 MiB writes + fsync
    blk = os.urandom(8 << 20)
    path = dest + ".seqwrite"
    t = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            left -= f.write(blk[: min(left, len(blk))])
        f.flush()
        os.fsync(f.fileno())
    dw = time.perf_counter() - t
    os.unlink(path)
    shutil.rmtree(dest, ignore_errors=True)
    return {"rows_s": n / dt, "mb_s": nbytes / dt / 1e6, "disk_mb_s": nbytes / dw / 1e6}


def child_stream(a: dict) -> dict:
    import gpuload

    kw = {}
    if a.get("storage_options"):
        kw["storage_options"] = a["storage_options"]
    if "cache" in a:
        kw["cache"] = a["cache"]
    t = gpuload.open_table(a["url"], **kw)
    bs = a["batch_size"]
    shuffle = a["shuffle"]
    epochs = a.get("epochs", 1)
    out = []
    for e in range(epochs):
        it = t.batches(bs, shuffle=shuffle, seed=0, epoch=e, columns=a.get("columns"))
        rows = nbytes = 0
        t0 = time.perf_counter()
        warm = a.get("warmup", 0) if e == 0 else 0
        for k, b in enumerate(it):
            if k == warm and warm:
                t0 = time.perf_counter()
                rows = nbytes = 0
            rows += len(b["label"])
            nbytes += sum(len(x) for x in b["image"]) + b["state"].nbytes + b["label"].nbytes
        dt = time.perf_counter() - t0
        out.append({"rows_s": rows / dt, "mb_s": nbytes / dt / 1e6})
    return {"epochs": out, "peak_rss": peak_rss_bytes(), "stats": t.fetcher.stats}


def child_deeplake_ingest(a: dict) -> dict:
    import deeplake
    import numpy as np

    import gpuload

    cols = gpuload.open_table(a["source"])[:].to_dict()
    n = len(cols["label"])
    dest = a["dest"]
    shutil.rmtree(dest, ignore_errors=True)
    t = time.perf_counter()
    ds = deeplake.create(dest)
    ds.add_column("image", deeplake.types.Bytes())
    ds.add_column("state", deeplake.types.Array(deeplake.types.Float32(), shape=[14]))
    ds.add_column("label", deeplake.types.Int64())
    for lo in range(0, n, 1000):
        ds.append(
            {
                "image": cols["image"][lo : lo + 1000],
                "state": np.asarray(cols["state"][lo : lo + 1000]),
                "label": np.asarray(cols["label"][lo : lo + 1000]),
            }
        )
    ds.commit()
    dt = time.perf_counter() - t
    return {"rows_s": n / dt}


def child_deeplake_stream(a: dict) -> dict:
    import deeplake

    ds = deeplake.open_read_only(a["url"])
    rows = 0
    t0 = time.perf_counter()
    for k, b in enumerate(ds.batches(a["batch_size"])):
        if k == a.get("warmup", 0) and k:
            t0 = time.perf_counter()
            rows = 0
        rows += len(b["label"])
    return {"rows_s": rows / (time.perf_counter() - t0), "peak_rss": peak_rss_bytes()}


CHILDREN = {
    "ingest": child_ingest,
    "stream": child_stream,
    "deeplake_ingest": child_deeplake_ingest,
    "deeplake_stream": child_deeplake_stream,
}


# -- driver ----------------------------------------------------------------------------------
def ensure_demo(rows: int, workdir: str) -> str:
    import gpuload
    from gpuload.demo import make_demo_table
    from gpuload.errors import TableNotFoundError

    path = os.path.join(workdir, f"demo-{rows}")
    try:
        t = gpuload.open_table(path)
        if len(t) == rows:
            return path
    except TableNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)
    print(f"generating the {rows}-row demo table...", file=sys.stderr)
    make_demo_table(path, rows=rows)
    return path


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
    os.makedirs(args.workdir, exist_ok=True)
    demo = ensure_demo(args.rows, args.workdir)
    R, bs = args.repeats, args.batch_size
    res: dict = {"machine": machine(), "rows": args.rows, "batch_size": bs, "repeats": R}

    def rep(task, a, key="rows_s"):
        return summarize([run_child(HERE, task, a)[key] for _ in range(R)])

    # ingest
    ing = [
        run_child(
            HERE, "ingest", {"source": demo, "dest": os.path.join(args.workdir, "ingest-out")}
        )
        for _ in range(R)
    ]
    res["ingest"] = {k: summarize([x[k] for x in ing]) for k in ("rows_s", "mb_s", "disk_mb_s")}
    res["ingest"]["fraction_of_disk"] = summarize([x["mb_s"] / x["disk_mb_s"] for x in ing])
    # local streams (the table is in the page cache: warm reads)
    for name, shuffle in (("seq", False), ("shuffle", True)):
        runs = [
            run_child(
                HERE, "stream", {"url": demo, "batch_size": bs, "shuffle": shuffle, "warmup": 5}
            )
            for _ in range(R)
        ]
        res[f"local_{name}"] = {
            "rows_s": summarize([r["epochs"][0]["rows_s"] for r in runs]),
            "mb_s": summarize([r["epochs"][0]["mb_s"] for r in runs]),
        }
    for b2 in (64, 256):
        runs = [
            run_child(
                HERE, "stream", {"url": demo, "batch_size": b2, "shuffle": False, "warmup": 5}
            )
            for _ in range(R)
        ]
        res[f"local_seq_bs{b2}"] = {"rows_s": summarize([r["epochs"][0]["rows_s"] for r in runs])}
    res["shuffle_over_seq"] = (
        res["local_shuffle"]["rows_s"]["median"] / res["local_seq"]["rows_s"]["median"]
    )

    # peak memory vs table size: the same rows 1x and 4x
    import gpuload

    big = os.path.join(args.workdir, f"demo-{args.rows}-x4")
    if (
        not os.path.exists(os.path.join(big, "manifest.json"))
        or len(gpuload.open_table(big)) != 4 * args.rows
    ):
        shutil.rmtree(big, ignore_errors=True)
        src = gpuload.open_table(demo)
        for k in range(4):
            gpuload.ingest(big, src, mode="append" if k else "create")
    mem = {}
    for label, url in (("1x", demo), ("4x", big)):
        r = run_child(HERE, "stream", {"url": url, "batch_size": bs, "shuffle": True})
        mem[label] = {"rows": len(gpuload.open_table(url)), "peak_rss_mb": r["peak_rss"] / 1e6}
    res["peak_memory"] = mem

    # loopback S3
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
                        "stream",
                        {
                            "url": url,
                            "storage_options": so,
                            "cache": cache,
                            "batch_size": bs,
                            "shuffle": False,
                            "epochs": 2,
                        },
                    )
                )
                shutil.rmtree(cache, ignore_errors=True)
            res["s3_seq_cold"] = {
                "rows_s": summarize([r["epochs"][0]["rows_s"] for r in runs]),
                "mb_s": summarize([r["epochs"][0]["mb_s"] for r in runs]),
            }
            res["s3_seq_cached"] = {
                "rows_s": summarize([r["epochs"][1]["rows_s"] for r in runs]),
                "mb_s": summarize([r["epochs"][1]["mb_s"] for r in runs]),
            }
            runs = []
            for _ in range(R):
                cache = tempfile.mkdtemp(prefix="gpuload-cache-")
                runs.append(
                    run_child(
                        HERE,
                        "stream",
                        {
                            "url": url,
                            "storage_options": so,
                            "cache": cache,
                            "batch_size": bs,
                            "shuffle": True,
                            "epochs": 2,
                        },
                    )
                )
                shutil.rmtree(cache, ignore_errors=True)
            res["s3_shuffle_cold"] = {"rows_s": summarize([r["epochs"][0]["rows_s"] for r in runs])}
            res["s3_shuffle_cached"] = {
                "rows_s": summarize([r["epochs"][1]["rows_s"] for r in runs])
            }
            runs = [
                run_child(
                    HERE,
                    "stream",
                    {
                        "url": url,
                        "storage_options": so,
                        "cache": False,
                        "batch_size": bs,
                        "shuffle": False,
                    },
                )
                for _ in range(R)
            ]
            res["s3_seq_nocache"] = {
                "rows_s": summarize([r["epochs"][0]["rows_s"] for r in runs]),
                "mb_s": summarize([r["epochs"][0]["mb_s"] for r in runs]),
            }
            res["s3_over_local"] = (
                res["s3_seq_cold"]["rows_s"]["median"] / res["local_seq"]["rows_s"]["median"]
            )

    # peer in the same run: Deeplake 4 local dataset (bytes column, no decode)
    try:
        import deeplake  # noqa: F401

        dl = os.path.join(args.workdir, "deeplake-copy")
        ing = [run_child(HERE, "deeplake_ingest", {"source": demo, "dest": dl}) for _ in range(R)]
        res["deeplake_ingest"] = {"rows_s": summarize([x["rows_s"] for x in ing])}
        res["deeplake_stream"] = {
            "rows_s": rep("deeplake_stream", {"url": dl, "batch_size": bs, "warmup": 5})
        }
        res["ingest_vs_deeplake"] = (
            res["ingest"]["rows_s"]["median"] / res["deeplake_ingest"]["rows_s"]["median"]
        )
        res["stream_vs_deeplake"] = (
            res["local_seq"]["rows_s"]["median"] / res["deeplake_stream"]["rows_s"]["median"]
        )
    except ImportError:
        res["deeplake"] = "missing (pip install deeplake)"

    text = json.dumps(res, indent=2)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    print(
        f"\ningest           {fmt(res['ingest']['rows_s'])} rows/s, {fmt(res['ingest']['mb_s'])} MB/s, "
        f"{res['ingest']['fraction_of_disk']['median']:.2f} of disk write",
        file=sys.stderr,
    )
    print(f"batches({bs}) seq   {fmt(res['local_seq']['rows_s'])} rows/s", file=sys.stderr)
    print(f"batches({bs}) shuf  {fmt(res['local_shuffle']['rows_s'])} rows/s", file=sys.stderr)


if __name__ == "__main__":
    main()
