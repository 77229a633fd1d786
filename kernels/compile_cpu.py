"""``python -m gpuload.kernels.compile_cpu SPEC_JSON parallel|serial``: compile one CPU kernel
specialisation into the on-disk kernel cache and exit (``fused.compile_in_child`` runs it so a
loader's cold start does not share its process's GIL with Numba's compiler)."""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    """Compile the kernel described by ``argv`` (see the module docstring); 0 when cached."""
    from gpuload.kernels import fused

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[1] not in ("parallel", "serial"):
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    spec = fused.KernelSpec(**json.loads(args[0]))
    kernel = fused.get_cpu_kernel(spec, parallel=args[1] == "parallel")
    if not fused.has_disk_cache(kernel):
        print("the on-disk kernel cache is not usable here", file=sys.stderr)
        return 1
    fused.compile_cpu_kernel(kernel, fused.sample_args(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
