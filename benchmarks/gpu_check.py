"""The GPU check: every GPU path and GPU benchmark of gpuload in one run, on a bare GPU machine.

Run it through ``benchmarks/gpu_check.sh``, which first installs gpuload (and any carried wheels)
into a private folder with pip --no-index --no-deps, never touching the machine's torch/CUDA.
Steps, each under its own time limit, a failing one reported and the rest run anyway:

1. the environment report (``gpuload.bench.gpu_env``): GPU, driver, CUDA runtime, the hardware
   JPEG decoder, library versions, where gpuload was imported from;
2. the GPU-only and simulator tests (``pytest -m "gpu or cudasim"``), JUnit report;
3. the GPU benchmark cases (``gpuload bench --suite gpu``: fresh processes, 3 repeats);
4. ``results.json`` and ``report.md``, then the verdict: what is wrong with them (a failed test
   or case, a GPU test NOT RUN on a GPU, any skipped test, a missing file, a wrong environment field) makes the
   exit status 1.

``--dry-run`` does all of it here, without a GPU: Numba's CUDA simulator, decoding on the CPU,
tiny sizes and 2 timed batches a row, the GPU-only tests reported NOT RUN and one simulator
test run; CI runs it so the check cannot rot. Everything lands in ``--out`` as at most 7 files
(what the device tool brings back).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from typing import Any

FORMAT = "gpuload-gpu-check/1"
FILES = ("results.json", "report.md", "env.json", "tests.xml", "bench-results.json",
         "bench-report.md", "gpu_check.log")  # fmt: skip
# The dry run's -k: the GPU-only tests (NOT RUN there) and one simulator test (the others run
# in the main suite; if it is renamed, the dry run passes none and fails). Marker names are
# keywords; no folder on the way may contain "cudasim".
DRY_TESTS = "not cudasim or packing_under_cuda_simulator"
# Rows that must run, under the simulator (dry run) and on a GPU alike: gpuload's own, not the
# torchvision ones (an optional peer there).
REQUIRED = (
    "gpu.decode.cpu", "gpu.decode.nvjpeg_hw", "gpu.decode.nvjpeg_cuda",
    "gpu.decode.nvjpeg_default", "gpu.kernel.cuda", "gpu.kernel.cpu", "gpu.h2d.pinned",
    "gpu.h2d.pageable", "gpu.e2e.gpuload", "gpu.e2e.cpu",
)  # fmt: skip
# Inside 8 minutes, setup and the environment report aside: the tests, then the benchmark,
# which starts no run after BENCH_STARTS_S (a row keeps the runs it got; one with none is
# reported "not run") so that it ends, reports written, well before its own limit.
LIMITS_S = {"tests": 200.0, "bench": 330.0}
BENCH_STARTS_S = 240.0


class Log:
    """Progress on stdout and in ``gpu_check.log``, each line stamped with the seconds since
    the check began."""

    def __init__(self, path: str) -> None:
        self.t0 = time.perf_counter()
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def __call__(self, msg: str) -> None:
        line = f"[gpu_check {time.perf_counter() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()

    def raw(self, line: str) -> None:
        sys.stdout.write(line)
        sys.stdout.flush()
        self.f.write(line)

    def close(self) -> None:
        self.f.close()


def _run(cmd: list[str], log: Log, timeout: float, env: dict | None = None, cwd=None) -> int:
    """Run ``cmd``, its output streamed into the log; the exit status, or 124 when it ran past
    ``timeout`` (then it and its children are killed)."""
    log(f"$ {' '.join(cmd)}")
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        start_new_session=True,  # its own process group: killed whole on a timeout
    )

    def pump() -> None:
        for line in p.stdout:
            log.raw(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        log(f"killed after {timeout:.0f} s")
        rc = 124
    reader.join(timeout=5)
    return rc


# -- step 2: tests -------------------------------------------------------------------------------
def junit_summary(path: str) -> dict[str, Any]:
    """Counts and names from a pytest JUnit file: passed, failed (failures and errors), skipped,
    and which skips were GPU-only tests NOT RUN."""
    out: dict[str, Any] = {"passed": [], "failed": [], "not_run": [], "skipped": []}
    if not os.path.exists(path):
        return {**out, "error": "no JUnit report"}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            out["failed"].append(name)
        elif (sk := case.find("skipped")) is not None:
            msg = (sk.get("message") or "") + (sk.text or "")
            out["not_run" if "NOT RUN" in msg else "skipped"].append(name)
        else:
            out["passed"].append(name)
    return out


def run_tests(checkout: str, out: str, dry: bool, log: Log) -> dict[str, Any]:
    """``pytest -m "gpu or cudasim"`` over a copy of the tests (so the checkout's source tree
    cannot shadow the installed gpuload), JUnit into ``out``."""
    work = tempfile.mkdtemp(prefix="gl-check-tests-")
    shutil.copytree(os.path.join(checkout, "tests"), os.path.join(work, "tests"))
    junit = os.path.join(out, "tests.xml")
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c",
           os.path.join(checkout, "pyproject.toml"), "--rootdir", work, "-m", "gpu or cudasim",
           "--junitxml", junit, "-q", os.path.join(work, "tests")]  # fmt: skip
    if dry:
        cmd[-1:-1] = ["-k", DRY_TESTS]
    t = time.perf_counter()
    # DALI and TensorFlow may be absent on a GPU image: their tests report the skip, not fail
    rc = _run(cmd, log, LIMITS_S["tests"], env={"GPULOAD_ALLOW_MISSING_DEPS": "1"}, cwd=work)
    shutil.rmtree(work, ignore_errors=True)
    return {"rc": rc, "seconds": time.perf_counter() - t, **junit_summary(junit)}


# -- step 3: benchmarks --------------------------------------------------------------------------
def run_bench(out: str, dry: bool, rows: int, repeats: int, log: Log) -> dict[str, Any]:
    """``gpuload bench --suite gpu --device cuda`` (the demo table, fresh processes); its
    results.json and report.md copied into ``out``."""
    work = tempfile.mkdtemp(prefix="gpuload-check-bench-")
    cmd = [sys.executable, "-m", "gpuload.bench", "--suite", "gpu", "--device", "cuda",
           "--rows", str(rows), "--repeats", str(repeats), "--cache-dir",
           os.path.join(work, "cache"), "--out", os.path.join(work, "out"), "--no-progress",
           "--time-limit", str(BENCH_STARTS_S)]  # fmt: skip
    if dry:  # the simulator runs a batch in seconds: 2 timed batches show a row works
        cmd += ["--min-batches", "2"]
    t = time.perf_counter()
    rc = _run(cmd, log, LIMITS_S["bench"], env={"NUMBA_ENABLE_CUDASIM": "1"} if dry else None)
    res: dict[str, Any] = {"rc": rc, "seconds": time.perf_counter() - t, "entries": {}}
    for name in ("results.json", "report.md"):
        src = os.path.join(work, "out", name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out, f"bench-{name}"))
    path = os.path.join(out, "bench-results.json")
    if os.path.exists(path):
        with open(path) as f:
            doc = json.load(f)
        for e in doc.get("results", []):
            res["entries"][e["id"]] = {
                "status": e["status"],
                "reason": e.get("reason"),
                "median": _headline(e),
            }
    shutil.rmtree(work, ignore_errors=True)
    return res


def _headline(e: dict) -> dict[str, float] | None:
    m = e.get("metrics") or {}
    keys = ("rows_s", "gbit_s", "copy_gb_s", "x_copy", "consumer_wait_ms", "gpu_util_pct",
            "cpu_util_pct", "compile_s")  # fmt: skip
    return {k: m[k]["median"] for k in keys if k in m} or None


# -- step 4: results, report, verdict ------------------------------------------------------------
def problems(out: str, dry: bool) -> list[str]:
    """Everything wrong with the check's output in ``out`` (empty: the check passed)."""
    from gpuload.bench.gpu_env import problems as env_problems

    errs = [f"{name} is missing or empty" for name in FILES if not _nonempty(out, name)]
    if not _nonempty(out, "results.json"):
        return errs
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    env, tests, bench = res.get("environment") or {}, res.get("tests") or {}, res.get("bench") or {}
    errs += env_problems(env, dry_run=dry)
    site = res.get("site")
    if site and not str(env.get("gpuload_from", "")).startswith(os.path.realpath(site)):
        errs.append(f"gpuload was imported from {env.get('gpuload_from')}, not from {site}")
    errs += _test_problems(tests, dry)
    entries = bench.get("entries") or {}
    if not entries:
        errs.append("the benchmark produced no results")
    for id, e in entries.items():
        if e["status"] == "failed":
            errs.append(f"benchmark case {id} failed: {e.get('reason')}")
    for id in REQUIRED:
        status = entries.get(id, {}).get("status", "absent")
        if status != "ok" and entries:
            errs.append(f"benchmark case {id} is {status}, it must run here")
    return errs


def _test_problems(tests: dict, dry: bool) -> list[str]:
    errs = [f"test failed: {n}" for n in tests.get("failed", [])]
    if tests.get("error"):
        errs.append(f"tests: {tests['error']}")
    if tests.get("rc") not in (0, None) and not tests.get("failed"):
        errs.append(f"pytest exited with status {tests.get('rc')}")
    if not tests.get("passed"):
        errs.append("no GPU or simulator test passed")
    if dry and not tests.get("not_run"):
        errs.append("dry run: no GPU-only test was reported NOT RUN")
    if not dry and tests.get("not_run"):
        errs.append(f"GPU run: {len(tests['not_run'])} GPU-only tests were NOT RUN on a GPU")
    skipped = tests.get("skipped") or []
    if skipped:  # e.g. a TF or JAX build that sees no GPU: that path was not verified
        shown = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        errs.append(
            f"{len(skipped)} tests skipped, so not verified (reasons in tests.xml): {shown}"
        )
    return errs


def _nonempty(out: str, name: str) -> bool:
    p = os.path.join(out, name)
    return os.path.exists(p) and os.path.getsize(p) > 0


def report_md(res: dict[str, Any], bench_md: str | None) -> str:
    """report.md: the environment, the tests, the benchmark's headline figures and its own
    report."""
    env, tests, bench = res["environment"], res["tests"], res["bench"]
    lines = [f"# gpuload GPU check{' (dry run: no GPU, CUDA simulator)' if res['dry_run'] else ''}",
             "", f"{res['started']}, {res['seconds']:.0f} s in all.", "", "## Environment", "",
             "| | |", "| --- | --- |"]  # fmt: skip
    for k in ("gpu", "driver", "cuda_driver", "cuda_runtime", "cuda_simulator", "python",
              "cores", "gpuload_from"):  # fmt: skip
        lines.append(f"| {k} | {env.get(k)} |")
    hw = env.get("hw_jpeg", {})
    lines.append(f"| hardware JPEG decoder | {'usable' if hw.get('usable') else 'not usable'}; "
                 f"engines {hw.get('engines')}; {hw.get('reason') or hw.get('decode_error') or ''} |")  # fmt: skip
    vers = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
    missing = ", ".join(k for k, v in env.get("versions", {}).items() if not v)
    lines += [f"| versions | {vers} |", f"| not installed | {missing or '-'} |", "",
              "## Tests (`pytest -m \"gpu or cudasim\"`)", "",
              f"{len(tests.get('passed', []))} passed, {len(tests.get('failed', []))} failed, "
              f"{len(tests.get('not_run', []))} GPU-only NOT RUN, "
              f"{len(tests.get('skipped', []))} skipped (a dependency missing) in "
              f"{tests.get('seconds', 0):.0f} s.", ""]  # fmt: skip
    for key, head in (("failed", "FAILED"), ("not_run", "NOT RUN"), ("skipped", "skipped")):
        lines += [f"- {head}: `{n}`" for n in tests.get(key, [])]
    lines += ["", "## Benchmark cases (`gpuload bench --suite gpu`, medians)", "",
              "| case | status | figures |", "| --- | --- | --- |"]  # fmt: skip
    for id, e in bench.get("entries", {}).items():
        figs = ", ".join(f"{k} {v:,.3g}" for k, v in (e.get("median") or {}).items())
        lines.append(f"| {id} | {e['status']} | {figs or e.get('reason') or ''} |")
    lines += ["", "## Verdict", ""] + ([f"- {p}" for p in res["problems"]] or ["passed"])
    if bench_md:
        lines += ["", "## The benchmark's own report", "", bench_md]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-check-out")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument(
        "--checkout", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    )
    p.add_argument("--site", default=None, help="where gpu_check.sh installed gpuload")
    p.add_argument("--rows", type=int, default=None, help="demo table rows (1024; dry run 16)")
    p.add_argument("--repeats", type=int, default=None, help="fresh processes (3; dry run 1)")
    a = p.parse_args(argv)
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    for name in FILES:  # a stale file from an earlier run must not pass for this one's
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(out, name))
    log = Log(os.path.join(out, "gpu_check.log"))
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if a.dry_run:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    from gpuload.bench.gpu_env import environment

    log("environment report")
    env = environment()
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump(env, f, indent=2)
    log(f"GPU {env['gpu']}, driver {env['driver']}, CUDA runtime {env['cuda_runtime']}, "
        f"hardware JPEG {env['hw_jpeg']}, gpuload from {env['gpuload_from']}")  # fmt: skip
    log(
        "tests: pytest -m 'gpu or cudasim'"
        + (" (dry run: one simulator test)" if a.dry_run else "")
    )
    tests = run_tests(a.checkout, out, a.dry_run, log)
    log(f"tests: {len(tests['passed'])} passed, {len(tests['failed'])} failed, "
        f"{len(tests['not_run'])} NOT RUN, {len(tests['skipped'])} skipped")  # fmt: skip
    rows = a.rows or (16 if a.dry_run else 1024)
    repeats = a.repeats or (1 if a.dry_run else 3)
    log(f"benchmarks: gpuload bench --suite gpu, {rows} rows, {repeats} fresh processes each")
    bench = run_bench(out, a.dry_run, rows, repeats, log)
    res = {"format": FORMAT, "dry_run": a.dry_run, "started": started,
           "seconds": time.perf_counter() - log.t0, "site": a.site, "environment": env,
           "tests": tests, "bench": bench, "problems": []}  # fmt: skip
    bench_md = None
    if _nonempty(out, "bench-report.md"):
        with open(os.path.join(out, "bench-report.md")) as f:
            bench_md = f.read()
    for _ in range(2):  # the verdict reads the files back, and report.md states the verdict
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(res, f, indent=2)
        with open(os.path.join(out, "report.md"), "w") as f:
            f.write(report_md(res, bench_md))
        res["problems"] = problems(out, a.dry_run)
    for msg in res["problems"]:
        log(f"PROBLEM: {msg}")
    log(f"{'FAILED' if res['problems'] else 'passed'}; results in {out}")
    log.close()
    return 1 if res["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
