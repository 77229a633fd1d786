"""The TensorFlow door's dataset of rows (no ``batch_size``), rows/s: iterated row by row in
Python and re-batched inside TF (``.batch(32)``, what a Keras pipeline does), over the bench's
5,000-row demo table, shuffled. Run it on two commits for the before/after in RESULTS.md.

    python benchmarks/tf_rows_probe.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def rate(ds, batched: bool) -> float:
    t0, n = time.perf_counter(), 0
    for r in ds:
        n += int(r["label"].shape[0]) if batched else 1
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    import gpuload
    from gpuload.bench.suites import cache_root, ensure_demo

    t = gpuload.open_table(ensure_demo(5000, 0, cache_root(), log=lambda *x: None)[0])
    out = {}
    for cols in (("label", "state"), ("image", "label")):
        for batched in (False, True):
            ds = gpuload.tensorflow(t, shuffle=True, seed=0, columns=list(cols))
            ds = ds.batch(32) if batched else ds
            for _ in ds.take(3):  # warm-up: graph building, first reads
                pass
            runs = sorted(rate(ds, batched) for _ in range(a.repeats))
            key = f"{'+'.join(cols)}{' .batch(32)' if batched else ' rows'}"
            out[key] = {"median": statistics.median(runs), "min": runs[0], "max": runs[-1]}
            print(f"{key}: {out[key]['median']:,.0f} rows/s ({runs[0]:,.0f}-{runs[-1]:,.0f})")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
