"""benchmarks/gpu_wheels.sh prepares the wheels a GPU machine without a package index needs, and
pyproject.toml's cuda12/cuda13 extras name the packages of one CUDA major each. Everything here
runs offline: `--list` prints the pip commands without running them, and the folder's checks
(one version each, the size limit, run-time requirements) run on small fake wheels."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import zipfile

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ..helpers import benchmark_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_wheels.sh")
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
# (python, cuda) -> what the device image lacks: nvImageCodec, the nvJPEG wheel it dlopens, and
# gpuload's one core dependency the image does not hold.
EXPECTED = {
    ("3.12", "13"): {"nvidia-nvimgcodec-cu13", "nvidia-nvjpeg", "simplejpeg"},
    ("3.11", "12"): {"nvidia-nvimgcodec-cu12", "nvidia-nvjpeg-cu12", "simplejpeg"},
}
DALI = {"12": "nvidia-dali-cuda120", "13": "nvidia-dali-cuda130"}


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=60
    )


def _pip_commands(out: str) -> list[list[str]]:
    return [shlex.split(line) for line in out.splitlines() if " -m pip download " in line]


def _names(cmd: list[str]) -> set[str]:
    """The requirement arguments after `-d DEST`, as canonical project names."""
    reqs = cmd[cmd.index("-d") + 2 :]
    return {canonicalize_name(Requirement(r).name) for r in reqs}


@pytest.fixture(scope="module")
def gw():
    yield benchmark_script("gpu_wheels")
    sys.modules.pop("gpu_wheels", None)


@pytest.mark.parametrize(("python", "cuda"), sorted(EXPECTED))
def test_list_names_the_target_packages_and_pins_the_target_platform(python, cuda, tmp_path):
    """--list prints binary-only, no-deps downloads for the target's Python and manylinux x86-64
    (not this machine's), of the packages the image lacks for that CUDA major, and nothing else:
    a wrong name or a missing flag would fetch wheels that do not install or run there."""
    dest = tmp_path / "w"
    r = _run("--list", "--python", python, "--cuda", cuda, "--dest", str(dest))
    assert r.returncode == 0, r.stderr
    cmds = _pip_commands(r.stdout)
    assert len(cmds) == 2, r.stdout
    for cmd in cmds:
        assert cmd[1:4] == ["-m", "pip", "download"]
        assert {"--no-deps", "--only-binary=:all:"} <= set(cmd)
        assert cmd[cmd.index("--python-version") + 1] == python
        assert cmd[cmd.index("--implementation") + 1] == "cp"
        assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--platform"] == PLATFORMS
        assert cmd[cmd.index("-d") + 1] == str(dest)
    assert set().union(*map(_names, cmds)) == EXPECTED[python, cuda]
    listed = next(x for x in r.stdout.splitlines() if x.startswith("packages:"))
    assert set(listed.split()[1:]) == EXPECTED[python, cuda]
    assert not dest.exists(), "--list must not create the folder (nor touch the network)"


@pytest.mark.parametrize("cuda", ["12", "13"])
def test_dali_only_with_the_flag(cuda):
    """DALI's wheel is hundreds of MB: it and its own needs are downloaded with --dali only, and
    for the same CUDA major as the rest."""
    plain = set().union(*map(_names, _pip_commands(_run("--list", "--cuda", cuda).stdout)))
    r = _run("--list", "--cuda", cuda, "--dali")
    assert r.returncode == 0, r.stderr
    dali = set().union(*map(_names, _pip_commands(r.stdout)))
    assert not any("dali" in n for n in plain), plain
    assert DALI[cuda] in dali
    assert plain < dali
    other = "12" if cuda == "13" else "13"
    assert not any(f"cu{other}" in n or DALI[other] == n for n in dali), dali


def test_unsupported_cuda_is_refused_with_a_clear_message():
    """Only CUDA 12 and 13 wheels exist for nvImageCodec and DALI: --cuda 11 stops before any pip
    command, saying which values are accepted."""
    r = _run("--list", "--cuda", "11")
    assert r.returncode != 0
    assert not _pip_commands(r.stdout)
    assert "--cuda 11 is not supported" in r.stderr
    assert "12 or 13" in r.stderr


def _fake_wheel(folder, name: str, version: str, requires=(), size: int = 0):
    """A wheel file with just a METADATA (and `size` bytes of padding, stored uncompressed)."""
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
        if size:
            z.writestr("pad.bin", b"\0" * size)
    return path


def test_folder_keeps_one_version_and_finds_a_missing_runtime_wheel(gw, tmp_path):
    """Two versions of one package stop `pip install` on the device, so the older one goes; and
    nvImageCodec's `nvjpeg` extra names a wheel it loads only at the first decode, so a folder
    without it is reported (while requirements the image already meets are not)."""
    old = _fake_wheel(tmp_path, "simplejpeg", "1.8.0", ["numpy>=1.19.3"])
    new = _fake_wheel(tmp_path, "simplejpeg", "1.9.0", ["numpy>=1.19.3"])
    codec = _fake_wheel(
        tmp_path,
        "nvidia-nvimgcodec-cu13",
        "0.9.0",
        ['nvidia-nvjpeg; extra == "nvjpeg"', 'nvidia-nvtiff-cu13; extra == "nvtiff"'],
    )
    kept = gw.keep_one_version(tmp_path, ["simplejpeg", "nvidia-nvimgcodec-cu13"], [new.name])
    assert kept == {"simplejpeg": new, "nvidia-nvimgcodec-cu13": codec}
    assert not old.exists() and new.exists()

    wanted = [Requirement("nvidia-nvimgcodec-cu13[nvjpeg]"), Requirement("simplejpeg")]
    problems = gw.check_requirements(kept, wanted, "3.12")
    assert len(problems) == 1 and "nvidia-nvjpeg" in problems[0], problems
    kept["nvidia-nvjpeg"] = _fake_wheel(tmp_path, "nvidia-nvjpeg", "13.0")
    assert gw.check_requirements(kept, wanted, "3.12") == []


def test_wheels_for_the_other_cuda_major_are_removed(gw, tmp_path):
    """A folder used for CUDA 12 and then CUDA 13 would carry both nvImageCodec wheels, which
    install into the same nvidia/nvimgcodec folder: the other major's go, the rest stays."""
    cu12 = _fake_wheel(tmp_path, "nvidia-nvimgcodec-cu12", "0.9.0")
    jpeg12 = _fake_wheel(tmp_path, "nvidia-nvjpeg-cu12", "12.4")
    cu13 = _fake_wheel(tmp_path, "nvidia-nvimgcodec-cu13", "0.9.0")
    other = _fake_wheel(tmp_path, "simplejpeg", "1.9.0")
    gw.drop_other_cuda(tmp_path, "13")
    assert not cu12.exists() and not jpeg12.exists()
    assert cu13.exists() and other.exists()


def test_a_required_version_outside_the_folders_is_reported(gw, tmp_path):
    """DALI pins nvCOMP exactly: a folder with another version would not load there."""
    wheels = {
        "nvidia-dali-cuda130": _fake_wheel(
            tmp_path, "nvidia-dali-cuda130", "2.4.0", ["nvidia-libnvcomp-cu13==5.3.0.16"]
        ),
        "nvidia-libnvcomp-cu13": _fake_wheel(tmp_path, "nvidia-libnvcomp-cu13", "5.4.0"),
    }
    problems = gw.check_requirements(wheels, [Requirement("nvidia-dali-cuda130")], "3.12")
    assert len(problems) == 1 and "5.4.0" in problems[0], problems


def test_folder_over_60_mb_fails_without_dali(gw, tmp_path, capsys, monkeypatch):
    """The device tool carries 64 MiB a call, the repository included: over 60 MB the folder is
    refused (exit 1, saying why) unless DALI, which cannot fit anyway, was asked for. (The limit
    is scaled down here so that the test writes kilobytes, not 60 MB.)"""
    assert gw.LIMIT_BYTES == 60_000_000
    monkeypatch.setattr(gw, "LIMIT_BYTES", 60_000)
    w = _fake_wheel(tmp_path, "simplejpeg", "1.9.0", size=60_001)
    assert gw.report(tmp_path, {"simplejpeg": w}, dali=False) == 1
    assert "over the 0.06 MB limit without --dali" in capsys.readouterr().err
    assert gw.report(tmp_path, {"simplejpeg": w}, dali=True) == 0
    w.unlink()
    _fake_wheel(tmp_path, "simplejpeg", "1.9.0", size=1000)
    assert gw.report(tmp_path, {}, dali=False) == 0


def _extra(name: str) -> list[Requirement]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert name in extras, sorted(extras)
    return [Requirement(r) for r in extras[name]]


@pytest.mark.parametrize(
    ("extra", "cu", "dali"), [("cuda12", "cu12", "120"), ("cuda13", "cu13", "130")]
)
def test_cuda_extras_name_one_cuda_major(extra, cu, dali):
    """gpuload[cuda12] and gpuload[cuda13] each install numba-cuda, nvImageCodec (with the nvJPEG
    wheel it loads) and DALI built for their CUDA major only: mixing majors loads two CUDA
    runtimes, and a CUDA 13 package does not run on a CUDA 12 driver."""
    reqs = {canonicalize_name(r.name): r for r in _extra(extra)}
    assert set(reqs) == {"numba-cuda", f"nvidia-nvimgcodec-{cu}", f"nvidia-dali-cuda{dali}"}
    assert reqs["numba-cuda"].extras == {cu}
    assert reqs[f"nvidia-nvimgcodec-{cu}"].extras == {"nvjpeg"}
    other = "cu13" if cu == "cu12" else "cu12"
    for r in reqs.values():
        assert other not in str(r) and f"cuda{other[2:]}0" not in str(r), r


def test_cuda_extra_is_the_cuda12_set():
    """`gpuload[cuda]` predates the per-major extras; it stays the CUDA 12 set so that existing
    install lines keep working."""
    assert [str(r) for r in _extra("cuda")] == ["gpuload[cuda12]"]
