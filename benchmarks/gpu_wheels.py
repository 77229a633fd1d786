"""A folder of wheels for a GPU machine that cannot reach a package index (the device machine).

Its image (the 'cuda' image of /work/.library/device/KINDS.md) already holds numpy, numba,
numba-cuda, CuPy, PyTorch and JAX, but not simplejpeg, nvImageCodec or DALI, and nothing can be
installed there from an index. Run on a machine with package access, this downloads the wheels
gpuload needs there and the image lacks, for the target's Python and CUDA major version:

* nvImageCodec for that CUDA major, with the nvJPEG wheel it loads at run time (its ``nvjpeg``
  extra: the library is dlopen'ed, so nothing fails until the first decode);
* every core dependency of gpuload (pyproject.toml ``dependencies``) the image lacks: simplejpeg;
* with ``--dali`` only, DALI and what it needs that the image lacks (far larger: hundreds of MB).

It keeps one version of each package (two stop the whole ``pip install`` there), checks that
every run-time requirement of the wheels it fetched is met by the folder or by the image, prints
each wheel with its size and the total, and fails when the folder exceeds 60 MB without
``--dali``: the device tool carries at most 64 MiB a call, the repository included.

    bash benchmarks/gpu_wheels.sh [--python 3.12] [--cuda 13] [--dest .whl] [--dali] [--list]

Then ``bash benchmarks/gpu_check.sh --wheels .whl`` there installs them with gpuload (the
device call names the folder in ``carry``); by hand, a call starts with

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
"""

from __future__ import annotations

import argparse
import email.parser
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

try:  # the machine that prepares the folder need not have gpuload's environment: pip's copies
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version
except ImportError:  # pragma: no cover - depends on the machine
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import InvalidVersion, Version
try:
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent

# The device machine is x86-64 Linux with glibc 2.39: any of these tags runs there. pip matches
# each manylinux_2_N exactly, so every tag a needed wheel is published under must be named.
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
LIMIT_BYTES = 60_000_000  # without --dali; the device tool carries 64 MiB a call in all
CARRY_BYTES = 64 * 2**20

# Per CUDA major: nvImageCodec, the nvJPEG wheel it loads (named by its `nvjpeg` extra; CUDA 13's
# NVIDIA library wheels dropped the -cu13 suffix), DALI, and what DALI needs beyond that (its
# `nvidia-nvimgcodec-cuXX[all]` and its own pins). Checked against the wheels' METADATA, which
# check_requirements() re-reads on every real run.
CUDA = {
    "12": {
        "nvimgcodec": "nvidia-nvimgcodec-cu12",
        "nvjpeg": "nvidia-nvjpeg-cu12",
        "dali": "nvidia-dali-cuda120",
        "dali_libs": ("nvidia-libnvcomp-cu12", "nvidia-nvjpeg2k-cu12", "nvidia-nvtiff-cu12"),
    },
    "13": {
        "nvimgcodec": "nvidia-nvimgcodec-cu13",
        "nvjpeg": "nvidia-nvjpeg",
        "dali": "nvidia-dali-cuda130",
        "dali_libs": ("nvidia-libnvcomp-cu13", "nvidia-nvjpeg2k-cu13", "nvidia-nvtiff-cu13"),
    },
}
# DALI's pure-Python (or small) requirements that the image lacks (six, packaging, numpy it has).
DALI_PY = ("astunparse", "gast", "optree", "nvtx", "makefun", "libcst")

# "Python packages already there" in /work/.library/device/KINDS.md, as read on 2026-11-17.
# Versions are not listed there; a requirement one of these names is taken as met.
# Pasted as it reads there, so that the next reading can be compared or pasted over it.
IMAGE_PACKAGES = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
    jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
    lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
    ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
    nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
    nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
    pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf
    psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
    scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
    torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
    treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug
    wheel wrapt xarray xxhash yarl zipp
    """
IMAGE_HAS = frozenset(map(canonicalize_name, IMAGE_PACKAGES.split()))


def core_missing(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """gpuload's core dependencies that the image lacks (read, not copied, so a new one counts)."""
    with open(pyproject, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return [r for r in map(Requirement, deps) if canonicalize_name(r.name) not in IMAGE_HAS]


def plan(cuda: str, dali: bool) -> tuple[list[Requirement], list[str]]:
    """(first round, second round): the second round's versions follow the first's METADATA.

    The first round's requirements carry the extras whose requirements must be met (nvImageCodec's
    ``nvjpeg``); pip is given their names and versions only."""
    c = CUDA[cuda]
    first = [Requirement(c["nvimgcodec"] + "[nvjpeg]"), *core_missing()]
    second = [c["nvjpeg"]]
    if dali:
        first.append(Requirement(c["dali"]))
        second += [*c["dali_libs"], *DALI_PY]
    return first, second


def pip_command(python: str, dest: Path, names: list[str]) -> list[str]:
    """The one download command: binary wheels for the target only, never their dependencies."""
    cmd = ["python3", "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python, "--implementation", "cp"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    return [*cmd, "-d", str(dest), *names]


def wheel_name(filename: str) -> tuple[str, str]:
    """(canonical project name, version) from a wheel's file name."""
    name, version = filename.split("-")[:2]
    return canonicalize_name(name), version


def _version(v: str) -> Version:
    try:
        return Version(v)
    except InvalidVersion:
        return Version("0")


def read_requires(path: Path) -> list[Requirement]:
    """A wheel's Requires-Dist, from its METADATA."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode("utf-8", "replace"))
    return [Requirement(r) for r in msg.get_all("Requires-Dist") or []]


def marker_env(python: str) -> dict[str, str]:
    """The target machine as environment markers see it (x86-64 Linux, CPython ``python``)."""
    return {
        "python_version": python,
        "python_full_version": python + ".0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "platform_system": "Linux",
        "sys_platform": "linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
    }


def requirements_of(
    wheels: dict[str, Path], wanted: list[Requirement], python: str
) -> dict[str, list[tuple[str, Requirement]]]:
    """Every requirement that applies on the target, as {package: [(needed by, requirement)]},
    following the extras asked for (in ``wanted`` and by the wheels themselves)."""
    extras: dict[str, set[str]] = {canonicalize_name(r.name): set(r.extras) for r in wanted}
    env = marker_env(python)
    reqs = {n: read_requires(p) for n, p in wheels.items()}
    while True:
        out: dict[str, list[tuple[str, Requirement]]] = {}
        for n, rs in reqs.items():
            for r in rs:
                active = r.marker is None or any(
                    r.marker.evaluate({**env, "extra": e}) for e in {"", *extras.get(n, ())}
                )
                if active:
                    out.setdefault(canonicalize_name(r.name), []).append((n, r))
        grown = False
        for dep, by in out.items():
            new = {e for _, r in by for e in r.extras} - extras.get(dep, set())
            if new:
                extras.setdefault(dep, set()).update(new)
                grown = True
        if not grown:
            return out


def check_requirements(
    wheels: dict[str, Path], wanted: list[Requirement], python: str
) -> list[str]:
    """What the target would lack at run time: requirements neither the folder nor the image
    meets (a wheel of a version outside the range counts as missing)."""
    problems = []
    have = {n: wheel_name(p.name)[1] for n, p in wheels.items()}
    for dep, by in sorted(requirements_of(wheels, wanted, python).items()):
        for who, r in by:
            if dep in have:
                if not r.specifier.contains(have[dep], prereleases=True):
                    problems.append(f"{who} needs {r}, but the folder has {dep} {have[dep]}")
            elif dep not in IMAGE_HAS:
                problems.append(f"{who} needs {r}, which neither the folder nor the image holds")
    return problems


def pins(wheels: dict[str, Path], wanted: list[Requirement], python: str, names: list[str]):
    """The second round's requirement strings: each name with the versions the first round's
    wheels ask of it (DALI pins nvCOMP exactly, say), so that the two rounds agree."""
    reqs = requirements_of(wheels, wanted, python)
    out = []
    for name in names:
        spec = SpecifierSet()
        for _, r in reqs.get(canonicalize_name(name), []):
            spec &= r.specifier
        out.append(name + str(spec))
    return out


def run_pip(cmd: list[str]) -> list[str]:
    """Runs pip with this interpreter, echoing its output; returns the wheel file names it saved
    or found already there."""
    print("+", shlex.join(cmd), flush=True)
    p = subprocess.Popen(
        [sys.executable, *cmd[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    got = []
    for line in p.stdout:
        print(line, end="", flush=True)
        m = re.match(r"\s*(?:Saved|File was already downloaded)\s+(\S+\.whl)\s*$", line)
        if m:
            got.append(os.path.basename(m.group(1)))
    if p.wait():
        sys.exit(f"gpu_wheels: pip download failed (exit {p.returncode}); see its output above")
    return got


def keep_one_version(dest: Path, names: list[str], chosen: list[str]) -> dict[str, Path]:
    """Removes every other version of each package in ``names`` from ``dest``: the one pip just
    chose stays (else the highest). Returns {package: wheel path}."""
    picked = {wheel_name(f)[0]: f for f in chosen}
    kept = {}
    for name in map(canonicalize_name, names):
        found = [p for p in dest.glob("*.whl") if wheel_name(p.name)[0] == name]
        if not found:
            continue
        keep = next((p for p in found if p.name == picked.get(name)), None)
        keep = keep or max(found, key=lambda p: _version(wheel_name(p.name)[1]))
        for p in found:
            if p != keep:
                print(f"removed {p.name} (another version of {name} stays: {keep.name})")
                p.unlink()
        kept[name] = keep
    return kept


def drop_other_cuda(dest: Path, cuda: str) -> None:
    """Removes this script's wheels for the other CUDA major: both nvImageCodec wheels install
    into nvidia/nvimgcodec, so carrying both would leave a mix of the two there."""
    other = {
        canonicalize_name(n)
        for major, c in CUDA.items()
        if major != cuda
        for n in (c["nvimgcodec"], c["nvjpeg"], c["dali"], *c["dali_libs"])
    }
    for p in sorted(dest.glob("*.whl")):
        if wheel_name(p.name)[0] in other:
            print(f"removed {p.name} (not for CUDA {cuda})")
            p.unlink()


def report(dest: Path, kept: dict[str, Path], dali: bool) -> int:
    """Prints each wheel in the folder with its size and the total; the exit status for the size."""
    files = sorted(dest.glob("*.whl"), key=lambda p: -p.stat().st_size)
    ours = set(kept.values())
    total = 0
    print(f"\nwheels in {dest}:")
    for p in files:
        size = p.stat().st_size
        total += size
        note = "" if p in ours else "   (not of this set; it travels too)"
        print(f"{size / 1e6:9.2f} MB  {p.name}{note}")
    print(f"{total / 1e6:9.2f} MB  total ({len(files)} wheels)")
    for p in files:
        if p.stat().st_size > CARRY_BYTES:
            print(f"note: {p.name} alone exceeds the 64 MiB the device tool carries in one call")
    if total > LIMIT_BYTES and not dali:
        print(
            f"gpu_wheels: {dest} holds {total / 1e6:.1f} MB, over the {LIMIT_BYTES / 1e6:g} MB "
            "limit without --dali (the device "
            "tool carries 64 MiB a call, the repository included); remove what is not needed",
            file=sys.stderr,
        )
        return 1
    if total > CARRY_BYTES:
        print(f"note: {total / 1e6:.1f} MB is over the 64 MiB the device tool carries a call")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bash benchmarks/gpu_wheels.sh",
        description="Download the wheels a bare CUDA machine without internet needs for gpuload.",
    )
    ap.add_argument("--python", default="3.12", help="target Python X.Y (default 3.12)")
    ap.add_argument("--cuda", default="13", help="target CUDA major version: 12 or 13 (default 13)")
    ap.add_argument("--dest", help="the wheels folder (default: .whl in the repository's root)")
    ap.add_argument("--dali", action="store_true", help="DALI too (hundreds of MB)")
    ap.add_argument("--list", action="store_true", help="print the commands only (no network)")
    a = ap.parse_args(argv)
    if a.cuda not in CUDA:
        ap.error(
            f"--cuda {a.cuda} is not supported: choose 12 or 13 "
            "(nvImageCodec and DALI publish wheels for CUDA 12 and CUDA 13 only)"
        )
    if not re.fullmatch(r"3\.\d{1,2}", a.python):
        ap.error(f"--python {a.python}: give the target's Python as X.Y, e.g. 3.12")
    a.dest = Path(a.dest).absolute() if a.dest else ROOT / ".whl"
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    first, second = plan(a.cuda, a.dali)
    names = [r.name + str(r.specifier) for r in first]
    if a.list:
        print(shlex.join(pip_command(a.python, a.dest, names)))
        print(shlex.join(pip_command(a.python, a.dest, second)))
        print("# the second command's versions are those the first command's wheels require")
        print("packages:", " ".join(sorted([r.name for r in first] + second)))
        return 0
    a.dest.mkdir(parents=True, exist_ok=True)
    chosen = run_pip(pip_command(a.python, a.dest, names))
    kept = keep_one_version(a.dest, [r.name for r in first], chosen)
    wanted = first + [Requirement(n) for n in second]
    chosen += run_pip(pip_command(a.python, a.dest, pins(kept, wanted, a.python, second)))
    kept = keep_one_version(a.dest, [r.name for r in first] + second, chosen)
    drop_other_cuda(a.dest, a.cuda)
    problems = check_requirements(kept, wanted, a.python)
    status = report(a.dest, kept, a.dali)
    if problems:
        print("gpu_wheels: the target would lack at run time:", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        print("add them to CUDA / DALI_PY in benchmarks/gpu_wheels.py", file=sys.stderr)
        return 1
    if status:
        return status
    where = os.path.relpath(a.dest, ROOT) if a.dest.is_relative_to(ROOT) else None
    if where is None:
        print(f"\nTo use them there, copy {a.dest} into a git-ignored folder of the repository.")
    where = where or ".whl"
    print(
        f"\nOn the device machine: carry [{where!r}] and start the command with\n"
        "  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
        f"--target /tmp/site {where}/*.whl && export PYTHONPATH=/tmp/site || exit;"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
