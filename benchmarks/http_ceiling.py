"""The loopback HTTP stack's own ceiling: a bare fsspec loop reading one chunk file of the demo
table through the shaped HTTP object server (``gpuload.testing.shaped``, a child process), with
N ranges of S MB in flight. What gpuload's remote rows in RESULTS.md are compared with: the
bytes/s this server and client can move at all on the machine, before any verification, cache
or batch assembly.

    python benchmarks/http_ceiling.py [--table DIR] [--delay-ms 0] [--repeats 3]

Without ``--table`` it reads the bench's 5,000-row demo table (generated there if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def measure(table: str, delay_s: float, piece: int, in_flight: int, rounds: int = 3) -> float:
    """MB/s reading the table's largest chunk ``rounds`` times in ``piece``-byte ranges."""
    import fsspec

    from gpuload.testing.shaped import ShapedHTTPServer, Shaping

    chunks = os.path.join(table, "chunks")
    path = max((os.path.join(chunks, f) for f in os.listdir(chunks)), key=os.path.getsize)
    size = os.path.getsize(path)
    root = os.path.dirname(os.path.abspath(table))
    rel = os.path.relpath(path, root)
    ranges = [(a, min(a + piece, size)) for a in range(0, size, piece)] * rounds
    with ShapedHTTPServer(root, Shaping(delay_s=delay_s), process=True) as srv:
        fs = fsspec.filesystem("http", skip_instance_cache=True)
        url = f"{srv.url}/{rel}"
        fs.cat_file(url, start=0, end=1)  # the client session, outside the timing
        t = time.perf_counter()
        with ThreadPoolExecutor(in_flight) as ex:
            n = sum(
                len(b) for b in ex.map(lambda r: fs.cat_file(url, start=r[0], end=r[1]), ranges)
            )
        return n / (time.perf_counter() - t) / 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", default=None, help="a local table (default: the bench's demo)")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    if a.table is None:
        from gpuload.bench.suites import cache_root, ensure_demo

        a.table, _ = ensure_demo(5000, 0, cache_root(), log=lambda *x: None)
    out = {}
    for mb in (1, 4, 16):
        for k in (2, 8):
            runs = [measure(a.table, a.delay_ms / 1000, mb << 20, k) for _ in range(a.repeats)]
            out[f"{mb}MB_x{k}"] = {
                "median": statistics.median(runs),
                "min": min(runs),
                "max": max(runs),
            }
            print(f"{mb} MB ranges, {k} in flight: {statistics.median(runs):.0f} MB/s "
                  f"({min(runs):.0f}-{max(runs):.0f})", file=sys.stderr)  # fmt: skip
    print(json.dumps({"delay_ms": a.delay_ms, "table": a.table, "mb_s": out}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
