#!/usr/bin/env bash
# The GPU check in one command, for a bare GPU machine without internet:
#
#   bash benchmarks/gpu_check.sh [--wheels DIR] [--out DIR] [--dry-run]
#
# Installs gpuload from this checkout, and every wheel in DIR, with pip --no-index --no-deps
# into a private folder (put first on PYTHONPATH; the machine's torch/CUDA stack is never
# touched), then runs benchmarks/gpu_check.py: the environment report, the GPU-only and
# simulator tests, the GPU benchmark cases, results.json + report.md in DIR (default
# ./gpu-check-out). Exit status 0 only when nothing failed. --dry-run: the same here without a
# GPU (Numba's CUDA simulator, CPU decode, tiny sizes), as CI runs it. PYTHON picks the
# interpreter (default python3). Prepare DIR with benchmarks/gpu_wheels.sh.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
wheels=""
out="gpu-check-out"
dry=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="${2:?--wheels needs a folder}"; shift 2 ;;
    --out) out="${2:?--out needs a folder}"; shift 2 ;;
    --dry-run) dry=(--dry-run); shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (--wheels DIR, --out DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
site="$(mktemp -d "${TMPDIR:-/tmp}/gpuload-check-site.XXXXXX")"
build="$(mktemp -d "${TMPDIR:-/tmp}/gpuload-check-build.XXXXXX")"
trap 'rm -rf "$site" "$build"' EXIT
pkgs=("$here")
if [ -n "$wheels" ]; then
  shopt -s nullglob
  found=("$wheels"/*.whl)
  shopt -u nullglob
  [ ${#found[@]} -gt 0 ] || { echo "gpu_check.sh: no wheels in $wheels" >&2; exit 2; }
  pkgs+=("${found[@]}")
fi
echo "[gpu_check] installing gpuload from $here${wheels:+ and ${#found[@]} wheels from $wheels} into $site"
# the source tree is copied first, so the build leaves nothing in the checkout
cp -r "$here/gpuload" "$here/kernels" "$here/pyproject.toml" "$here/README.md" "$build"/ || exit 2
pkgs[0]="$build"
"$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
  --disable-pip-version-check --target "$site" "${pkgs[@]}" || {
  echo "gpu_check.sh: installing into $site failed (pip needs setuptools and wheel for the build)" >&2
  exit 2
}
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
"$py" "$here/benchmarks/gpu_check.py" --out "$out" --checkout "$here" --site "$site" "${dry[@]}"
