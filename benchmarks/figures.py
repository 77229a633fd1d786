#!/usr/bin/env python
"""Every figure quoted in README.md and benchmarks/RESULTS.md, mapped to the ``gpuload bench``
case it comes from (gpuload/bench/suites.py), and the command that measures it again.

    python benchmarks/figures.py SET [--rows N] [--repeats R] [--out FILE.json]

SET is one of ``FIGURES`` below. The set's suites run through ``gpuload bench`` (every case in
fresh processes, warm-up excluded, median with min-max of R); the JSON holds each figure under
its name with the case id it came from, the ratios between figures of the same run, the goals
a figure is held to (``startup``: the image fast path's time to first batch), and the run's
machine, versions and method. Figures not made here: ``gpuload bench --out
benchmarks/results/bench-default`` (the README's main command) and ``bench_faults.py``
(fault injection, with its own counters).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gpuload.bench.measure import fmt  # noqa: E402
from gpuload.bench.runner import BenchConfig, run  # noqa: E402

__all__ = ["FIGURES", "FigureSet", "Results", "measure", "run_suites", "write_json"]


@dataclass(frozen=True)
class FigureSet:
    """Figures of one section of RESULTS.md: ``figures`` maps a figure's name to its case id
    (``"id"`` or ``"id:metric"``, rows/s by default; ``{rows}`` is the table's rows), or is
    empty to take every case of the suites under its id. ``ratios``: name -> (figure, over
    figure, target or None). ``goals``: name -> (figure, the most its median may be: a time).
    ``only`` / ``skip``: case id prefixes to run / leave out; ``remote``: run with --remote."""

    quoted: str
    suites: tuple[str, ...]
    rows: int = 5000
    figures: dict[str, str] = field(default_factory=dict)
    ratios: dict[str, tuple[str, str, float | None]] = field(default_factory=dict)
    goals: dict[str, tuple[str, float]] = field(default_factory=dict)
    only: tuple[str, ...] | None = None
    skip: tuple[str, ...] | None = None
    remote: bool = False
    batch_sizes: tuple[int, ...] = (64, 128, 256)
    loader_workers: int | None = None


def _both(name: str, id: str, metrics=("rows_s", "mb_s")) -> dict[str, str]:
    return {f"{name}_{m}": f"{id}:{m}" for m in metrics}


def _memory(loader: str) -> dict[str, str]:
    """Peak RSS and what one epoch added to it, for the table and the 4x table."""
    return {
        f"memory_{size}_{m}": f"memory.{loader}.{size}:{m}"
        for size in ("1x", "4x")
        for m in ("peak_rss_mb", "rss_growth_mb")
    }


_TABLES = {
    **_both("ingest", "ingest.gpuload.{rows}", ("rows_s", "mb_s", "disk_mb_s", "fraction_of_disk")),
    **_both("local_seq", "stream.local.seq.bs128"),
    **_both("local_shuffle", "stream.local.shuffle.bs128"),
    "local_seq_noverify": "stream.local.seq.bs128.noverify",
    "local_shuffle_noverify": "stream.local.shuffle.bs128.noverify",
    "local_seq_bs64": "stream.local.seq.bs64",
    "local_seq_bs256": "stream.local.seq.bs256",
    **_both("s3_seq_cold", "stream.s3.seq.cold"),
    **_both("s3_seq_cached", "stream.s3.seq.cached"),
    **_both("s3_seq_nocache", "stream.s3.seq_nocache"),
    "s3_shuffle_cold": "stream.s3.shuffle.cold",
    "s3_shuffle_cached": "stream.s3.shuffle.cached",
    **_memory("stream"),
    "deeplake_ingest": "ingest.deeplake.{rows}",
    "deeplake_stream": "stream.deeplake.seq.bs128",
}
_LOADER = {
    "fast_path_shuffle": "loader.fast.shuffle",
    "dataloader_w2_shuffle": "loader.dataloader.w2.shuffle",
    "dataloader_w0_shuffle": "loader.dataloader.w0.shuffle",
    "s3_dataloader_w0_epoch1": "loader.s3.dataloader.w0.cold",
    "s3_dataloader_w0_epoch2": "loader.s3.dataloader.w0.cached",
    "s3_fast_path_epoch1": "loader.s3.fast.cold",
    "s3_fast_path_epoch2": "loader.s3.fast.cached",
    "deeplake_dataloader_w0_shuffle": "loader.deeplake.w0.shuffle",
    **_memory("fast"),
}
_E2E = {
    "limit_raw_libjpeg": "decode.raw_libjpeg",
    "gpuload_off": "e2e.gpuload.off",
    "gpuload_on": "e2e.gpuload.on",
    "gpuload_on_noverify": "e2e.gpuload.on.noverify",
    "gpuload_fast_optin": "e2e.gpuload.fast",
    "gpuload_tensorflow": "e2e.gpuload.tf",
    "gpuload_jax": "e2e.gpuload.jax",
    "dataloader_gpuload_pil_transform": "e2e.gpuload.dataloader",
    "torch_dataloader_pil": "e2e.torch_pil",
    "deeplake_pytorch": "e2e.deeplake",
    "dali_cpu": "e2e.dali",
}
# The startup suite's rows: gpuload's cold and warm, the peers' one row (no on-disk cache),
# and the image fast path and peers again with 2 s between building and iterating.
_STARTUP_ROWS = (
    *(f"gpuload.{c}.{p}" for c in ("image", "plain", "dataloader", "tf") for p in ("cold", "warm")),
    "torch_pil",
    "dali",
    "gpuload.image.idle",
    "torch_pil.idle",
    "dali.idle",
)
_STARTUP = {
    f"{row.replace('gpuload.', '').replace('.', '_')}_{m}": f"startup.{row}:{m}"
    for row in _STARTUP_ROWS
    for m in ("first_batch_s", "process_s")
}

# The HTTP object server rows (--remote) at each delay, first epoch (cold) and second (cached),
# with the server's counters for the first; the local rows they are compared with.
_HTTP_ROWS = {
    "seq": ("stream", "seq", True),
    "shuffle": ("stream", "shuffle", True),
    "seq_nocache": ("stream", "seq_nocache", False),
    "shuffle_nocache": ("stream", "shuffle_nocache", False),
    "shuffle_nocache_fixed16": ("stream", "shuffle_nocache_fixed16", False),
    "fast_path": ("loader", "fast", True),
    "image": ("e2e", "image", True),
}
_LOCAL_ROWS = {
    "seq": "stream.local.seq.bs128",
    "shuffle": "stream.local.shuffle.bs128",
    "fast_path": "loader.fast.shuffle",
    "image": "e2e.gpuload.on",
}


def _http_figures(ms: int) -> dict[str, str]:
    """Figures of the rows read from the HTTP server at ``ms`` ms per request."""
    out = {}
    for name, (prefix, case, cached) in _HTTP_ROWS.items():
        id = f"{prefix}.http{ms}.{case}"
        first = f"{id}.cold" if cached else id
        out[f"http{ms}_{name}_epoch1"] = first
        if cached:
            out[f"http{ms}_{name}_epoch2"] = f"{id}.cached"
        for m in ("server_requests", "peak_in_flight"):
            out[f"http{ms}_{name}_epoch1_{m}"] = f"{first}:{m}"
    return out


def _http_ratios() -> dict[str, tuple[str, str, float | None]]:
    """First epochs over local disk (the issue's goals at 20 ms: sequential >= 0.5, shuffled
    >= 0.3, the image fast path >= 0.9) and over the same row at 0 ms."""
    goals = {"seq": 0.5, "shuffle": 0.3, "image": 0.9}
    out: dict[str, tuple[str, str, float | None]] = {}
    for ms in (20, 50):
        for name in _HTTP_ROWS:
            fig = f"http{ms}_{name}_epoch1"
            local = _LOCAL_ROWS.get(name.replace("_nocache", ""))
            if local is not None:
                target = goals.get(name) if ms == 20 else None
                out[f"{fig}_over_local"] = (fig, f"local_{name.replace('_nocache', '')}", target)
            out[f"{fig}_over_http0"] = (fig, f"http0_{name}_epoch1", None)
    for ms in (0, 20, 50):  # the adaptive in-flight limit over the fixed 16 it replaced
        fig = f"http{ms}_shuffle_nocache_epoch1"
        out[f"{fig}_over_fixed16"] = (fig, f"http{ms}_shuffle_nocache_fixed16_epoch1", None)
    return out


_REMOTE = {
    **{f"local_{name}": id for name, id in _LOCAL_ROWS.items()},
    **{k: v for ms in (0, 20, 50) for k, v in _http_figures(ms).items()},
}

FIGURES: dict[str, FigureSet] = {
    "tables": FigureSet(
        "README 'Figures' rows 1-3 and 10; RESULTS.md 'Tables (issue 2)'",
        ("ingest", "stream", "memory"),
        rows=20000,
        remote=True,
        only=(
            "ingest.gpuload.{rows}",
            "ingest.deeplake.{rows}",
            "stream.local.",
            "stream.deeplake.seq.bs128",
            "stream.s3.",
            "memory.stream.",
        ),
        figures=_TABLES,
        ratios={
            "verify_cost_seq": ("local_seq_rows_s", "local_seq_noverify", None),
            "verify_cost_shuffle": ("local_shuffle_rows_s", "local_shuffle_noverify", None),
            "shuffle_over_seq": ("local_shuffle_rows_s", "local_seq_rows_s", None),
            "s3_over_local": ("s3_seq_cold_rows_s", "local_seq_rows_s", None),
            "ingest_vs_deeplake": ("ingest_rows_s", "deeplake_ingest", None),
            "stream_vs_deeplake": ("local_seq_rows_s", "deeplake_stream", None),
        },
    ),  # fmt: skip
    "loader": FigureSet(
        "README 'Figures' rows 4-6; RESULTS.md 'Loader (issue 3)'",
        ("stream", "memory"),
        rows=20000,
        remote=True,
        only=(
            "loader.fast.",
            "loader.dataloader.",
            "loader.deeplake.",
            "loader.s3.",
            "memory.fast.",
        ),
        batch_sizes=(128,),
        loader_workers=2,
        figures=_LOADER,
        ratios={
            "fast_path_vs_deeplake": ("fast_path_shuffle", "deeplake_dataloader_w0_shuffle", None)
        },
    ),
    "e2e": FigureSet(
        "README 'Figures' row 7 and the JAX door row; RESULTS.md 'Decode and augmentation "
        "(issue 4)' and 'The JAX door (issue 14)'",
        ("e2e",),
        figures=_E2E,
        ratios={
            "off_over_limit": ("gpuload_off", "limit_raw_libjpeg", 0.8),
            "on_over_limit": ("gpuload_on", "limit_raw_libjpeg", 1.5),
            "jax_over_torch_door": ("gpuload_jax", "gpuload_on", 0.9),
            **{
                f"on_over_{alt}": ("gpuload_on", alt, 3.0)
                for alt in ("torch_dataloader_pil", "deeplake_pytorch", "dali_cpu")
            },
        },
    ),
    "startup": FigureSet(
        "RESULTS.md 'Time to first batch': fresh process, cold and warm caches",
        ("startup",),
        figures=_STARTUP,
        goals={
            "image_cold_first_batch": ("image_cold_first_batch_s", 2.0),
            "image_warm_first_batch": ("image_warm_first_batch_s", 0.3),
        },
    ),
    "remote": FigureSet(
        "RESULTS.md 'Remote throughput': the HTTP object server at 0, 20 and 50 ms per request",
        ("stream", "e2e"),
        remote=True,
        only=(*_LOCAL_ROWS.values(), "stream.http", "loader.http", "e2e.http"),
        skip=("e2e.gpuload.on.noverify",),
        batch_sizes=(128,),
        figures=_REMOTE,
        ratios=_http_ratios(),
    ),
    "codecs": FigureSet("RESULTS.md 'Decode backends' (every case, by id)", ("codecs",)),
    "kernel": FigureSet(
        "README 'Figures' row 8; RESULTS.md 'Fused kernel alone' (every case, by id)",
        ("kernel",),
    ),
}


class Results:
    """The entries of one ``gpuload bench`` run, by id."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.by_id = {e["id"]: e for e in doc["results"]}

    def ok(self, id: str) -> bool:
        e = self.by_id.get(id)
        return e is not None and e["status"] == "ok"

    def metric(self, id: str, key: str = "rows_s") -> dict[str, float]:
        """``{median, min, max, n}`` of one metric of one case; KeyError if it did not run."""
        e = self.by_id[id]
        if e["status"] != "ok":
            raise KeyError(f"{id} did not run: {e['status']}: {e.get('reason', '')}")
        return e["metrics"][key]

    def status(self, id: str) -> str:
        e = self.by_id.get(id)
        if e is None:
            return "not measured"
        return "ok" if e["status"] == "ok" else f"{e['status']} ({e.get('reason', '')})"


def run_suites(
    suites, rows: int, repeats: int, workdir: str, only=None, remote=False,
    batch_sizes=(64, 128, 256), loader_workers=None, device: str = "cpu", skip=None,
) -> Results:  # fmt: skip
    """``gpuload bench`` on a demo table of ``rows`` rows, selected suites and case prefixes."""
    cfg = BenchConfig(
        rows=rows, repeats=repeats, suites=list(suites), batch_sizes=list(batch_sizes),
        remote=remote, cache_dir=workdir, only=list(only) if only else None, device=device,
        loader_workers=loader_workers, startup_repeats=repeats, skip=list(skip) if skip else None,
    )  # fmt: skip
    return Results(run(cfg))


def measure(fs: FigureSet, rows: int | None, repeats: int, workdir: str) -> dict[str, Any]:
    """Run one figure set and collect its figures and ratios."""
    n = rows or fs.rows
    only = [p.format(rows=n) for p in fs.only] if fs.only else None
    r = run_suites(fs.suites, n, repeats, workdir, only, fs.remote, fs.batch_sizes,
                   fs.loader_workers, skip=fs.skip)  # fmt: skip
    wanted = {k: v.format(rows=n) for k, v in fs.figures.items()} or {
        e["id"]: e["id"] for e in r.doc["results"]
    }
    figures: dict[str, Any] = {}
    for name, ref in wanted.items():
        id, _, key = ref.partition(":")
        figures[name] = {"case": id, **r.metric(id, key or "rows_s")} if r.ok(id) else r.status(id)
        if not fs.figures and r.ok(id) and "compile_s" in r.by_id[id]["metrics"]:
            figures[name]["compile_s"] = r.metric(id, "compile_s")["median"]
    ratios = {}
    for name, (a, b, target) in fs.ratios.items():
        if isinstance(figures.get(a), dict) and isinstance(figures.get(b), dict):
            v = figures[a]["median"] / figures[b]["median"]
            ratios[name] = (
                v if target is None else {"value": v, "target": target, "met": v >= target}
            )
    goals = {}
    for name, (fig, most) in fs.goals.items():
        if isinstance(figures.get(fig), dict):
            v = figures[fig]["median"]
            goals[name] = {"value": v, "at_most": most, "met": v <= most}
    doc = r.doc
    return {"quoted": fs.quoted, "machine": doc["machine"], "versions": doc["versions"],
            "rows": n, "repeats": repeats, "method": doc["method"], "figures": figures,
            "ratios": ratios, **({"goals": goals} if goals else {})}  # fmt: skip


def write_json(res: dict[str, Any], out: str | None) -> None:
    text = json.dumps(res, indent=2)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
    print(text)


def _text(v) -> str:
    """A figure as ``median (min-max)``: whole numbers for rates, 2-3 decimals for seconds."""
    if not isinstance(v, dict):
        return str(v)
    return fmt(v, 0 if v["median"] >= 100 else 2 if v["median"] >= 1 else 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("set", choices=sorted(FIGURES))
    ap.add_argument("--rows", type=int, default=None, help="demo rows (default: the set's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "gpuload-bench"))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = measure(FIGURES[a.set], a.rows, a.repeats, a.workdir)
    write_json(res, a.out)
    for name, v in res["figures"].items():
        print(f"{name:44s} {_text(v)}", file=sys.stderr)


if __name__ == "__main__":
    main()
