"""The ``gpuload`` command line: ingest, info, ls, rm, vacuum, verify, warmup (and demo-table,
bench)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .client import Client, ingest, is_location, table_location
from .errors import GpuloadError, TableNotFoundError
from .storage import Store
from .table import Table, open_table
from .versions import table_exists

__all__ = ["main"]

# API spellings in error messages, and what a command-line user types instead
_CLI_SPELLING = (
    ("mode='append'", "--mode append"),
    ("mode='overwrite'", "--mode overwrite"),
    ("storage_options=", "--storage-options"),
)


def _client(args: argparse.Namespace) -> Client:
    return Client(args.root, storage_options=args.storage_options)


def _open(args: argparse.Namespace) -> Table:
    if is_location(args.table):
        return open_table(table_location(args.table, None), storage_options=args.storage_options)
    return _client(args).open_table(args.table)


def _store(args: argparse.Namespace) -> tuple[Store, str]:
    """The store of an existing table and how to call it; TableNotFoundError otherwise."""
    url = table_location(args.table, args.root, args.storage_options)
    store = Store(url, args.storage_options)
    if not table_exists(store):
        where = url if is_location(args.table) else f"{args.table!r} under {_client(args).root}"
        raise TableNotFoundError(f"no table at {where}")
    return store, args.table


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
    if is_location(args.table):
        url = table_location(args.table, None)
        t = ingest(url, args.source, storage_options=args.storage_options, **kwargs)
    else:
        t = _client(args).ingest(args.table, args.source, **kwargs)
    print(
        f"ingested {len(t)} rows into {t.url} (version {t.version}, {t.num_chunks} chunks, {_human(t.nbytes)})"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    info = _open(args).info()
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
        meta = info["column_metadata"].get(name)
        if meta:
            print(f"  {'':<20} metadata {json.dumps(meta, sort_keys=True)}")
    if info["metadata"]:
        print(f"metadata {json.dumps(info['metadata'], sort_keys=True)}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    client = _client(args)
    names = client.list_tables()
    if not names:
        print(f"no tables under {client.root}")
        return 0
    for n in names:
        t = client.open_table(n)
        print(f"{n:<30} {len(t):>10} rows  {_human(t.nbytes):>10}  v{t.version}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store, label = _store(args)
    if not args.yes:
        if not sys.stdin.isatty():
            print(
                f"gpuload: error: not deleting {label!r} without confirmation: there is no "
                "terminal to ask on; pass --yes",
                file=sys.stderr,
            )
            return 2
        t = open_table(store.url, storage_options=args.storage_options)
        try:
            answer = input(
                f"delete table {label!r} ({len(t)} rows, {_human(t.nbytes)}, every version)? [y/N] "
            )
        except EOFError:  # Ctrl-D: no
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted")
            return 1
    store.remove_tree()
    print(f"deleted {label}")
    return 0


def cmd_vacuum(args: argparse.Namespace) -> int:
    from .vacuum import vacuum_store

    store, label = _store(args)
    report = vacuum_store(store, label, args.older_than_hours * 3600.0, args.dry_run)
    print(report)
    for rel in report.removed:
        print(f"  {'would remove' if args.dry_run else 'removed'} {rel}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    report = _open(args).verify()
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


def cmd_warmup(args: argparse.Namespace) -> int:
    """Compile the fused CPU kernel of each ``--image`` pipeline into the kernel cache, so a
    container image or cluster node built with it starts its first batch without compiling."""
    import time

    from .kernels.fused import kernel_cache_dir
    from .ops import compile_ops, parse_ops, warm_up

    try:
        plans = [compile_ops(parse_ops(text)) for text in args.image]
    except ValueError as e:
        raise GpuloadError(str(e)) from None
    where = kernel_cache_dir()
    if where is None:
        raise GpuloadError("the kernel cache is off (GPULOAD_KERNEL_CACHE=0): nothing to warm")
    for text, plan in zip(args.image, plans):
        t = time.perf_counter()
        warm_up(plan, "cpu").result()
        print(f"{text}: ready in {time.perf_counter() - t:.1f} s")
    print(f"kernel cache: {where}")
    return 0


def _hours(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of hours >= 0, got {text!r}")
    return v


def _json_object(text: str) -> dict:
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return v


TABLE_HELP = "a table name under --root, or a path or URL (anything with '/' or '://')"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpuload",
        description="GPU-first data loader: tables, ingest, benchmarks. " + TABLE_HELP.capitalize()
        + " names a table in every command.",
    )  # fmt: skip
    p.add_argument("--version", action="version", version=f"gpuload {__version__}")
    p.add_argument(
        "--root", default=None, help="table root (default: $GPULOAD_ROOT or a local folder)"
    )
    p.add_argument(
        "--storage-options",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="fsspec options for remote tables, e.g. '{\"anon\": true}' or an S3 endpoint",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "ingest", help="write a Parquet file/folder, image folder or table as a table"
    )
    s.add_argument(
        "source", help="Parquet file or folder, image folder (class subfolders) or table path"
    )
    s.add_argument("table", help=TABLE_HELP)
    s.add_argument("--mode", choices=("create", "append", "overwrite"), default="create")
    s.add_argument("--chunk-mb", type=float, default=32.0, help="target chunk size in MB")
    s.add_argument("--no-progress", dest="progress", action="store_false")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("info", help="schema, column metadata, rows, size and chunks of a table")
    s.add_argument("table", help=TABLE_HELP)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("ls", help="list the tables under the root")
    s.set_defaults(func=cmd_ls)

    s = sub.add_parser("rm", help="delete a table (asks first)")
    s.add_argument("table", help=TABLE_HELP)
    s.add_argument(
        "-y", "--yes", action="store_true", help="do not ask (needed without a terminal)"
    )
    s.set_defaults(func=cmd_rm)

    s = sub.add_parser("vacuum", help="delete chunk files no commit names (left by killed writers)")
    s.add_argument("table", help=TABLE_HELP)
    s.add_argument(
        "--older-than-hours",
        type=_hours,
        default=24.0,
        help="only files older than this (default 24; must exceed the longest running ingest)",
    )
    s.add_argument("--dry-run", action="store_true", help="list what would be removed")
    s.set_defaults(func=cmd_vacuum)

    s = sub.add_parser("verify", help="read every chunk and check it against its checksums")
    s.add_argument("table", help=TABLE_HELP)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser(
        "warmup",
        help="compile the image kernels a training job will use into the kernel cache "
        "(run it when building a container image; see docs/LOADER.md)",
    )
    s.add_argument(
        "--image",
        action="append",
        required=True,
        metavar="OPS",
        help="one pipeline's image ops as Python calls, e.g. \"RandomResizedCrop(224), "
        'RandomHorizontalFlip(), Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))"; '
        "repeat for each pipeline",
    )
    s.set_defaults(func=cmd_warmup)

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
        print(f"gpuload: error: {_cli_spelling(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _cli_spelling(message: str) -> str:
    """An error message with the API's option spellings replaced by the command line's."""
    for api, flag in _CLI_SPELLING:
        message = message.replace(api, flag)
    return message


if __name__ == "__main__":
    sys.exit(main())
