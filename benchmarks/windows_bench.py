"""Episode windows on the CPU (issue 15, "Speed"): gpuload's windowed loader against the obvious
alternatives a user writes, in the same run, on the demo episode table.

    python benchmarks/windows_bench.py [--episodes 50] [--size 480x640] [--repeats 3]
                                       [--min-time 8] [--warmup 3] [--out DIR] [--quick]
                                       [--batch-size 64]

The workload, the same for every case: batch 64, shuffled (seed 0), every row an anchor (no
``drop_incomplete``), windows ``action`` offsets 0..49, ``observation.state`` [-1, 0] and both
cameras [-1, 0] (edges padded by repeating the edge row, ``<column>_is_pad`` True), each camera
through RandomResizedCrop(224) + RandomHorizontalFlip + Normalize(ImageNet) into float32 NCHW,
one crop and flip per sample for both of its frames. Cases:

* ``gpuload.windows``: ``gpuload.pytorch(t, batch_size=64, episode=..., window=..., image=...)``
  on the CPU (``device="cpu"``); decoded frames from ``loader.stats().images["decoded"]`` (a
  frame several windows of a batch share is decoded once).
* ``gpuload.single_frame``: the same loader without ``episode``/``window`` (one frame per
  camera per sample): its decoded frames/s is the reference "per decoded frame".
* ``alt.row_by_row``: a torch Dataset whose ``__getitem__`` reads each row of the window one by
  one through gpuload's map-style dataset (``ds[j]``, one dataset per column), clamped to the
  anchor's episode (its bounds from the episode_index column, read once), PIL decode of every
  frame, then the transform below; ``DataLoader(batch_size=64, shuffle=True,
  num_workers=os.cpu_count(), persistent_workers=True)``.
* ``alt.lerobot_style``: LeRobot's ``LeRobotDataset.__getitem__``: episode bounds precomputed,
  per sample the clamped query indices and ``<key>_is_pad`` per key (``_get_query_indices``),
  one read per key of those rows (``_query_hf_dataset``, here ``t.read(rows, [key])``), PIL
  decode, the transform below, the same DataLoader.

The alternatives' transform is torchvision.transforms.v2's on a stacked (2, 3, H, W) uint8
tensor, written with torch ops (torchvision has no build for the CPU-only torch here):
``RandomResizedCrop.get_params`` (``gpuload.bench.workloads.rrc_params``), crop, bilinear
antialiased ``interpolate`` to 224x224, flip with p=0.5, ToDtype(float32, scale) and Normalize;
the alternatives decode 4 frames a sample.

Every case runs in a fresh process per repeat (``--child CASE``, one JSON line): the first
batch's shapes are checked, ``--warmup`` batches run untimed (kernel compile, worker start-up),
then batches are timed for at least ``--min-time`` s. Recorded per run: samples/s, decoded
frames/s, CPU % (the process and its DataLoader workers, psutil), peak RSS (getrusage: the main
process, and the largest worker once they have exited). The parent prints a markdown table with
medians (min-max) and the ratios, names the machine, and writes every run to ``DIR/windows.json``.
``--quick``: 6 episodes at 96x128, 1 repeat, 1.5 s, 1 warm-up batch (a smoke test, not a figure).
``--batch-size`` (default 64, the workload above; quick runs too): smaller only to make a smoke
test cheaper (the tests' run); figures are taken at 64.
The machine is noisy: quote the ratios of one run, never a number from another run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

BATCH = 64
SEED = 0
CAMS = ("cam_high", "cam_left_wrist")
WINDOW: dict[str, tuple[int, ...]] = {
    "action": tuple(range(0, 50)),
    "observation.state": (-1, 0),
    "cam_high": (-1, 0),
    "cam_left_wrist": (-1, 0),
}
COLUMNS = ("episode_index", "frame_index", "action", "observation.state", *CAMS)
CASES = ("gpuload.windows", "gpuload.single_frame", "alt.row_by_row", "alt.lerobot_style")
RATIOS = (  # (name, numerator case, denominator case, record key, goal)
    ("gpuload.windows / alt.row_by_row", "gpuload.windows", "alt.row_by_row", "samples_per_s", 5.0),
    (
        "gpuload.windows / alt.lerobot_style",
        "gpuload.windows",
        "alt.lerobot_style",
        "samples_per_s",
        5.0,
    ),
    (
        "per decoded frame: gpuload.windows frames/s ÷ gpuload.single_frame frames/s",
        "gpuload.windows",
        "gpuload.single_frame",
        "frames_decoded_per_s",
        0.8,
    ),
)
QUICK = {"episodes": 6, "size": "96x128", "repeats": 1, "min_time": 1.5, "warmup": 1}
DEFAULTS = {"episodes": 50, "size": "480x640", "repeats": 3, "min_time": 8.0, "warmup": 3}


def expected_shapes(case: str, batch: int = BATCH) -> dict[str, tuple[int, ...]]:
    """The shapes the first batch of ``case`` must have (the windowed cases all alike)."""
    if case == "gpuload.single_frame":
        cam = (batch, 3, 224, 224)
        return {"action": (batch, 14), "observation.state": (batch, 14), **dict.fromkeys(CAMS, cam)}
    shapes = {k: (batch, len(v), 14) for k, v in WINDOW.items() if k not in CAMS}
    shapes.update({c: (batch, len(WINDOW[c]), 3, 224, 224) for c in CAMS})
    shapes.update({f"{k}_is_pad": (batch, len(v)) for k, v in WINDOW.items()})
    return shapes


# -- the alternatives: torch Datasets a user writes ---------------------------------------------


class PairTransform:
    """torchvision.transforms.v2 RandomResizedCrop(224) + RandomHorizontalFlip + ToDtype(float32,
    scale=True) + Normalize on a stacked (K, 3, H, W) uint8 tensor, in torch ops: one crop and
    one flip for all K frames, as v2 does for a stacked tensor."""

    def __init__(self, size: int = 224) -> None:
        import torch

        from gpuload.bench.workloads import MEAN, STD

        self.size = size
        self.mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, frames):
        import torch
        import torch.nn.functional as F

        from gpuload.bench.workloads import rrc_params

        top, left, h, w = rrc_params(frames.shape[-1], frames.shape[-2])
        x = frames[..., top : top + h, left : left + w]
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        if torch.rand(1).item() < 0.5:
            x = x.flip(-1)
        return x.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)


def decode_stack(jpegs: list) -> Any:
    """PIL-decode JPEG bytes into one (K, 3, H, W) uint8 tensor."""
    import torch
    from PIL import Image

    arrs = [np.asarray(Image.open(io.BytesIO(bytes(b))).convert("RGB")) for b in jpegs]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)


def episode_bounds(table) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first row of its episode and one past its last (read once, in one go)."""
    ep = np.asarray(table.read(np.arange(len(table)), ["episode_index"])["episode_index"])
    change = np.flatnonzero(np.diff(ep)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(ep)]])
    lengths = ends - starts
    return np.repeat(starts, lengths), np.repeat(ends, lengths)


class _WindowDataset:
    """What both alternatives share: episode bounds, clamping, padding and the transform; a
    subclass says how the anchor and the window rows are read."""

    def __init__(self, table) -> None:
        self.table = table
        self.start, self.end = episode_bounds(table)
        self.transform = PairTransform()

    def __len__(self) -> int:
        return len(self.start)

    def query(self, i: int) -> tuple[dict[str, list[int]], dict[str, Any]]:
        """LeRobot's ``_get_query_indices``: clamped rows and ``<key>_is_pad`` per key."""
        import torch

        lo, hi = int(self.start[i]), int(self.end[i])
        rows = {k: [max(lo, min(hi - 1, i + d)) for d in v] for k, v in WINDOW.items()}
        pads = {
            f"{k}_is_pad": torch.tensor([not lo <= i + d < hi for d in v])
            for k, v in WINDOW.items()
        }
        return rows, pads

    def raw(self, i: int) -> tuple[dict[str, Any], dict[str, list]]:
        """(the anchor's values and the pad masks, each window's values: arrays or JPEG bytes)."""
        rows, item = self.query(i)
        item.update(self.anchor(i))
        return item, self.windows(rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Stack the numeric windows, decode and transform the camera windows."""
        import torch

        item, values = self.raw(i)
        for k, v in values.items():
            if k in CAMS:
                item[k] = self.transform(decode_stack(v))
            else:
                item[k] = torch.from_numpy(np.stack(v))
        return item


class RowByRow(_WindowDataset):
    """Each row of each window read on its own through gpuload's map-style dataset (``ds[j]``,
    one dataset per column, so a row read fetches only that column)."""

    def __init__(self, table) -> None:
        import gpuload

        super().__init__(table)
        self.anchor_ds = gpuload.pytorch(table, columns=["episode_index", "frame_index"])
        self.ds = {k: gpuload.pytorch(table, columns=[k]) for k in WINDOW}

    def anchor(self, i: int) -> dict[str, int]:
        """The anchor's episode and frame index: one row read."""
        return {k: int(v) for k, v in self.anchor_ds[i].items()}

    def windows(self, rows: dict[str, list[int]]) -> dict[str, list]:
        """Each key's window, one row read per offset."""
        return {k: [self.ds[k][j][k] for j in js] for k, js in rows.items()}


class LeRobotStyle(_WindowDataset):
    """LeRobot's ``__getitem__``: the anchor row, then one read per key of its query rows
    (``_query_hf_dataset``)."""

    def anchor(self, i: int) -> dict[str, int]:
        """The anchor's episode and frame index (LeRobot reads the whole anchor row)."""
        row = self.table.read([i], ["episode_index", "frame_index"])
        return {k: int(v[0]) for k, v in row.items()}

    def windows(self, rows: dict[str, list[int]]) -> dict[str, list]:
        """Each key's window in one read of its rows."""
        return {k: list(self.table.read(js, [k])[k]) for k, js in rows.items()}


# -- one case in a fresh process -----------------------------------------------------------------


def build(case: str, table, batch: int = BATCH) -> tuple[Any, Callable[[], int] | None, int]:
    """(loader, decoded-frame counter or None, DataLoader workers) for ``case``."""
    import torch

    import gpuload
    from gpuload.bench.workloads import ops_list

    if case.startswith("gpuload."):
        kw: dict[str, Any] = {
            "episode": "episode_index",
            "window": {k: list(v) for k, v in WINDOW.items()},
        }
        loader = gpuload.pytorch(
            table,
            batch_size=batch,
            shuffle=True,
            seed=SEED,
            device="cpu",
            image={c: ops_list() for c in CAMS},
            columns=list(COLUMNS),
            **(kw if case == "gpuload.windows" else {}),
        )
        return loader, lambda: int(loader.stats().images.get("decoded", 0)), 0
    dataset = {"alt.row_by_row": RowByRow, "alt.lerobot_style": LeRobotStyle}[case](table)
    workers = os.cpu_count() or 1
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=True
    )
    return loader, None, workers


def _forever(loader) -> Iterator[Any]:
    """Batches across epochs (each pass over the loader is the next epoch)."""
    while True:
        yield from loader


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants (the workers)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            c = p.cpu_times()
        except psutil.Error:
            continue
        total += c.user + c.system
    return total


def _rss_sum_mb() -> float:
    """Resident memory of this process and its live descendants now, MB (shared pages counted
    once per process)."""
    import psutil

    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total / 1e6


def check_shapes(case: str, batch: dict, size: int = BATCH) -> dict[str, list[int]]:
    """The first batch's shapes of the expected keys (``size`` samples); raises when one
    differs."""
    want = expected_shapes(case, size)
    got = {k: list(batch[k].shape) for k in want if k in batch}
    bad = {k: (got.get(k), list(v)) for k, v in want.items() if got.get(k) != list(v)}
    if bad:
        raise AssertionError(f"{case}: first batch shapes (got, expected): {bad}")
    for c in CAMS:
        if not batch[c].dtype.is_floating_point:
            raise AssertionError(f"{case}: {c} is {batch[c].dtype}, expected float32")
    return got


def timed(batches: Iterator[Any], min_time: float, counter) -> dict[str, float]:
    """Pull batches for at least ``min_time`` s (and 2 batches): samples, seconds, decoded
    frames (``counter`` before and after, None: not counted), CPU % over that span."""
    d0 = counter() if counter else None
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    samples = n = 0
    while True:
        samples += len(next(batches)["episode_index"])
        n += 1
        seconds = time.perf_counter() - t0
        if seconds >= min_time and n >= 2:
            break
    cpu = _cpu_seconds() - cpu0
    return {
        "samples": samples,
        "batches": n,
        "seconds": seconds,
        "decoded": None if counter is None else counter() - d0,
        "cpu_pct": 100 * cpu / seconds,
        "rss_sum_end_mb": _rss_sum_mb(),
    }


def child(
    case: str, table_path: str, min_time: float, warmup: int, batch: int = BATCH
) -> dict[str, Any]:
    """Build ``case``, check its first batch, warm up, time it: one run's record."""
    import gc

    import gpuload

    table = gpuload.open_table(table_path)
    loader, counter, workers = build(case, table, batch)
    batches = _forever(loader)
    t0 = time.perf_counter()
    shapes = check_shapes(case, next(batches), batch)
    first_batch_s = time.perf_counter() - t0
    for _ in range(warmup):
        next(batches)
    r = timed(batches, min_time, counter)
    frames_per_sample = 2 if case == "gpuload.single_frame" else 4
    decoded = r["decoded"] if r["decoded"] is not None else r["samples"] * frames_per_sample
    batches.close()
    del batches, loader
    gc.collect()  # DataLoader workers exit here: their peak RSS reaches RUSAGE_CHILDREN
    return {
        "case": case,
        **{k: v for k, v in r.items() if k != "decoded"},
        "samples_per_s": r["samples"] / r["seconds"],
        "frames_decoded": decoded,
        "frames_decoded_per_s": decoded / r["seconds"],
        "frames_decoded_counted_by": "loader.stats()" if counter else "4 per sample (PIL)",
        "frames_out_per_s": r["samples"] * frames_per_sample / r["seconds"],
        "first_batch_s": first_batch_s,
        "warmup_batches": warmup,
        "workers": workers,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if workers
        else None,
        "shapes": shapes,
        "shapes_ok": True,
    }


# -- the parent: table, runs, summary ------------------------------------------------------------


def run_child(case: str, table: str, args: argparse.Namespace) -> dict[str, Any]:
    """One fresh process for ``case``; its JSON record, or an ``error`` record."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--table", table]
    cmd += ["--min-time", str(args.min_time), "--warmup", str(args.warmup)]
    cmd += ["--batch-size", str(args.batch_size)]
    timeout = 300 + 4 * args.min_time
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"case": case, "error": f"exit {p.returncode}: {p.stderr.strip()[-2000:]}"}
    return json.loads(lines[-1])


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per case: median, min and max of each rate over the runs that succeeded."""
    out: dict[str, Any] = {}
    keys = ("samples_per_s", "frames_decoded_per_s", "cpu_pct", "peak_rss_mb", "worker_peak_rss_mb")
    for case in CASES:
        ok = [r for r in runs if r["case"] == case and "error" not in r]
        s: dict[str, Any] = {
            "runs": len(ok),
            "errors": sum(r["case"] == case for r in runs) - len(ok),
        }
        for k in keys:
            vals = sorted(r[k] for r in ok if r.get(k) is not None)
            if vals:
                s[k] = {"median": statistics.median(vals), "min": vals[0], "max": vals[-1]}
        out[case] = s
    return out


def ratios(runs: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """Each ratio of medians, with the range of the per-repeat ratios (same repeat's pair)."""
    out = {}
    for name, a, b, key, goal in RATIOS:
        ma, mb = summary[a].get(key), summary[b].get(key)
        if not ma or not mb:
            out[name] = None
            continue
        by = {(r["case"], r["repeat"]): r[key] for r in runs if "error" not in r}
        per = sorted(by[a, k] / by[b, k] for (c, k) in by if c == a and (b, k) in by)
        value = ma["median"] / mb["median"]
        out[name] = {
            "value": value,
            "min": per[0],
            "max": per[-1],
            "goal": goal,
            "met": value >= goal,
        }
    return out


def _fmt(s: dict[str, float] | None, digits: int = 0) -> str:
    """``median (min-max)`` of a summary entry; ``-`` when missing."""
    if not s:
        return "-"
    f = f"{{:,.{digits}f}}"
    return f"{f.format(s['median'])} ({f.format(s['min'])}-{f.format(s['max'])})"


def report(result: dict[str, Any]) -> str:
    """The markdown table, the ratios and the machine line."""
    m, v, t = result["machine"], result["versions"], result["table"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['ram_gib']} GiB RAM, GPU {m['gpu']}, Python {m['python']}, "
        f"load {m['loadavg_1min_at_start'] or 0:.2f}; "
        + ", ".join(f"{k} {v[k]}" for k in ("gpuload", "torch", "numba", "pillow", "simplejpeg")),
        f"table: {t['path']} ({t['episodes']} episodes, {t['rows']:,} rows, {t['size']}); "
        f"batch {result['workload']['batch_size']}, "
        "window action 50 + state 2 + 2 cameras x 2 frames, shuffled, CPU; "
        f"medians of {result['args']['repeats']} fresh processes (min-max), "
        f">= {result['args']['min_time']} s timed each",
        "",
        "| case | samples/s | decoded frames/s | CPU % | peak RSS MB (main / largest worker) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for case, s in result["summary"].items():
        rss = _fmt(s.get("peak_rss_mb"))
        if s.get("worker_peak_rss_mb"):
            rss += f" / {_fmt(s['worker_peak_rss_mb'])}"
        err = f" ({s['errors']} failed)" if s["errors"] else ""
        lines.append(
            f"| {case}{err} | {_fmt(s.get('samples_per_s'), 1)} | "
            f"{_fmt(s.get('frames_decoded_per_s'))} | {_fmt(s.get('cpu_pct'))} | {rss} |"
        )
    lines.append("")
    for name, r in result["ratios"].items():
        if r is None:
            lines.append(f"- {name}: - (a case failed)")
            continue
        verdict = "met" if r["met"] else "NOT met"
        lines.append(
            f"- {name}: {r['value']:.2f}x (per repeat {r['min']:.2f}-{r['max']:.2f}); "
            f"goal >= {r['goal']:g}x: {verdict}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; ``--quick`` fills the ones not given with ``QUICK``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int)
    p.add_argument("--size", help="HxW of the camera images (default 480x640)")
    p.add_argument("--repeats", type=int, help="fresh processes per case")
    p.add_argument("--min-time", type=float, help="timed seconds per run, at least")
    p.add_argument("--warmup", type=int, help="untimed batches after the first")
    p.add_argument(
        "--batch-size",
        type=int,
        default=BATCH,
        help=f"samples per batch (default {BATCH}; smaller only for a cheaper smoke test)",
    )
    p.add_argument("--out", help="folder for windows.json")
    p.add_argument("--quick", action="store_true", help="a tiny table and short runs")
    p.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--table", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {a.batch_size}")
    for k, v in (QUICK if a.quick else DEFAULTS).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def ensure_table(a: argparse.Namespace) -> dict[str, Any]:
    """The demo episode table in the bench's cache (made once per arguments); its description."""
    import gpuload
    from gpuload.bench.suites import cache_root
    from gpuload.demo import ensure_episode_table

    h, w = (int(x) for x in a.size.lower().split("x"))
    path, made = ensure_episode_table(cache_root(), a.episodes, SEED, size=(h, w))
    return {
        "path": path,
        "generated_now": made,
        "episodes": a.episodes,
        "rows": len(gpuload.open_table(path)),
        "size": f"{h}x{w}",
    }


def main(argv: list[str] | None = None) -> int:
    """Run one case (``--child``) or all of them; exit 1 when a run failed."""
    a = parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.table, a.min_time, a.warmup, a.batch_size)))
        return 0
    from gpuload.bench.machine import machine, versions

    mach = machine()  # before the table and the runs: the load average at start
    print(f"episode table ({a.episodes} episodes, {a.size}) ...", file=sys.stderr)
    table = ensure_table(a)
    runs = []
    for rep in range(a.repeats):  # cases interleaved, so a noisy minute spreads over all of them
        for case in CASES:
            r = {**run_child(case, table["path"], a), "repeat": rep}
            runs.append(r)
            rate = f"{r['samples_per_s']:,.1f} samples/s" if "error" not in r else r["error"]
            print(f"  repeat {rep + 1}/{a.repeats} {case}: {rate}", file=sys.stderr)
    summary = summarise(runs)
    result = {
        "machine": mach,
        "versions": versions(),
        "args": {k: v for k, v in vars(a).items() if k not in ("child", "table")},
        "table": table,
        "workload": {
            "batch_size": a.batch_size,
            "seed": SEED,
            "shuffle": True,
            "window": {k: list(v) for k, v in WINDOW.items()},
            "columns": list(COLUMNS),
            "image_ops": "RandomResizedCrop(224), RandomHorizontalFlip(), Normalize(ImageNet)",
            "expected_shapes": {c: expected_shapes(c, a.batch_size) for c in CASES},
        },
        "runs": runs,
        "summary": summary,
        "ratios": ratios(runs, summary),
    }
    print(report(result))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "windows.json"), "w") as f:
            json.dump(result, f, indent=1)
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
