"""Command-line registration for demo data and benchmarks."""

from __future__ import annotations

import argparse

from ..errors import GpuloadError


def _demo_table(args: argparse.Namespace) -> int:
    from ..client import table_location
    from ..demo import make_demo_table

    if args.episodes is not None:
        return _episode_table(args)
    if args.size is not None or args.fps is not None:
        raise GpuloadError("demo-table: --size and --fps apply to --episodes tables")
    t = make_demo_table(
        table_location(_dest(args, required=True), args.root, args.storage_options),
        storage_options=args.storage_options,
        rows=10_000 if args.rows is None else args.rows,
        seed=args.seed,
        mode=args.mode,
        workers=args.workers,
        progress=None if args.progress else False,
    )
    size = sum(len(x) for x in t[: min(len(t), 256)]["image"]) / max(1, min(len(t), 256))
    print(
        f"demo table {t.url}: {len(t)} rows, {t.nbytes / 2**20:.1f} MiB, mean JPEG {size / 1e3:.1f} kB"
    )
    return 0


def _dest(args: argparse.Namespace, required: bool) -> str | None:
    """The table to create: TABLE or --out (one of them; both is an error)."""
    if args.dest is not None and args.out is not None:
        raise GpuloadError("demo-table: give the table as TABLE or --out, not both")
    dest = args.dest if args.dest is not None else args.out
    if dest is None and required:
        raise GpuloadError("demo-table: name the table to create (TABLE or --out PATH)")
    return dest


def _episode_table(args: argparse.Namespace) -> int:
    """``demo-table --episodes N``: the ALOHA-like episode table, at TABLE/--out or, with
    neither, in the benchmark cache (reused when one with the same arguments is there)."""
    from ..client import table_location
    from ..demo import EPISODE_FPS, EPISODE_SIZE, ensure_episode_table, make_episode_table
    from ..table import open_table
    from .suites import cache_root

    size, fps = args.size or EPISODE_SIZE, EPISODE_FPS if args.fps is None else args.fps
    progress = None if args.progress else False
    dest = _dest(args, required=False)
    if dest is None:
        path, made = ensure_episode_table(
            cache_root(), args.episodes, args.seed, size, fps, progress, args.workers
        )
        t = open_table(path)
    else:
        t = make_episode_table(
            table_location(dest, args.root, args.storage_options),
            episodes=args.episodes,
            seed=args.seed,
            size=size,
            fps=fps,
            mode=args.mode,
            workers=args.workers,
            progress=progress,
            storage_options=args.storage_options,
        )
        made = True
    n = min(len(t), 256)
    kb = sum(len(x) for x in t[:n]["cam_high"]) / n / 1e3
    print(
        f"episode table {t.url}: {args.episodes} episodes, {len(t)} rows at {fps:g} fps, "
        f"{size[0]}x{size[1]} JPEGs (mean {kb:.1f} kB), {t.nbytes / 2**20:.1f} MiB"
        + ("" if made else " (already there)")
    )
    return 0


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return v


def _size(text: str) -> tuple[int, int]:
    """``HxW`` (e.g. 96x128) as (height, width)."""
    h, _, w = text.lower().partition("x")
    try:
        size = (int(h), int(w))
    except ValueError:
        size = (0, 0)
    if min(size) < 32:
        raise argparse.ArgumentTypeError(f"expected HxW with both sides >= 32, got {text!r}")
    return size


def register_demo(sub) -> None:
    s = sub.add_parser(
        "demo-table",
        help="generate the robot-like demo table (480x640 JPEG, float32[14], label, text), or "
        "with --episodes an ALOHA-like episode table (two cameras, state, action, task)",
    )
    s.add_argument(
        "dest",
        nargs="?",
        metavar="TABLE",
        help="the table to create: a name under --root, or a path or URL ('/' or '://'); with "
        "--episodes and neither TABLE nor --out, a cached table in ~/.cache/gpuload/bench "
        "(or $GPULOAD_BENCH_CACHE), reused when there",
    )
    s.add_argument("--out", metavar="PATH", help="the table to create (instead of TABLE)")
    what = s.add_mutually_exclusive_group()
    what.add_argument(
        "--rows", type=_positive, default=None, metavar="N", help="demo rows (default 10000)"
    )
    what.add_argument(
        "--episodes",
        type=_positive,
        default=None,
        metavar="N",
        help="make an ALOHA-like episode table of N episodes (40-120 frames each)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--size", type=_size, default=None, metavar="HxW", help="episode images (default 480x640)"
    )
    s.add_argument("--fps", type=float, default=None, help="episode frame rate (default 50)")
    s.add_argument("--mode", choices=("create", "overwrite"), default="create")
    s.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    s.add_argument("--no-progress", dest="progress", action="store_false")
    s.set_defaults(func=_demo_table)


def _bench(args: argparse.Namespace) -> int:
    from ..client import table_location
    from .runner import config_from_args, execute

    if args.storage_options:
        raise SystemExit(
            "gpuload bench: --storage-options is not passed on to the benchmark's measurements; "
            "copy the table first (gpuload --storage-options JSON ingest URL NAME) and "
            "benchmark the copy (gpuload bench NAME), or use --remote for loopback HTTP and S3 runs"
        )
    if args.table is not None:
        args.table = table_location(args.table, args.root)
    return execute(config_from_args(args))


def register_bench(sub) -> None:
    from .runner import add_arguments

    s = sub.add_parser(
        "bench",
        help="standalone benchmark: ingest, raw stream, decode, end to end, training; peers side by side",
        description=(
            "Benchmark gpuload (and the installed peers: torch DataLoader + PIL, Deeplake, DALI) "
            "on TABLE or on the demo table, each measurement in fresh processes; prints a table "
            "and writes results.json, report.md and plots with --out."
        ),
    )
    add_arguments(s)
    s.set_defaults(func=_bench)


REGISTER: list = [register_demo, register_bench]
