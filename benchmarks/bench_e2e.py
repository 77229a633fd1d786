"""End-to-end benchmark (issue 4, items 1-3): on the demo table, RandomResizedCrop(224) +
RandomHorizontalFlip + Normalize to float32 NCHW, batch 128, each measurement in fresh
processes (the ``decode`` and ``e2e`` suites of ``gpuload bench``, gpuload/bench/suites.py):

1. the limit: raw libjpeg-turbo (simplejpeg) full-size decode of the same images into reused
   buffers, a tight loop on all cores;
2. gpuload's fast path into torch tensors: DCT/ROI off, on (default), and the fastest opt-in;
3. the alternatives: torch DataLoader + PIL (num_workers = cores), DataLoader over
   gpuload.pytorch(t, transform=PIL), Deeplake ds.pytorch() on a local copy, a DALI CPU
   pipeline; and gpuload.tensorflow.

Writes images/s (median, min-max) and the issue's ratios.

    python benchmarks/bench_e2e.py --rows 5000 --repeats 3 --out benchmarks/results/e2e.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt, run_suites, write_json  # noqa: E402

KEYS = {
    "limit_raw_libjpeg": "decode.raw_libjpeg",
    "gpuload_off": "e2e.gpuload.off",
    "gpuload_on": "e2e.gpuload.on",
    "gpuload_fast_optin": "e2e.gpuload.fast",
    "gpuload_tensorflow": "e2e.gpuload.tf",
    "dataloader_gpuload_pil_transform": "e2e.gpuload.dataloader",
    "torch_dataloader_pil": "e2e.torch_pil",
    "deeplake_pytorch": "e2e.deeplake",
    "dali_cpu": "e2e.dali",
}
ALTERNATIVES = ("torch_dataloader_pil", "deeplake_pytorch", "dali_cpu")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "gpuload-bench"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    r = run_suites(
        ["e2e"],
        rows=args.rows,
        repeats=args.repeats,
        workdir=args.workdir,
        device="cpu",
    )
    res: dict = {
        "machine": r.doc["machine"],
        "versions": r.doc["versions"],
        "rows": args.rows,
        "repeats": args.repeats,
        "method": r.doc["method"],
        "images_s": {},
    }
    for key, id in KEYS.items():
        res["images_s"][key] = r.metric(id) if r.ok(id) else r.status(id)
    med = {k: v["median"] for k, v in res["images_s"].items() if isinstance(v, dict)}
    ratios = {}
    lim = med.get("limit_raw_libjpeg")
    for k in ("gpuload_off", "gpuload_on", "gpuload_fast_optin"):
        if lim and k in med:
            ratios[f"{k}_over_limit"] = med[k] / lim
    for g in ("gpuload_off", "gpuload_on", "gpuload_fast_optin"):
        for alt in ALTERNATIVES:
            if g in med and alt in med:
                ratios[f"{g}_over_{alt}"] = med[g] / med[alt]
    res["ratios"] = ratios
    res["targets"] = {
        "off >= 0.8x limit": ratios.get("gpuload_off_over_limit", 0) >= 0.8,
        "on >= 1.5x limit": ratios.get("gpuload_on_over_limit", 0) >= 1.5,
        "on >= 3x every alternative": all(
            ratios.get(f"gpuload_on_over_{a}", 0) >= 3 for a in ALTERNATIVES
        ),
    }
    write_json(res, args.out)
    for k, v in res["images_s"].items():
        print(f"{k:34s} {fmt(v) if isinstance(v, dict) else v}", file=sys.stderr)


if __name__ == "__main__":
    main()
