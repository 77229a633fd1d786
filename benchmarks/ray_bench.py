"""Ray Data against gpuload in one process (issue 16): ingest and read of the demo rows.

    python benchmarks/ray_bench.py [--rows 20000] [--repeats 3] [--workers 2] [--out DIR] [--quick]

The rows are the demo table's (``gpuload.demo.demo_rows``: 480x640 JPEGs, float32[14] state,
int label, text), generated once by the parent into an Arrow IPC file that every run loads, so
every case writes the same bytes. Cases, each in a fresh process per repeat (``--child CASE``,
one JSON line):

* ``ingest.ray``: ``ray.init(num_cpus=--workers)``, the rows as a Ray dataset of 4 blocks per
  worker (``ray.data.from_arrow``, put before the clock starts), then
  ``gpuload.ray.write_table`` timed: conversion and chunk writing in the Ray tasks, one commit.
* ``ingest.local``: ``Client.ingest`` of the same pyarrow table in one process.
* ``read.ray``: ``gpuload.ray.read_table`` of a table the parent ingested, consumed with
  ``iter_batches(batch_size=1024, batch_format="pyarrow")`` (every byte read, verified and
  turned into Arrow blocks), Ray workers as for ingest.
* ``read.batches``: ``t.batches(1024)`` of the same table in one process (every column).

Ray's start-up (``ray.init``) is reported apart and not in the rates. Prints a markdown table
of medians (min-max) of rows/s with the ratios of the same run, names the machine
(``gpuload.bench.machine``), and writes every run to ``DIR/ray_bench.json``. ``--quick``: 2,000
rows, 1 repeat (a smoke test of the script, not a figure).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

CASES = ("ingest.ray", "ingest.local", "read.ray", "read.batches")


def _make_rows(path: str, rows: int) -> None:
    """The demo rows as one Arrow IPC file (what every run loads)."""
    import pyarrow as pa

    from gpuload.demo import demo_rows

    batches = []
    for b in demo_rows(rows):
        state = pa.FixedSizeListArray.from_arrays(pa.array(b["state"].reshape(-1)), 14)
        batches.append(
            pa.table(
                {
                    "image": pa.array(b["image"], pa.binary()),
                    "state": state,
                    "label": b["label"],
                    "instruction": pa.array(b["instruction"], pa.string()),
                }
            )
        )
    table = pa.concat_tables(batches)
    with pa.OSFile(path, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)


def _load(path: str):
    import pyarrow as pa

    with pa.memory_map(path) as f:
        return pa.ipc.open_file(f).read_all()


def _ray(workers: int) -> float:
    """Start a local Ray of ``workers`` CPUs; returns the seconds it took."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return time.perf_counter() - t0


def _child(case: str, rows_file: str, table: str, out: str, workers: int) -> dict[str, Any]:
    """One timed run of ``case``; the JSON line the parent reads."""
    import gpuload

    result: dict[str, Any] = {"case": case}
    if case.endswith(".ray"):
        result["ray_init_s"] = _ray(workers)
    if case.startswith("ingest."):
        data = _load(rows_file)
        n = data.num_rows
        if case == "ingest.ray":
            import ray.data

            import gpuload.ray

            k = 4 * workers
            cuts = [n * i // k for i in range(k + 1)]
            ds = ray.data.from_arrow([data.slice(a, b - a) for a, b in zip(cuts, cuts[1:])])
            t0 = time.perf_counter()
            t = gpuload.ray.write_table(ds, out)
        else:
            t0 = time.perf_counter()
            t = gpuload.ingest(out, data)
        seconds = time.perf_counter() - t0
        assert len(t) == n and t.version == 1
    else:
        t = gpuload.open_table(table)
        n = 0
        t0 = time.perf_counter()
        if case == "read.ray":
            import gpuload.ray

            ds = gpuload.ray.read_table(t)
            for b in ds.iter_batches(batch_size=1024, batch_format="pyarrow"):
                n += b.num_rows
        else:
            for b in t.batches(1024):
                n += len(b["label"])
        seconds = time.perf_counter() - t0
        assert n == len(t)
    result.update(rows=n, seconds=seconds, rows_per_s=n / seconds)
    return result


def _run(case: str, rows_file: str, table: str, tmp: str, workers: int, i: int) -> dict:
    out = os.path.join(tmp, f"out-{case}-{i}")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case]
    cmd += ["--rows-file", rows_file, "--table", table, "--out-table", out]
    cmd += ["--workers", str(workers)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"case": case, "error": (p.stderr or p.stdout)[-2000:]}
    return json.loads(lines[-1])


def _summary(runs: list[dict]) -> list[str]:
    """Markdown rows: median (min-max) rows/s per case, and the ratios of the same run."""
    med: dict[str, float] = {}
    lines = ["| case | rows/s median (min-max) | runs | ray.init s |", "|---|---|---|---|"]
    for case in CASES:
        ok = [r for r in runs if r["case"] == case and "error" not in r]
        if not ok:
            lines.append(f"| {case} | FAILED | 0 | |")
            continue
        rates = [r["rows_per_s"] for r in ok]
        med[case] = statistics.median(rates)
        init = [r["ray_init_s"] for r in ok if "ray_init_s" in r]
        init_s = f"{statistics.median(init):.1f}" if init else ""
        lines.append(
            f"| {case} | {med[case]:,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | {len(ok)} | {init_s} |"
        )
    for a, b in (("ingest.ray", "ingest.local"), ("read.ray", "read.batches")):
        if a in med and b in med:
            lines.append(f"\n{a} / {b}: {med[a] / med[b]:.2f}x")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run one case (``--child``) or all of them; exit 1 when a run failed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--rows-file", help=argparse.SUPPRESS)
    p.add_argument("--table", help=argparse.SUPPRESS)
    p.add_argument("--out-table", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(
            json.dumps(_child(args.child, args.rows_file, args.table, args.out_table, args.workers))
        )
        return 0
    from gpuload.bench.machine import machine

    mach = machine()
    rows, repeats = (2000, 1) if args.quick else (args.rows, args.repeats)
    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
        rows_file = os.path.join(tmp, "rows.arrow")
        _make_rows(rows_file, rows)
        import gpuload

        table = os.path.join(tmp, "read-table")
        gpuload.ingest(table, _load(rows_file))
        runs = [
            _run(case, rows_file, table, tmp, args.workers, i)
            for i in range(repeats)
            for case in CASES
        ]
    print(f"machine: {mach['cpu']}, {mach['usable_cores']} usable cores, {mach['ram_gib']} GiB")
    print(f"rows: {rows} demo rows; Ray workers: {args.workers}; repeats: {repeats}\n")
    print("\n".join(_summary(runs)))
    for r in runs:
        if "error" in r:
            print(f"\n{r['case']} failed:\n{r['error']}", file=sys.stderr)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ray_bench.json"), "w") as f:
            json.dump(
                {"machine": mach, "rows": rows, "workers": args.workers, "runs": runs}, f, indent=1
            )
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
