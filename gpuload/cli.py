"""The ``gpuload`` command line: ingest, info, ls, rm, vacuum, verify (and demo-table, bench)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from .client import Client, ingest
from .errors import GpuloadError
from .table import Table, open_table

__all__ = ["main"]


def _is_location(s: str) -> bool:
    """A TABLE argument naming a path or URL rather than a table under the client root."""
    return "://" in s or os.sep in s or s.startswith(".") or s.startswith("~")


def _open(spec: str, root: str | None) -> Table:
    if _is_location(spec):
        return open_table(spec)
    return Client(root).open_table(spec)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def cmd_ingest(args: argparse.Namespace) -> int:
    kwargs = dict(
        mode=args.mode,
        chunk_bytes=int(args.chunk_mb * (1 << 20)),
        progress=None if args.progress else False,
    )
    if _is_location(args.table):
        t = ingest(args.table, args.source, **kwargs)
    else:
        t = Client(args.root).ingest(args.table, args.source, **kwargs)
    print(
        f"ingested {len(t)} rows into {t.url} (version {t.version}, {t.num_chunks} chunks, {_human(t.nbytes)})"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    info = _open(args.table, args.root).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"table    {info['name']}  ({info['url']})")
    print(f"version  {info['version']}")
    print(f"rows     {info['rows']}")
    print(f"size     {_human(info['bytes'])} in {info['chunks']} chunks")
    print(f"checksums {info['checksums']}")
    print("schema")
    for name, typ in info["schema"].items():
        print(f"  {name:<20} {typ:<16} {_human(info['column_bytes'].get(name, 0))}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    client = Client(args.root)
    names = client.list_tables()
    if not names:
        print(f"no tables under {client.root}")
        return 0
    for n in names:
        t = client.open_table(n)
        print(f"{n:<30} {len(t):>10} rows  {_human(t.nbytes):>10}  v{t.version}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    Client(args.root).delete_table(args.table)
    print(f"deleted {args.table}")
    return 0


def cmd_vacuum(args: argparse.Namespace) -> int:
    from .storage import Store
    from .vacuum import vacuum_store

    older = args.older_than_hours * 3600.0
    if _is_location(args.table):
        label = os.path.basename(args.table.rstrip("/")) or args.table
        report = vacuum_store(Store(args.table), label, older, args.dry_run)
    else:
        report = Client(args.root).vacuum(args.table, older, args.dry_run)
    print(report)
    for rel in report.removed:
        print(f"  {'would remove' if args.dry_run else 'removed'} {rel}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    t = _open(args.table, args.root)
    report = t.verify()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{report['table']} v{report['version']}: {report['verified']} of {report['chunks']} "
            f"chunks verified ({_human(report['bytes'])}), {len(report['bad'])} bad, "
            f"{len(report['unverified'])} without checksums"
        )
        for bad in report["bad"]:
            print(f"  BAD {bad['chunk']}: {bad['error']}")
        for rel in report["unverified"]:
            print(f"  not verifiable (written before checksums): {rel}")
    return 0 if report["ok"] else 1


def _hours(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of hours >= 0, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpuload", description="GPU-first data loader: tables, ingest, benchmarks."
    )
    p.add_argument(
        "--root", default=None, help="table root (default: $GPULOAD_ROOT or a local folder)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "ingest", help="write a Parquet file/folder, image folder or table as a table"
    )
    s.add_argument(
        "source", help="Parquet file or folder, image folder (class subfolders) or table path"
    )
    s.add_argument("table", help="table name (under --root) or a path/URL")
    s.add_argument("--mode", choices=("create", "append", "overwrite"), default="create")
    s.add_argument("--chunk-mb", type=float, default=32.0, help="target chunk size in MB")
    s.add_argument("--no-progress", dest="progress", action="store_false")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("info", help="schema, rows, size and chunks of a table")
    s.add_argument("table")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("ls", help="list the tables under the root")
    s.set_defaults(func=cmd_ls)

    s = sub.add_parser("rm", help="delete a table")
    s.add_argument("table")
    s.set_defaults(func=cmd_rm)

    s = sub.add_parser("vacuum", help="delete chunk files no commit names (left by killed writers)")
    s.add_argument("table")
    s.add_argument(
        "--older-than-hours",
        type=_hours,
        default=24.0,
        help="only files older than this (default 24; must exceed the longest running ingest)",
    )
    s.add_argument("--dry-run", action="store_true", help="list what would be removed")
    s.set_defaults(func=cmd_vacuum)

    s = sub.add_parser("verify", help="read every chunk and check it against its checksums")
    s.add_argument("table")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_verify)

    for register in _extra_commands():
        register(sub)
    return p


def _extra_commands():
    """Subcommands that live beside their features (demo data, benchmarks)."""
    from .bench import cli as bench_cli

    return bench_cli.REGISTER


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except GpuloadError as e:
        print(f"gpuload: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
