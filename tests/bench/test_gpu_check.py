"""benchmarks/gpu_check.sh, the one-command GPU check: its environment report on a machine
without CUDA, the verdict it reaches on broken outputs (each kind of breakage fails it), and
the dry run end to end (Numba's CUDA simulator, CPU decode, tiny sizes) as CI runs it."""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from gpuload.bench import gpu_env

from ..helpers import benchmark_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def check():
    yield benchmark_script("gpu_check")
    sys.modules.pop("gpu_check", None)


def test_environment_report_without_cuda(monkeypatch):
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    env = gpu_env.environment()
    assert set(gpu_env.REQUIRED_KEYS) <= set(env)
    assert env["gpu"] is None and env["driver"] is None and env["gpus"] == []
    assert env["cuda_driver"] is None and env["cuda_runtime"] is None
    assert env["cuda_simulator"] is False and "no CUDA GPU" in env["cuda_reason"]
    assert env["hw_jpeg"] == {"usable": False, "engines": None, "reason": "no CUDA GPU"}
    assert set(env["versions"]) == set(gpu_env.LIBRARIES)
    assert env["versions"]["numba"] == importlib.metadata.version("numba")
    assert env["versions"]["torchvision"] is None  # not installed here: None, not a guess
    assert os.path.exists(os.path.join(env["gpuload_from"], "__init__.py"))
    json.dumps(env)  # the report is plain JSON
    # a GPU run on this machine is refused field by field; a dry run needs the simulator on
    gpu_run = gpu_env.problems(env, dry_run=False)
    assert any("no gpu" in p for p in gpu_run) and any("no cuda_runtime" in p for p in gpu_run)
    assert gpu_env.problems(env, dry_run=True) == ["dry run: Numba's CUDA simulator is not on"]
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    sim = gpu_env.environment()
    assert sim["cuda_simulator"] is True and gpu_env.problems(sim, dry_run=True) == []


def _passing(check, out, dry: bool) -> dict:
    """An output folder that passes: every file, a report naming this machine's gpuload."""
    env = gpu_env.environment()
    if dry:
        env["cuda_simulator"] = True
    else:
        env.update(gpu="NVIDIA H200", driver="580.159", cuda_runtime="13.0", cuda_driver="13.0")
    res = {
        "format": check.FORMAT,
        "dry_run": dry,
        "site": None,
        "environment": env,
        "tests": {
            "rc": 0,
            "passed": ["t::a"],
            "failed": [],
            "not_run": ["t::gpu"] if dry else [],
            "skipped": [],
        },
        "bench": {"entries": {id: {"status": "ok"} for id in check.REQUIRED}},
    }
    for name in check.FILES:
        with open(os.path.join(out, name), "w") as f:
            f.write("x\n")
    _write(out, res)
    return res


def _write(out, res) -> None:
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f)


@pytest.mark.parametrize("dry", [True, False])
def test_every_kind_of_breakage_fails_the_check(check, tmp_path, dry):
    good = _passing(check, tmp_path, dry)
    assert check.problems(str(tmp_path), dry) == []

    def broken(change) -> list[str]:
        res = copy.deepcopy(good)
        change(res)
        _write(tmp_path, res)
        try:
            return check.problems(str(tmp_path), dry)
        finally:
            _write(tmp_path, good)

    def fail_case(r):
        r["bench"]["entries"]["gpu.kernel.cuda"] = {"status": "failed", "reason": "boom"}

    assert any("gpu.kernel.cuda failed: boom" in p for p in broken(fail_case))

    def miss_case(r):
        del r["bench"]["entries"]["gpu.e2e.gpuload"]

    assert any("gpu.e2e.gpuload is absent" in p for p in broken(miss_case))

    def fail_test(r):
        r["tests"]["failed"] = ["tests/test_gpu.py::test_x"]

    assert any("test failed: tests/test_gpu.py::test_x" in p for p in broken(fail_test))

    def wrong_env(r):
        r["environment"].pop("hw_jpeg")

    assert any("no 'hw_jpeg'" in p for p in broken(wrong_env))

    def wrong_gpu(r):
        r["environment"]["gpu"] = None if not dry else "NVIDIA H200"

    assert broken(wrong_gpu)

    def not_run(r):
        r["tests"]["not_run"] = [] if dry else ["t::gpu"]

    assert any("NOT RUN" in p for p in broken(not_run))

    def skipped(r):
        r["tests"]["skipped"] = ["tests/test_gpu.py::test_tf_device_iterator"]

    assert any("1 tests skipped, so not verified" in p for p in broken(skipped))

    def elsewhere(r):
        r["site"] = "/nonexistent/site"

    assert any("was imported from" in p for p in broken(elsewhere))
    os.unlink(tmp_path / "report.md")
    assert "report.md is missing or empty" in check.problems(str(tmp_path), dry)


def test_junit_summary_tells_not_run_from_skipped(check, tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="a" name="ok"/>'
        '<testcase classname="a" name="gpu"><skipped message="NOT RUN: needs a CUDA GPU"/>'
        "</testcase>"
        '<testcase classname="a" name="dep"><skipped message="no tensorflow"/></testcase>'
        '<testcase classname="a" name="bad"><failure message="x"/></testcase>'
        '<testcase classname="a" name="err"><error message="y"/></testcase>'
        "</testsuite></testsuites>"
    )
    s = check.junit_summary(str(xml))
    assert s["passed"] == ["a::ok"] and s["not_run"] == ["a::gpu"]
    assert s["skipped"] == ["a::dep"] and s["failed"] == ["a::bad", "a::err"]
    assert check.junit_summary(str(tmp_path / "none.xml"))["error"] == "no JUnit report"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dry_run_end_to_end(check, tmp_path):
    """The whole check here, as CI runs it: install into a private folder, environment report,
    the GPU-only tests NOT RUN and one simulator test passed, every simulator-capable case ok."""
    out = tmp_path / "out"
    had_build = os.path.exists(os.path.join(ROOT, "build"))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHON"] = sys.executable
    p = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=840,
        env=env,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert sorted(os.listdir(out)) == sorted(check.FILES)
    res = json.loads((out / "results.json").read_text())
    assert res["dry_run"] is True and res["problems"] == []
    assert res["environment"]["cuda_simulator"] is True and res["environment"]["gpu"] is None
    assert res["environment"]["gpuload_from"].startswith(res["site"])
    assert len(res["tests"]["not_run"]) >= 8 and res["tests"]["passed"]
    assert not res["tests"]["failed"]
    statuses = {k: v["status"] for k, v in res["bench"]["entries"].items()}
    assert all(statuses[k] == "ok" for k in check.REQUIRED), statuses
    assert statuses["gpu.h2d.pinned"] == "ok"
    report = (out / "report.md").read_text()
    assert "dry run" in report and "## Verdict" in report and "passed" in report
    # the build happens in a copy: the checkout gets no build/ folder
    assert os.path.exists(os.path.join(ROOT, "build")) == had_build


def test_every_package_folder_is_installed():
    """A regular install (what the check makes on a GPU machine) holds every subpackage: a
    folder with __init__.py missing from pyproject's list is absent there though the editable
    install of development finds it."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {
        os.path.relpath(d, ROOT).replace(os.sep, ".")
        for d, _, files in os.walk(os.path.join(ROOT, "gpuload"))
        if "__init__.py" in files
    }
    assert found <= listed, sorted(found - listed)
    assert "gpuload.kernels" in listed
