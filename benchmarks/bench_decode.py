#!/usr/bin/env python
"""Decode-stage benchmark: images/s for 640x480 JPEGs of ~20-30 KB (scikit-image photos,
randomly cropped / resized / flipped, quality searched per image to land in that range).

Each configuration runs in a fresh Python process (allocator and library state do not carry
over), ``--rounds`` times, round-robin over the configurations; a warm-up pass is excluded;
each repetition times at least ``--min-time`` seconds of batches; the JSON reports the median
and min-max over all repetitions, as wall-clock images/s and as images per CPU-second.

Configurations:
  raw_libjpeg      simplejpeg.decode_jpeg(..., buffer=reused) in a tight loop, per thread
  cpu / cpu_s2     gpuload "cpu" backend, full size / DCT scale 1/2
  cpu_fast         "cpu" backend with fast IDCT + fast upsampling
  pil / raw_pil    gpuload "pil" backend / Image.open().load() in a tight loop
  nvimgcodec       gpuload "nvimgcodec" backend on the CPU (libjpeg-turbo extension)
  dali             gpuload "dali" backend, CPU pipeline
  rrc_*            RandomResizedCrop windows (scale 0.08-1, ratio 3/4-4/3, torchvision's
                   sampling): region-aware decode vs full decode (cpu: roi="rows" default,
                   roi="region" with nvImageCodec for small windows, roi="off"; nvimgcodec
                   and DALI exact regions), at scale 1 and at the largest DCT scale that keeps
                   the crop >= 224 px (what a loader would ask)

Usage: python benchmarks/bench_decode.py [--images 128] [--batch 64] [--rounds 3] [--only cpu,rrc]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time

OUT_SIZE = 224


def rrc_window(rng, h: int, w: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision.transforms.RandomResizedCrop.get_params, with a numpy Generator."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            y = int(rng.integers(0, h - ch + 1))
            x = int(rng.integers(0, w - cw + 1))
            return (y, x, y + ch, x + cw)
    # fallback: central crop
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    y, x = (h - ch) // 2, (w - cw) // 2
    return (y, x, y + ch, x + cw)


def loader_scale(win, out=OUT_SIZE) -> int:
    """Largest DCT scale s in {1,2,4,8} that keeps the crop at least ``out`` px on its short side."""
    short = min(win[2] - win[0], win[3] - win[1])
    s = 1
    for cand in (2, 4, 8):
        if short / cand >= out:
            s = cand
    return s


CONFIGS = {
    # name: (kind, options)
    "raw_libjpeg": ("raw_libjpeg", {}),
    "raw_pil": ("raw_pil", {}),
    "cpu": ("backend", {"name": "cpu"}),
    "cpu_s2": ("backend", {"name": "cpu", "scale": 2}),
    "cpu_fast": ("backend", {"name": "cpu", "opts": {"fast": True}}),
    "pil": ("backend", {"name": "pil"}),
    "nvimgcodec": ("backend", {"name": "nvimgcodec"}),
    "dali": ("backend", {"name": "dali"}),
    "rrc_cpu_rows": ("backend", {"name": "cpu", "rrc": True}),
    "rrc_cpu_full": ("backend", {"name": "cpu", "rrc": True, "opts": {"roi": "off"}}),
    "rrc_cpu_region": ("backend", {"name": "cpu", "rrc": True, "opts": {"roi": "region"}}),
    "rrc_cpu_rows_scaled": ("backend", {"name": "cpu", "rrc": True, "rrc_scale": True}),
    "rrc_cpu_full_scaled": (
        "backend",
        {"name": "cpu", "rrc": True, "rrc_scale": True, "opts": {"roi": "off"}},
    ),
    "rrc_nvimgcodec_region": ("backend", {"name": "nvimgcodec", "rrc": True}),
    "rrc_dali_slice": ("backend", {"name": "dali", "rrc": True}),
}


# ------------------------------------------------------------------------------------------------
# worker (one configuration, fresh process)


def _time_reps(step, n_per_step: int, reps: int, min_time: float):
    """(wall-clock images/s, images per CPU-second of this process) per repetition."""
    step()  # warm-up (pool / pipeline / library handles created here), excluded
    step()
    rates, cpu_rates = [], []
    for _ in range(reps):
        count = 0
        t0, c0 = time.perf_counter(), time.process_time()
        while True:
            step()
            count += n_per_step
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        rates.append(count / dt)
        cpu_rates.append(count / max(time.process_time() - c0, 1e-9))
    return rates, cpu_rates


def worker(cfg: dict) -> dict:
    import numpy as np

    with open(cfg["images_path"], "rb") as f:
        images = pickle.load(f)
    kind, opts = CONFIGS[cfg["config"]]
    threads = cfg["threads"]
    reps, min_time, batch = cfg["reps"], cfg["min_time"], cfg["batch"]
    n = len(images)
    extra = {}

    if kind == "raw_libjpeg":
        from concurrent.futures import ThreadPoolExecutor

        import simplejpeg

        bufs = [np.empty(480 * 640 * 3, np.uint8) for _ in range(threads)]
        pool = ThreadPoolExecutor(threads)

        def part(k):
            buf = bufs[k]
            for j in range(k, n, threads):
                simplejpeg.decode_jpeg(images[j], buffer=buf)

        def step():
            if threads == 1:
                part(0)
            else:
                list(pool.map(part, range(threads)))

        rates, cpu_rates = _time_reps(step, n, reps, min_time)

    elif kind == "raw_pil":
        import io
        from concurrent.futures import ThreadPoolExecutor

        from PIL import Image

        pool = ThreadPoolExecutor(threads)

        def part(k):
            for j in range(k, n, threads):
                with Image.open(io.BytesIO(images[j])) as im:
                    im.load()

        def step():
            if threads == 1:
                part(0)
            else:
                list(pool.map(part, range(threads)))

        rates, cpu_rates = _time_reps(step, n, reps, min_time)

    else:
        from gpuload.decode import DecodeRequest, get_decoder, read_header, staging_nbytes

        dec = get_decoder(opts["name"], "cpu", threads=threads, **opts.get("opts", {}))
        headers = [read_header(b) for b in images]
        if opts.get("rrc"):
            rng = np.random.default_rng(1234)
            wins = [rrc_window(rng, h.height, h.width) for h in headers]
            reqs = [DecodeRequest(loader_scale(w) if opts.get("rrc_scale") else 1, w) for w in wins]
            extra["mean_window_area"] = float(
                np.mean(
                    [
                        (w[2] - w[0]) * (w[3] - w[1]) / (h.height * h.width)
                        for w, h in zip(wins, headers)
                    ]
                )
            )
            extra["mean_window_y1"] = float(
                np.mean([w[2] / h.height for w, h in zip(wins, headers)])
            )
            extra["scale_histogram"] = {
                str(s): int(sum(r.scale == s for r in reqs)) for s in (1, 2, 4, 8)
            }
        else:
            reqs = [DecodeRequest(opts.get("scale", 1))] * n
        batches = [
            (images[i : i + batch], reqs[i : i + batch], headers[i : i + batch])
            for i in range(0, n, batch)
        ]
        need = max(staging_nbytes(h, r, dec) for _, r, h in batches)
        staging = np.empty(need, np.uint8)  # sized once, reused by every batch
        ptr = staging.ctypes.data

        def step():
            for d, r, h in batches:
                dec.decode_batch(d, r, staging, headers=h)

        rates, cpu_rates = _time_reps(step, n, reps, min_time)
        assert staging.ctypes.data == ptr
        extra["staging_bytes"] = int(need)
        extra["decoded_bytes_per_image"] = int(
            sum(staging_nbytes(h, r, dec) for _, r, h in batches) / n
        )

    return {
        "config": cfg["config"],
        "threads": threads,
        "rates": rates,
        "cpu_rates": cpu_rates,
        "loadavg_1min_after": os.getloadavg()[0],
        **extra,
    }


def _summary(values):
    return {
        "median": round(statistics.median(values), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
    }


# ------------------------------------------------------------------------------------------------
# driver


def _versions() -> dict:
    out = {}
    for mod in ("numpy", "simplejpeg", "PIL", "imagecodecs", "nvidia.nvimgcodec", "nvidia.dali"):
        with contextlib.suppress(Exception):
            out[mod] = getattr(__import__(mod, fromlist=["x"]), "__version__", "?")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=128, help="distinct JPEGs (default 128)")
    ap.add_argument("--batch", type=int, default=64, help="decode_batch size (default 64)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per process (default 3)")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per config (default 3)")
    ap.add_argument("--min-time", type=float, default=0.7, help="seconds per repetition")
    ap.add_argument("--threads", default="", help="comma list (default: 1 and all cores)")
    ap.add_argument("--only", default="", help="comma list of config-name substrings")
    ap.add_argument("--out", default="", help="also write the JSON here")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from gpuload.decode._samples import photo_jpegs

    cores = os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",") if t] or sorted({1, cores})
    images = photo_jpegs(args.images, size=(480, 640), target_bytes=(20_000, 30_000), seed=0)
    sizes = sorted(len(b) for b in images)
    names = [c for c in CONFIGS if not args.only or any(s in c for s in args.only.split(","))]

    runs: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "images.pkl")
        with open(path, "wb") as f:
            pickle.dump(images, f)
        # Rounds go through every configuration in turn (a fresh process each time), so a burst
        # of load from other processes on a shared machine hits all configurations alike.
        for rnd in range(args.rounds):
            for name in names:
                for t in threads:
                    cfg = {
                        "config": name,
                        "threads": t,
                        "images_path": path,
                        "reps": args.reps,
                        "min_time": args.min_time,
                        "batch": args.batch,
                    }
                    env = dict(os.environ, GPULOAD_FORCE_CPU="1")
                    r = subprocess.run(
                        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                        capture_output=True,
                        text=True,
                        env=env,
                        timeout=900,
                    )
                    key = (name, t)
                    if r.returncode != 0:
                        runs[key] = {
                            "config": name,
                            "threads": t,
                            "error": r.stderr.strip().splitlines()[-1:],
                        }
                    elif "error" not in runs.get(key, {}):
                        res = json.loads(r.stdout.strip().splitlines()[-1])
                        acc = runs.setdefault(
                            key, {**res, "rates": [], "cpu_rates": [], "loadavg": []}
                        )
                        acc["rates"] += res["rates"]
                        acc["cpu_rates"] += res["cpu_rates"]
                        acc["loadavg"].append(res["loadavg_1min_after"])
                    print(f"round {rnd}: {name} x{t} done", file=sys.stderr, flush=True)

    results = []
    for acc in runs.values():
        if "error" in acc:
            results.append(acc)
            continue
        out = {
            k: v
            for k, v in acc.items()
            if k not in ("rates", "cpu_rates", "loadavg", "loadavg_1min_after")
        }
        out["img_per_s"] = _summary(acc["rates"])
        out["img_per_cpu_s"] = _summary(acc["cpu_rates"])
        out["reps"] = len(acc["rates"])
        out["loadavg_1min"] = _summary(acc["loadavg"])
        results.append(out)

    report = {
        "benchmark": "gpuload decode stage",
        "machine": {
            "cpus": cores,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": _versions(),
        "images": {
            "count": len(images),
            "size": "480x640 RGB JPEG 4:2:0",
            "bytes": {"min": sizes[0], "median": sizes[len(sizes) // 2], "max": sizes[-1]},
        },
        "method": (
            f"{args.rounds} rounds over all configurations, a fresh process per configuration "
            f"and round; warm-up excluded; {args.reps} repetitions of >= {args.min_time}s per "
            f"process; median [min-max] over all repetitions; batch {args.batch}. img_per_s is "
            f"wall-clock; img_per_cpu_s divides by the process's CPU time (robust to other "
            f"load on a shared machine, not to memory/cache contention); loadavg_1min is the "
            f"machine's load after each process."
        ),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
