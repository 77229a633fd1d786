#!/usr/bin/env bash
# Downloads, on a machine with package access, the wheels a bare CUDA machine without internet
# (the device machine) needs for gpuload and its image lacks: nvImageCodec and the nvJPEG wheel it
# loads, simplejpeg, and with --dali DALI. One version of each; fails over 60 MB without --dali.
#
#   bash benchmarks/gpu_wheels.sh [--python 3.12] [--cuda 13] [--dest .whl] [--dali] [--list]
#
# --list prints the pip commands and package names without touching the network. The work is
# done by gpu_wheels.py beside this file (PYTHON=... picks the interpreter whose pip is used).
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/gpu_wheels.py" "$@"
