"""Probes behind RESULTS.md's "Time to first batch" notes, one fresh process per call:

    python benchmarks/first_batch_probe.py loader TABLE [--idle S] [--plain]
        build the image fast path (RandomResizedCrop(224) + flip + normalize, float16, batch 128,
        shuffled; --plain: the label and state columns, no image ops), wait S seconds, then time
        the first batch from the start of iterating (what loader.stats() reports)
    python benchmarks/first_batch_probe.py compile [--serial]
        compile the fused kernel of that pipeline into an empty kernel cache and time it
        (--serial: the build without Numba's threading layer); NUMBA_OPT=0|1|3 in the
        environment sets Numba's optimisation level

Each prints one JSON line. Run it several times (and ``git checkout`` an older commit to compare
with it): the machine is noisy, so quote medians and ranges, as RESULTS.md does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _image_ops():
    from gpuload import ops

    return [
        ops.RandomResizedCrop(224),
        ops.RandomHorizontalFlip(),
        ops.Normalize(*NORM),
        ops.ToDtype("float16"),
    ]


def loader(table: str, idle: float, plain: bool) -> dict:
    """First batch of a fresh process's loader, ``idle`` s after building it."""
    t0 = time.perf_counter()
    import torch  # noqa: F401 - what a training script imports first

    import gpuload

    imported = time.perf_counter()
    t = gpuload.open_table(table)
    kw = {"columns": ["label", "state"]} if plain else {"columns": ["image", "label"]}
    if not plain:
        kw["image"] = _image_ops()
    dl = gpuload.pytorch(t, batch_size=128, shuffle=True, seed=0, **kw)
    built = time.perf_counter()
    time.sleep(idle)
    t1 = time.perf_counter()
    next(iter(dl))
    return {
        "import_s": imported - t0,
        "build_s": built - imported,
        "idle_s": idle,
        "first_batch_s": time.perf_counter() - t1,
        "stats_first_batch_s": dl.stats().time_to_first_batch_s,
    }


def compile_kernel(serial: bool) -> dict:
    """Seconds to compile the pipeline's CPU kernel into an empty kernel cache, for the argument
    types a stage passes (as ``ops.warm_up`` does)."""
    import numpy as np

    with tempfile.TemporaryDirectory() as cache:
        os.environ["GPULOAD_CACHE_DIR"] = cache
        from gpuload.kernels import fused

        from gpuload import ops

        plan = ops.compile_ops(_image_ops())
        out = ops.aligned_empty(plan.out_shape(1), plan.storage_dtype)
        args = (
            np.zeros(1, np.uint8),
            np.zeros((1, 4), np.int64),
            np.zeros((1, 4), np.float32),
            np.zeros((1, fused.NUM_PARAMS), np.float32),
            plan.mean_array(),
            plan.inv_std_array(),
            np.zeros(1, np.float32),
            out.view(fused.STORAGE_DTYPE[plan.out_dtype]),
        )
        t = time.perf_counter()
        kernel = fused.get_cpu_kernel(plan.kernel_spec, parallel=not serial)
        fused.compile_cpu_kernel(kernel, args)
        return {
            "serial": serial,
            "numba_opt": os.environ.get("NUMBA_OPT"),
            "compile_s": time.perf_counter() - t,
        }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("loader")
    s.add_argument("table")
    s.add_argument("--idle", type=float, default=0.0)
    s.add_argument("--plain", action="store_true")
    s = sub.add_parser("compile")
    s.add_argument("--serial", action="store_true")
    a = p.parse_args(argv)
    rec = loader(a.table, a.idle, a.plain) if a.what == "loader" else compile_kernel(a.serial)
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
