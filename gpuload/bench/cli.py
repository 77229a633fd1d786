"""Command-line registration for demo data and benchmarks."""

from __future__ import annotations

import argparse


def _demo_table(args: argparse.Namespace) -> int:
    from ..client import table_location
    from ..demo import make_demo_table

    t = make_demo_table(
        table_location(args.dest, args.root, args.storage_options),
        storage_options=args.storage_options,
        rows=args.rows,
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


def register_demo(sub) -> None:
    s = sub.add_parser(
        "demo-table",
        help="generate the robot-like demo table (480x640 JPEG, float32[14], label, text)",
    )
    s.add_argument(
        "dest", help="the table to create: a name under --root, or a path or URL ('/' or '://')"
    )
    s.add_argument("--rows", type=int, default=10_000)
    s.add_argument("--seed", type=int, default=0)
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
