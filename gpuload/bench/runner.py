"""``gpuload bench``: the standalone benchmark runner.

    gpuload bench [TABLE] [--rows N] [--device auto|cpu|cuda] [--batch-sizes 64,128,256]
                  [--suite ingest,stream,decode,e2e,train,startup] [--remote] [--out DIR]
                  [--json] [--repeats R] [--startup-repeats R] [--quick]

With no TABLE it generates the demo table (480x640 JPEG + float32[14] + label + text) in a
cache folder first, reused by later runs. Every measurement runs in a fresh process, ``R``
times, round-robin over the suite's measurements (so a burst of load from elsewhere hits them
all alike); warm-up is excluded in each process (the startup suite, which times a fresh
process's first batches, excludes nothing); the report quotes the median with min-max.
Peers (torch DataLoader + PIL, Deeplake, DALI) run on the same rows in the same run; one that
is not installed is reported as missing, one without the hardware it needs as not run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..stats import STAGES
from . import suites as S
from .measure import ChildError, percentile, run_child, summarize

__all__ = ["BenchConfig", "run", "run_measurements", "add_arguments", "main", "DEFAULT_ROWS"]

DEFAULT_ROWS = 5000
QUICK_ROWS = 500
DEFAULT_REPEATS = 3
DEFAULT_TRAIN_REPEATS = 1  # the training runs are long; see --train-repeats
# One process per startup row keeps the suite under ~2 minutes of a default run on 2 cores
# (2 per row: ~2.8 min); --startup-repeats or benchmarks/figures.py startup for the spread.
DEFAULT_STARTUP_REPEATS = 1
LATENCY_SAMPLE = 400


@dataclass
class BenchConfig:
    table: str | None = None
    rows: int | None = None
    seed: int = 0
    device: str = "auto"
    batch_sizes: list[int] = field(default_factory=lambda: [64, 128, 256])
    suites: list[str] = field(default_factory=lambda: list(S.DEFAULT_SUITES))
    remote: bool = False
    out: str | None = None
    json: bool = False
    repeats: int | None = None
    train_repeats: int | None = None
    startup_repeats: int | None = None
    quick: bool = False
    cache_dir: str | None = None
    train_steps: int | None = None
    min_batches: int | None = None  # fewer timed batches per run, for a cheaper smoke run
    progress: bool | None = None  # None: when stderr is a terminal
    only: list[str] | None = None  # id prefixes to keep (and skip: drop)
    skip: list[str] | None = None
    install_peers: bool = False
    timing: S.Timing | None = None
    loader_workers: int | None = None  # DataLoader workers in the stream suite (default: cores)
    time_limit_s: float | None = None  # no run starts after this many seconds of measuring

    def resolved_rows(self) -> int:
        if self.rows is not None:
            return self.rows
        return QUICK_ROWS if self.quick else DEFAULT_ROWS

    def resolved_repeats(self) -> int:
        if self.repeats is not None:
            return self.repeats
        return 1 if self.quick else DEFAULT_REPEATS

    def resolved_train_repeats(self) -> int:
        if self.train_repeats is not None:
            return self.train_repeats
        return min(self.resolved_repeats(), DEFAULT_TRAIN_REPEATS)

    def resolved_startup_repeats(self) -> int:
        if self.startup_repeats is not None:
            return min(self.resolved_repeats(), self.startup_repeats)
        return min(self.resolved_repeats(), DEFAULT_STARTUP_REPEATS)


class Log:
    """Messages on stderr that do not break a progress bar."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)


# -- one measurement, R repetitions ------------------------------------------------------------
# Metrics that are >= 0 by definition and may measure exactly 0: memory growth while streaming
# (a loader that allocates nothing more) and time spent waiting on data. Every other number in a
# result is a rate, a duration, a size or a ratio, and must be > 0.
# A loader stage's share of the time may be 0 too (no decode without image ops).
STAGE_NAMES = STAGES
# A startup run's cache may hold no file at all (it should not, when cold). A cached epoch
# from the HTTP object server may send it no request at all (every block in the disk cache).
SERVER_KEYS = ("server_requests", "peak_in_flight", "served_mb_s")
ZERO_ALLOWED = frozenset(
    {
        "rss_growth_mb",
        "wait_pct",
        "kernel_cache_files_at_start",
        "numba_cache_files_at_start",
        *SERVER_KEYS,
        *(f"stage_{s}_pct" for s in STAGE_NAMES),
    }
)
# What a startup run measured (seconds, and what its caches held at the start).
STARTUP_KEYS = (
    "first_batch_s",
    "loader_first_batch_s",
    "second_batch_s",
    "build_s",
    "import_s",
    "harness_s",
    "process_s",
    "kernel_cache_files_at_start",
    "numba_cache_files_at_start",
)
# Facts a record states besides numbers, kept per repetition in the entry ("notes").
NOTE_KEYS = ("preimported", "cold", "cache_dir")


def _record_metrics(rec: dict, cores: int) -> dict[str, float]:
    """Per-repetition metrics from a child record."""
    wall = rec["wall_s"]
    m = {
        "rows_s": rec["rows"] / wall,
        "mb_s": rec["bytes"] / wall / 1e6,
        "gbit_s": rec["bytes"] * 8 / wall / 1e9,
        "wall_s": wall,
        "cpu_util_pct": 100.0 * rec["cpu_s"] / wall / cores,
        "peak_rss_mb": rec["peak_rss"] / 1e6,
    }
    if "rss_growth" in rec:
        m["rss_growth_mb"] = rec["rss_growth"] / 1e6
    lat = rec.get("latencies") or []
    if lat:
        m["p50_ms"] = percentile(lat, 50) * 1e3
        m["p99_ms"] = percentile(lat, 99) * 1e3
    for k in (
        "disk_mb_s", "fraction_of_disk", "steps_s", "loss_first", "loss_last", "compile_s",
        "copy_gb_s", "x_copy", "consumer_wait_ms",
    ):  # fmt: skip
        if k in rec:
            m[k] = rec[k]
    if "wait_fraction" in rec:
        m["wait_pct"] = 100.0 * rec["wait_fraction"]
    if "gpu_mem_peak" in rec:
        m["gpu_mem_alloc_mb"] = rec["gpu_mem_peak"] / 1e6
    for k in STARTUP_KEYS:  # first_batch_s: also what a loader's stats() said elsewhere
        if rec.get(k) is not None:
            m[k] = rec[k]
    if "server_requests" in rec:  # the HTTP object server's own counters over the phase
        m.update(
            server_requests=rec["server_requests"],
            peak_in_flight=rec["peak_in_flight"],
            served_mb_s=rec["server_bytes"] / rec["server_wall_s"] / 1e6,
            server_wall_s=rec["server_wall_s"],  # the epoch as the server's counters saw it
        )
    total = sum((rec.get("stages") or {}).values())
    if total > 0:
        for k in STAGE_NAMES:
            m[f"stage_{k}_pct"] = 100.0 * rec["stages"].get(k, 0.0) / total
    for k in ("gpu_util_pct", "gpu_mem_mb"):
        if k in rec:
            m[k] = rec[k]
    return m


def _downsample(values: list[float], n: int) -> list[float]:
    if len(values) <= n:
        return list(values)
    step = len(values) / n
    return [values[int(i * step)] for i in range(n)]


def _entry(m: S.Measurement, suffix: str, status: str, **kw) -> dict[str, Any]:
    e = {
        "id": m.id + suffix,
        "suite": m.suite,
        "group": m.group,
        "label": m.label + (f" [{suffix.strip('.')}]" if suffix else ""),
        "system": m.system,
        "peer": m.is_peer,
        "batch_size": m.batch_size,
        "unit": m.unit,
        "status": status,
    }
    if m.info:
        e["info"] = dict(m.info)
    e.update(kw)
    return e


def _unrunnable(measurements, has_gpu: bool) -> dict[str, tuple[str, str]]:
    """{id: (status, reason)} for what cannot run here: no GPU, or a peer not installed."""
    skip: dict[str, tuple[str, str]] = {}
    for m in measurements:
        if m.needs_gpu and not has_gpu:
            skip[m.id] = ("not run", "needs a CUDA GPU; none here")
            continue
        miss = S.missing_modules(m.requires)
        if miss:
            skip[m.id] = ("missing", f"{', '.join(miss)} not installed: {S.install_hint(miss)}")
    return skip


def _progress_bar(total: int, progress: bool | None, log):
    show = sys.stderr.isatty() if progress is None else progress
    if not (show and total):
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a core dependency
        return None
    bar = tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr, leave=False)
    if isinstance(log, Log):
        log.bar = bar
    return bar


def _run_once(m: S.Measurement, resources: S.Resources) -> dict:
    """One fresh-process run of ``m``; ChildError or RuntimeError (a resource) on failure.
    Placeholders in its environment (a fresh cache folder per run) resolve as its arguments'."""
    cleanup: list[str] = []
    try:
        env, cleanup = resources.resolve(m.env)
        args, more = resources.resolve(m.args)  # last: "@now" is the spawn time
        cleanup += more
        min_batches = resources.ctx.timing.min_batches
        if min_batches is not None and "min_batches" not in args:
            args["min_batches"] = min_batches  # read by every timed task's Meter
        return run_child(m.task, args, timeout=m.timeout, env=env or None)
    finally:
        for d in cleanup:
            shutil.rmtree(d, ignore_errors=True)


def _reps(m: S.Measurement, repeats: int) -> int:
    """Measured runs of ``m`` when its suite runs ``repeats`` times."""
    return min(repeats, m.max_repeats) if m.max_repeats else repeats


def _attempt(m: S.Measurement, resources, failed: dict, what: str, log, bar) -> dict | None:
    """One run of ``m`` (its record), or None with the failure noted in ``failed``."""
    if bar is not None:
        bar.set_description(f"{m.id} ({what})")
    t0 = time.perf_counter()
    rec = None
    try:
        rec = _run_once(m, resources)
        status = "ok"
    except ChildError as e:
        failed[m.id] = (e.short, str(e)[-3000:])
        status = "FAILED: " + e.short
    except RuntimeError as e:  # a resource could not be prepared
        failed[m.id] = (str(e), str(e))
        status = "FAILED: " + str(e)
    if bar is None:
        log(f"  {m.id} {what}: {status} ({time.perf_counter() - t0:.1f} s)")
    return rec


def _repeat_all(runnable, resources, reps_of, bar, log, deadline=None):
    """Every runnable measurement ``reps_of(suite)`` times (at most its ``max_repeats``),
    round-robin within each suite, its ``prime_runs`` unmeasured runs just before its first;
    none started after ``deadline`` (``time.monotonic()``). Returns (records by id,
    {id: (short, long) failure})."""
    recs: dict[str, list[dict]] = {m.id: [] for m in runnable}
    failed: dict[str, tuple[str, str]] = {}
    suites = list(dict.fromkeys(m.suite for m in runnable))
    for suite in suites:
        ms = [m for m in runnable if m.suite == suite]
        R = reps_of(suite)
        for rep in range(R):
            for m in ms:
                if rep >= _reps(m, R):
                    continue
                if deadline is not None and time.monotonic() > deadline:
                    log(f"  {m.id} run {rep + 1}: not started (time limit)")
                    continue
                for k in range(m.prime_runs if rep == 0 else 0):
                    if m.id not in failed:
                        _attempt(m, resources, failed, f"unmeasured run {k + 1}", log, bar)
                if m.id not in failed:
                    rec = _attempt(m, resources, failed, f"run {rep + 1}/{_reps(m, R)}", log, bar)
                    if rec is not None:
                        recs[m.id].append(rec)
                if bar is not None:
                    bar.update(1)
    return recs, failed


def _ok_entry(m: S.Measurement, phase: str, suffix: str, recs, cores: int, gpu_sampler):
    reps = [r[phase] for r in recs]
    per = []
    for r in reps:
        pm = _record_metrics(r, cores)
        if gpu_sampler is not None and m.uses_gpu and r.get("window"):
            pm.update(gpu_sampler.window(*r["window"]) or {})
        per.append(pm)
    keys = [k for k in per[0] if all(k in p for p in per)]
    lat = [x * 1e3 for r in reps for x in (r.get("latencies") or [])]
    notes = [{k: r[k] for k in NOTE_KEYS if k in r} for r in reps]
    return _entry(
        m,
        suffix,
        "ok",
        metrics={k: summarize([p[k] for p in per]) for k in keys},
        reps=per,
        latency_ms=_downsample(lat, LATENCY_SAMPLE) if lat else [],
        rows_timed=sum(r["rows"] for r in reps),
        **({"notes": notes} if any(notes) else {}),
    )


def run_measurements(
    measurements: list[S.Measurement],
    resources: S.Resources,
    repeats: int,
    cores: int,
    has_gpu: bool,
    log=None,
    progress: bool | None = None,
    gpu_sampler=None,
    suite_repeats: dict[str, int] | None = None,
    time_limit_s: float | None = None,
) -> list[dict[str, Any]]:
    """Run every measurement ``repeats`` times (``suite_repeats`` overrides per suite) in fresh
    processes, round-robin within each suite; no run starts after ``time_limit_s``. Returns one
    result entry per measurement phase, in the measurements' order."""
    suite_repeats = suite_repeats or {}
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s

    def reps_of(suite: str) -> int:
        return suite_repeats.get(suite, repeats)

    log = log or Log()
    skip = _unrunnable(measurements, has_gpu)
    runnable = [m for m in measurements if m.id not in skip]
    bar = _progress_bar(sum(_reps(m, reps_of(m.suite)) for m in runnable), progress, log)
    try:
        recs, failed = _repeat_all(runnable, resources, reps_of, bar, log, deadline)
    finally:
        if bar is not None:
            bar.close()
            if isinstance(log, Log):
                log.bar = None
    out = []
    for m in measurements:
        for phase, suffix in m.phases.items():
            if m.id in skip:
                st, why = skip[m.id]
                out.append(_entry(m, suffix, st, reason=why))
            elif m.id in failed:
                short, long = failed[m.id]
                out.append(_entry(m, suffix, "failed", reason=short, error=long))
            elif not recs[m.id]:
                why = f"the run's time limit ({time_limit_s:g} s) came before its first run"
                out.append(_entry(m, suffix, "not run", reason=why))
            else:
                out.append(_ok_entry(m, phase, suffix, recs[m.id], cores, gpu_sampler))
    return out


# -- ratios ----------------------------------------------------------------------------------
# Ratios that cannot exceed a ceiling on an idle machine: a training loop fed by a loader is at
# most as fast as the same loop on one batch held in memory. A ratio above its ceiling (beyond
# noise) means the reference run was slowed by load from elsewhere.
CEILING_TOLERANCE = 1.05


def ceiling_warnings(entries: list[dict], measurements: list[S.Measurement]) -> list[str]:
    """One warning per ratio above its declared ceiling; the entry is marked
    (``above_ceiling``)."""
    ceilings = {
        (i, r.name): r.ceiling for m in measurements for i in m.ids() for r in m.ratios if r.ceiling
    }
    out = []
    for e in entries:
        for name, v in (e.get("ratios") or {}).items():
            ceiling = ceilings.get((e["id"], name))
            if ceiling is not None and v > ceiling * CEILING_TOLERANCE:
                e.setdefault("above_ceiling", []).append(name)
                out.append(
                    f"{e['id']}: {name} = {v:.2f}, above its ceiling of {ceiling:g}: the machine "
                    "was busy during this run (the reference measurement was slowed by other "
                    "load); rerun on an idle machine before quoting it"
                )
    return out


def _med(results: dict[str, dict], id: str, key: str = "rows_s") -> float | None:
    e = results.get(id)
    if e is None or e["status"] != "ok" or key not in e["metrics"]:
        return None
    return e["metrics"][key]["median"]


def add_ratios(entries: list[dict], measurements: list[S.Measurement]) -> dict[str, float]:
    """The ratios each measurement declares (``Measurement.ratios``), from one run: written into
    each entry ("ratios") and returned flat as {"id:name": value}. A ratio whose reference did
    not run is left out."""
    by_id = {e["id"]: e for e in entries}
    declared = {
        m.id + sfx: [(r, r.ref_for(sfx)) for r in m.ratios]
        for m in measurements
        for sfx in m.phases.values()
    }
    flat: dict[str, float] = {}
    for e in entries:
        if e["status"] != "ok":
            continue
        v = e["metrics"]["rows_s"]["median"]
        for r, ref_id in declared.get(e["id"], ()):
            ref = _med(by_id, ref_id)
            if not ref or v <= 0:
                continue
            value = ref / v if r.inverse else v / ref
            e.setdefault("ratios", {})[r.name] = value
            flat[f"{e['id']}:{r.name}"] = value
    return flat


# -- the whole run ------------------------------------------------------------------------------
def _resolve_device(device: str) -> tuple[str, bool]:
    """("cpu" or "cuda", whether a real GPU is present). ``--device cuda`` without a GPU is
    refused, unless Numba's CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1: the GPU check's dry
    run), which "auto" never picks."""
    from gpuload.device import cuda_available, cuda_simulated

    gpu = cuda_available()
    if device == "auto":
        return ("cuda" if gpu else "cpu"), gpu
    if device == "cuda" and not gpu and not cuda_simulated():
        raise SystemExit("gpuload bench: --device cuda was asked for but no CUDA GPU is present")
    if device not in ("cpu", "cuda"):
        raise SystemExit(f"gpuload bench: unknown --device {device!r} (auto, cpu or cuda)")
    return device, gpu


def _profile(t) -> tuple[str, str | None, list[str]]:
    """The image column and (optional) integer label column of a table."""
    cols = list(t.schema)
    images = [c.name for c in cols if c.kind == "image"]
    if not images:
        raise SystemExit(f"gpuload bench: table {t.url} has no image column; the suites need one")
    image = "image" if "image" in images else images[0]
    labels = [c.name for c in cols if c.kind == "scalar" and c.dtype.startswith(("int", "uint"))]
    label = "label" if "label" in labels else (labels[0] if labels else None)
    return image, label, [c.name for c in cols]


PEER_PACKAGES = {
    # module -> requirement (the `peers` extra of pyproject.toml)
    "deeplake": "deeplake>=4.0",
    "nvidia.dali": "nvidia-dali-cuda120>=1.40",
    "nvidia.nvimgcodec": "nvidia-nvimgcodec-cu12>=0.5",
    "tensorflow": "tensorflow-cpu>=2.15",
    "jax": "jax[cpu]>=0.4.30",
    "s3fs": "s3fs>=2023.6",
    "moto": "moto[server]>=5",
}


def _install_peers(log) -> None:
    """pip-install the peers that are missing (the `peers` extra's packages)."""
    need = [spec for mod, spec in PEER_PACKAGES.items() if S.missing_modules([mod])]
    if not need:
        log("peers: all installed")
        return
    if any(x.startswith(("s3fs", "moto")) for x in need):
        need.append("botocore>=1.43.115,<1.43.118")
    log(f"installing peers: {' '.join(need)}")
    p = subprocess.run([sys.executable, "-m", "pip", "install", *need])
    if p.returncode != 0:
        log("peers: pip failed; the ones still missing are reported as missing")


def _command_line() -> str:
    """How this run was started, as a user would type it."""
    argv0 = sys.argv[0] if sys.argv else ""
    rest = " ".join(sys.argv[1:])
    norm = argv0.replace(os.sep, "/")
    if norm.endswith("gpuload/bench/__main__.py"):
        head = "python -m gpuload.bench"
    elif norm.endswith("gpuload/__main__.py") or os.path.basename(argv0) == "gpuload":
        head = "gpuload"
    else:
        head = f"python {argv0}"
    return f"{head} {rest}".strip()


def _open_table(cfg: BenchConfig, cache: str, log, prep: dict):
    """(table, path, workdir for derived data, "demo" or "user"): the demo table is generated
    in the cache on first use (timed into ``prep``)."""
    import gpuload

    if cfg.table is None:
        t0 = time.perf_counter()
        path, generated = S.ensure_demo(
            cfg.resolved_rows(), cfg.seed, cache, progress=cfg.progress, log=log
        )
        if generated:
            prep["demo_table_s"] = time.perf_counter() - t0
        return gpuload.open_table(path), path, path + ".derived", "demo"
    import hashlib

    table = gpuload.open_table(cfg.table)
    key = hashlib.sha1(table.url.encode()).hexdigest()[:12]
    if cfg.rows is not None and cfg.rows != len(table):
        log(f"note: --rows applies to the demo table; {table.url} has {len(table):,} rows")
    return table, table.url, os.path.join(cache, f"table-{key}-v{table.version}"), "user"


def _timing(cfg: BenchConfig) -> S.Timing:
    timing = cfg.timing or (S.Timing.quick() if cfg.quick else S.Timing())
    if cfg.train_steps is not None:
        timing = S.Timing(**{**asdict(timing), "train_steps": cfg.train_steps})
    if cfg.min_batches is not None:
        timing = S.Timing(**{**asdict(timing), "min_batches": cfg.min_batches})
    return timing


def _measurements(cfg: BenchConfig, ctx: S.Context) -> list[S.Measurement]:
    """The chosen suites' measurements, filtered by --only / --skip id prefixes."""
    ms = S.build(ctx, cfg.suites)
    if cfg.only:
        ms = [m for m in ms if any(m.id.startswith(p) for p in cfg.only)]
    if cfg.skip:
        ms = [m for m in ms if not any(m.id.startswith(p) for p in cfg.skip)]
    return ms


def _prepare(measurements, resources: S.Resources, has_gpu: bool, log) -> None:
    """Build the data the runnable measurements need (timed, reported apart)."""
    for m in measurements:
        if (m.needs_gpu and not has_gpu) or S.missing_modules(m.requires):
            continue
        for n in m.needs:
            if n not in resources.values and n not in resources.errors:
                try:
                    resources.get(n)
                except RuntimeError as e:
                    log(f"  {e}")


def _suite_repeats(cfg: BenchConfig) -> dict[str, int]:
    """Suites whose rows run fewer fresh processes than the others (long or one-shot rows)."""
    return {"train": cfg.resolved_train_repeats(), "startup": cfg.resolved_startup_repeats()}


def _repeats_text(cfg: BenchConfig) -> str:
    """ "3 fresh processes (train 1, startup 2)": the run's repeats and the suites' own."""
    R = cfg.resolved_repeats()
    own = [f"{s} {n}" for s, n in _suite_repeats(cfg).items() if s in cfg.suites and n != R]
    return f"{R} fresh processes" + (f" ({', '.join(own)})" if own else "")


def run(cfg: BenchConfig, log=None) -> dict[str, Any]:
    """Run the benchmark; returns the results document (what results.json holds)."""
    from .machine import GpuSampler

    log = log or Log()
    t_start = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    unknown = [s for s in cfg.suites if s not in S.SUITES]
    if unknown:
        raise SystemExit(
            f"gpuload bench: unknown suite(s) {unknown}; choose from {', '.join(S.SUITES)}"
        )
    device, has_gpu = _resolve_device(cfg.device)
    if cfg.install_peers:
        _install_peers(log)
    cores = os.cpu_count() or 1
    cache = os.path.expanduser(cfg.cache_dir) if cfg.cache_dir else S.cache_root()
    prep: dict[str, float] = {}
    table, path, workdir, source = _open_table(cfg, cache, log, prep)
    rows = len(table)
    image, label, columns = _profile(table)
    sample = table[: min(rows, 256)][image]
    mean_image = sum(len(x) for x in sample) / max(1, len(sample))
    ctx = S.Context(
        table_url=path,
        rows=rows,
        image=image,
        label=label,
        columns=columns,
        storage_options=None,
        device=device,
        cores=cores,
        batch_sizes=list(cfg.batch_sizes),
        remote=cfg.remote,
        timing=_timing(cfg),
        gpu=has_gpu,
        ingest_rows=sorted({min(n, rows) for n in (1000, 2000, rows)}),
        loader_workers=cfg.loader_workers,
        startup_repeats=cfg.resolved_startup_repeats(),
        simulated=device == "cuda" and not has_gpu,
    )
    measurements = _measurements(cfg, ctx)
    about = _document(cfg, ctx, table, source, mean_image, started, prep)  # load before the runs
    log(
        f"gpuload bench: {rows:,} rows ({table.nbytes / 1e6:,.0f} MB, mean JPEG {mean_image / 1e3:.1f} kB) "
        f"from {path}; device {device}; {cores} cores; suites {','.join(cfg.suites)}; "
        f"{len(measurements)} measurements x {_repeats_text(cfg)}"
    )
    resources = S.Resources(ctx, workdir, log=log)
    sampler = GpuSampler() if has_gpu else None
    try:
        _prepare(measurements, resources, has_gpu, log)
        prep.update({f"{k}_s": v for k, v in resources.timings.items()})
        entries = run_measurements(
            measurements,
            resources,
            cfg.resolved_repeats(),
            cores,
            has_gpu,
            log=log,
            progress=cfg.progress,
            gpu_sampler=sampler,
            suite_repeats=_suite_repeats(cfg),
            time_limit_s=cfg.time_limit_s,
        )
    finally:
        resources.close()
        if sampler is not None:
            sampler.close()
    ratios = add_ratios(entries, measurements)
    warnings = ceiling_warnings(entries, measurements)
    for w in warnings:
        log(f"WARNING {w}")
    about.update(total_s=time.perf_counter() - t_start, results=entries, ratios=ratios)
    about["warnings"] = warnings
    return about


REMOTE_METHOD = (
    " Remote rows (--remote) read the same table from two servers on 127.0.0.1, started once "
    "for the run: an HTTP object server (gpuload.testing.shaped: aiohttp's web server in a "
    "child process, Range requests) that waits the stated delay before every answer, and the "
    "S3 API served by moto (for the S3 code path only: moto is CPU-bound at ~200 requests/s). "
    "Each remote row times whole epochs with gpuload's defaults (concurrency, coalescing, block "
    "cache in a fresh empty folder: the first epoch cold, the second cached); requests and peak "
    "in flight are the HTTP server's own counters over the epoch."
)


def _document(cfg, ctx: S.Context, table, source: str, mean_image: float, started: str, prep):
    """The results document around the entries: machine (with its load, taken before the
    runs), versions, configuration, table. ``prep`` is filled in later (same dict)."""
    from .machine import machine, versions

    repeats, train_repeats = cfg.resolved_repeats(), cfg.resolved_train_repeats()
    startup = ctx.startup_repeats
    return {
        "format": "gpuload-bench/1",
        "started": started,
        "total_s": 0.0,
        "machine": machine(),
        "versions": versions(),
        "config": {
            "table": ctx.table_url,
            "table_source": source,
            "rows": ctx.rows,
            "seed": cfg.seed,
            "device": ctx.device,
            "cuda_simulator": ctx.simulated,
            "batch_sizes": list(cfg.batch_sizes),
            "suites": list(cfg.suites),
            "remote": cfg.remote,
            "repeats": repeats,
            "train_repeats": train_repeats,
            "startup_repeats": startup,
            "quick": cfg.quick,
            "timing": asdict(ctx.timing),
            "python": platform.python_version(),
            "command": _command_line(),
        },
        "table": {
            "url": ctx.table_url,
            "rows": ctx.rows,
            "bytes": table.nbytes,
            "mean_image_bytes": mean_image,
            "columns": {c.name: c.type_string() for c in table.schema},
            "image_column": ctx.image,
            "label_column": ctx.label,
        },
        "prepare_s": prep,
        "method": (
            f"Each measurement runs {repeats} time(s) ({train_repeats} for the training runs, "
            f"{startup} for the startup rows), each time in a fresh Python process "
            f"(round-robin over a suite's measurements); in each process a warm-up is excluded "
            f"(JIT compilation, worker start-up, first reads), then batches are timed for at "
            f"least a minimum window; the startup suite excludes nothing: it times the first "
            f"two batches of a fresh process, with empty (cold) or filled (warm) caches. "
            f"Figures are the median with min-max over the processes. "
            f"rows/s (images/s for decode, e2e, train); MB/s and Gb/s of the bytes delivered "
            f"(encoded bytes for ingest/stream/decode, output tensors for e2e); batch latency = "
            f"time between successive batches at the consumer; CPU = CPU time of the process "
            f"and its workers over wall time and all {ctx.cores} cores; peak RSS = peak resident "
            f"memory of the process tree." + (REMOTE_METHOD if ctx.remote else "")
        ),
        "results": [],
        "ratios": {},
    }


# -- command line ----------------------------------------------------------------------------
def _csv_ints(s: str) -> list[int]:
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not v or any(x <= 0 for x in v):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return v


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _arguments() -> tuple[tuple[tuple[str, ...], dict], ...]:
    """The command line, as a table: (flags, argparse keywords)."""
    cache_help = (
        "where the demo table and the peers' copies live "
        "(default: $GPULOAD_BENCH_CACHE or ~/.cache/gpuload/bench)"
    )
    return (
        (("table",), dict(nargs="?", default=None,
            help="table path or URL (default: the demo table, generated in a cache folder)")),
        (("--rows",), dict(type=int, default=None,
            help=f"demo table rows (default {DEFAULT_ROWS:,}; {QUICK_ROWS} with --quick)")),
        (("--seed",), dict(type=int, default=0, help="demo table seed")),
        (("--device",), dict(default="auto", choices=("auto", "cpu", "cuda"))),
        (("--batch-sizes",), dict(type=_csv_ints, default=[64, 128, 256],
            help="raw stream batch sizes (default 64,128,256)")),
        (("--suite", "--suites"), dict(dest="suites", type=_csv, default=list(S.DEFAULT_SUITES),
            help=f"comma list of {','.join(S.SUITES)} (default: {','.join(S.DEFAULT_SUITES)})")),
        (("--remote",), dict(action="store_true",
            help="also stream from an HTTP object server (aiohttp in a child process) at "
                 f"{'/'.join(map(str, S.HTTP_DELAYS_MS))} ms per request and from the S3 API "
                 "on moto, both on 127.0.0.1 and started for the run")),
        (("--out",), dict(default=None, help="write results.json, report.md and PNG plots here")),
        (("--json",), dict(action="store_true",
            help="print results.json on stdout (the table goes to stderr)")),
        (("--repeats",), dict(type=int, default=None,
            help=f"fresh processes per measurement (default {DEFAULT_REPEATS}; 1 with --quick)")),
        (("--train-repeats",), dict(type=int, default=None,
            help=f"fresh processes per training run (default {DEFAULT_TRAIN_REPEATS}, at most --repeats)")),
        (("--startup-repeats",), dict(type=int, default=None,
            help=f"fresh processes per startup row (default {DEFAULT_STARTUP_REPEATS}, at most "
                 "--repeats; cold rows that compile the kernel: 1)")),
        (("--quick",), dict(action="store_true",
            help=f"a ~1-minute run: {QUICK_ROWS} rows, 1 repeat, short windows")),
        (("--train-steps",), dict(type=int, default=None,
            help="timed training steps (default 200; 10 with --quick)")),
        (("--min-batches",), dict(type=int, default=None,
            help="timed batches per run at least (default 5; fewer only for a cheaper smoke "
                 "run, its rates noisier)")),
        (("--cache-dir",), dict(default=None, help=cache_help)),
        (("--only",), dict(type=_csv, default=None,
            help="keep measurements whose id starts with one of these (e.g. e2e.gpuload,decode)")),
        (("--skip",), dict(type=_csv, default=None,
            help="drop measurements whose id starts with one of these")),
        (("--install-peers",), dict(action="store_true",
            help="pip-install missing peers (deeplake, DALI, nvImageCodec, TensorFlow) first")),
        (("--no-progress",), dict(dest="progress", action="store_const", const=False, default=None)),
        (("--time-limit",), dict(dest="time_limit_s", type=float, default=None,
            help="start no run after this many seconds of measuring: a row with fewer runs "
                 "reports them, a row with none is 'not run' (for a machine held for minutes)")),
    )  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    for flags, kw in _arguments():
        p.add_argument(*flags, **kw)


def config_from_args(a: argparse.Namespace) -> BenchConfig:
    if a.repeats is not None and a.repeats < 1:
        raise SystemExit("gpuload bench: --repeats must be >= 1")
    for flag in ("train_repeats", "startup_repeats"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            raise SystemExit(f"gpuload bench: --{flag.replace('_', '-')} must be >= 1")
    if a.rows is not None and a.rows < 1:
        raise SystemExit("gpuload bench: --rows must be >= 1")
    if a.min_batches is not None and a.min_batches < 1:
        raise SystemExit("gpuload bench: --min-batches must be >= 1")
    return BenchConfig(
        table=a.table,
        rows=a.rows,
        seed=a.seed,
        device=a.device,
        batch_sizes=a.batch_sizes,
        suites=a.suites,
        remote=a.remote,
        out=a.out,
        json=a.json,
        repeats=a.repeats,
        train_repeats=a.train_repeats,
        startup_repeats=a.startup_repeats,
        quick=a.quick,
        cache_dir=a.cache_dir,
        train_steps=a.train_steps,
        min_batches=a.min_batches,
        progress=a.progress,
        only=a.only,
        skip=a.skip,
        install_peers=a.install_peers,
        time_limit_s=a.time_limit_s,
    )


def execute(cfg: BenchConfig) -> int:
    """Run, print the table (or the JSON), write the report; exit status 0 when every
    runnable measurement succeeded, 1 when some failed."""
    from . import report

    log = Log()
    doc = run(cfg, log=log)
    text = report.terminal(doc)
    if cfg.out:
        t = time.perf_counter()
        report.write(doc, cfg.out)
        doc["report_s"] = time.perf_counter() - t
        doc["total_s"] += doc["report_s"]
        with open(os.path.join(cfg.out, "results.json"), "w") as f:
            json.dump(doc, f, indent=2)
    if cfg.json:
        print(text, file=sys.stderr)
        print(json.dumps(doc, indent=2))
    else:
        print(text)
    where = f"; report in {cfg.out}" if cfg.out else ""
    print(f"total time {doc['total_s']:.0f} s{where}", file=sys.stderr if cfg.json else sys.stdout)
    return 1 if any(e["status"] == "failed" for e in doc["results"]) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpuload bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return execute(config_from_args(p.parse_args(argv)))
