#!/usr/bin/env python
"""Fused CPU kernel alone: decoded 480x640x3 uint8 images -> 3x224x224 (images/s).

Every (preset, thread count) runs in a fresh Python process with NUMBA_NUM_THREADS set before
numba is imported. Inside it: random non-constant source images packed into one staging buffer,
per-sample parameters from ``plan.sample_params`` (RandomResizedCrop windows with torchvision's
sampling, so window sizes and the share of antialiased samples are realistic), one
``FusedImageStage`` with its preallocated outputs reused; compilation and 3 warm-up batches are
excluded; then ``--reps`` timed batches, cycling through 4 parameter sets (different windows
each batch). Reports the median (and min/max) seconds per batch as images/s and us/image.

Presets:
  rrc_flip_norm       RandomResizedCrop(224) + RandomHorizontalFlip + Normalize -> float32 NCHW
  rrc_jitter_norm     + ColorJitter(0.4, 0.4, 0.4) (brightness, contrast, saturation)
  rrc_flip_norm_bf16  as rrc_flip_norm, bfloat16 NCHW
  rrc_flip_u8_nhwc    RandomResizedCrop + flip -> uint8 NHWC
  eval_resize_crop    Resize(256) + CenterCrop(224) + Normalize -> float32 NCHW

Usage: python benchmarks/bench_kernel.py [--threads 1,2] [--batch 64] [--reps 30]
                                         [--presets rrc_flip_norm,rrc_jitter_norm]
Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

PRESETS = [
    "rrc_flip_norm",
    "rrc_jitter_norm",
    "rrc_flip_norm_bf16",
    "rrc_flip_u8_nhwc",
    "eval_resize_crop",
]
SRC_H, SRC_W = 480, 640


def _ops(preset):
    from gpuload import ops

    norm = ops.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    rrc = ops.RandomResizedCrop(224)
    flip = ops.RandomHorizontalFlip()
    return {
        "rrc_flip_norm": [rrc, flip, norm],
        "rrc_jitter_norm": [rrc, flip, ops.ColorJitter(0.4, 0.4, 0.4), norm],
        "rrc_flip_norm_bf16": [rrc, flip, norm, ops.ToDtype("bfloat16")],
        "rrc_flip_u8_nhwc": [rrc, flip, ops.ToDtype("uint8"), ops.ToLayout("NHWC")],
        "eval_resize_crop": [ops.Resize(256), ops.CenterCrop(224), norm],
    }[preset]


def child(preset: str, batch: int, reps: int) -> dict:
    import numba
    import numpy as np

    from gpuload import ops

    rng = np.random.default_rng(0)
    # smooth random colour fields + noise: non-constant, realistic-ish value distribution
    yy, xx = np.meshgrid(
        np.linspace(0, 1, SRC_H, dtype=np.float32),
        np.linspace(0, 1, SRC_W, dtype=np.float32),
        indexing="ij",
    )
    base = np.stack([np.sin(6 * yy + 2 * c) * np.cos(9 * xx - c) for c in range(3)], axis=-1)
    src = np.empty(batch * SRC_H * SRC_W * 3, dtype=np.uint8)
    for b in range(batch):
        img = (
            128
            + 100 * base * rng.uniform(0.5, 1.0)
            + rng.normal(0, 12, base.shape).astype(np.float32)
        )
        src[b * SRC_H * SRC_W * 3 : (b + 1) * SRC_H * SRC_W * 3] = (
            np.clip(img, 0, 255).astype(np.uint8).reshape(-1)
        )
    meta = np.zeros((batch, 4), dtype=np.int64)
    meta[:, 0] = np.arange(batch) * SRC_H * SRC_W * 3
    meta[:, 1], meta[:, 2], meta[:, 3] = SRC_H, SRC_W, 3

    plan = ops.compile_ops(_ops(preset))
    param_sets = []
    for epoch in range(4):
        p = plan.sample_params(meta[:, 1], meta[:, 2], np.arange(batch), seed=1, epoch=epoch)
        param_sets.append((plan.scale_window(p, SRC_H, SRC_W), p))
    oh, ow = plan.out_size
    aa = np.mean([((w[:, 2] / oh > 2) | (w[:, 3] / ow > 2)).mean() for w, _ in param_sets])
    stage = ops.FusedImageStage(plan, batch_size=batch, device="cpu", depth=2)

    t0 = time.perf_counter()
    stage.run(src, meta, *param_sets[0])
    compile_s = time.perf_counter() - t0
    for k in range(3):
        stage.run(src, meta, *param_sets[k % 4])
    times = []
    for r in range(reps):
        w, p = param_sets[r % 4]
        t = time.perf_counter()
        stage.run(src, meta, w, p)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {
        "preset": preset,
        "threads": numba.get_num_threads(),
        "threading_layer": numba.threading_layer(),
        "batch": batch,
        "reps": reps,
        "out": f"{plan.out_shape(batch)} {plan.out_dtype} {plan.layout}",
        "antialiased_share": round(float(aa), 3),
        "images_per_s": round(batch / med, 1),
        "images_per_s_min": round(batch / max(times), 1),
        "images_per_s_max": round(batch / min(times), 1),
        "us_per_image": round(med / batch * 1e6, 1),
        "compile_s": round(compile_s, 2),
    }


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--child", nargs=3, metavar=("PRESET", "BATCH", "REPS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), int(a.child[2]))))
        return
    results = []
    for preset in a.presets.split(","):
        if preset not in PRESETS:
            raise SystemExit(f"unknown preset {preset!r}; choose from {PRESETS}")
        for n in (int(x) for x in a.threads.split(",")):
            env = dict(os.environ, NUMBA_NUM_THREADS=str(n))
            env.pop("NUMBA_ENABLE_CUDASIM", None)
            proc = subprocess.run(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--child",
                    preset,
                    str(a.batch),
                    str(a.reps),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            if proc.returncode != 0:
                raise SystemExit(f"{preset} threads={n} failed:\n{proc.stderr[-4000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(res)
            print(
                f"{preset:20s} threads={n}: {res['images_per_s']:>9,.0f} img/s "
                f"({res['us_per_image']} us/img, AA share {res['antialiased_share']})",
                file=sys.stderr,
            )
    print(
        json.dumps(
            {
                "benchmark": "fused_cpu_kernel",
                "source": f"{SRC_H}x{SRC_W}x3 uint8",
                "machine": machine(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
