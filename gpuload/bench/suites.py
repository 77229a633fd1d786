"""The benchmark suites: which measurements exist, with what arguments, and the data they need.

A :class:`Measurement` names a child task (:mod:`gpuload.bench.child`) and its arguments; the
runner runs each one ``repeats`` times, each time in a fresh process. Arguments may refer to
prepared resources with ``"@name"`` placeholders (a JPEG-file copy of the rows for the plain
PIL baseline, local Deeplake copies, a 4x table, a loopback S3 copy), which
:class:`Resources` builds once, on demand, in the benchmark's cache folder.

Suites: ``ingest``, ``stream`` (raw ``batches()`` and the loaders without decode), ``decode``,
``e2e`` (decode + RandomResizedCrop + flip + normalize into tensors), ``train`` (a small CNN),
and ``memory`` (peak memory as the table grows; used by benchmarks/bench_tables.py and
bench_loader.py, not run by default).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Ratio",
    "SUITES",
    "DEFAULT_SUITES",
    "Measurement",
    "Timing",
    "Context",
    "Resources",
    "build",
    "cache_root",
    "ensure_demo",
]

SUITES = ("ingest", "stream", "decode", "e2e", "train", "memory")
DEFAULT_SUITES = ("ingest", "stream", "decode", "e2e", "train")

INSTALL = {
    "torch": "pip install torch",
    "tensorflow": "pip install tensorflow-cpu (or tensorflow; or pip install 'gpuload[peers]')",
    "deeplake": "pip install deeplake (or pip install 'gpuload[peers]')",
    "nvidia.dali": "pip install nvidia-dali-cuda120 (or pip install 'gpuload[peers]')",
    "nvidia.nvimgcodec": "pip install nvidia-nvimgcodec-cu12 (or pip install 'gpuload[peers]')",
    "s3fs": "pip install s3fs (or pip install 'gpuload[peers]')",
    "moto": "pip install 'moto[server]' (or pip install 'gpuload[peers]')",
    "PIL": "pip install pillow",
    "simplejpeg": "pip install simplejpeg",
}


@dataclass(frozen=True)
class Timing:
    """Warm-up batches (excluded) and the minimum timed window, per kind of measurement."""

    stream: tuple[int, float] = (3, 0.8)
    loader: tuple[int, float] = (4, 1.0)
    decode: tuple[int, float] = (1, 1.0)
    e2e: tuple[int, float] = (4, 2.5)
    train_steps: int = 200
    train_warmup: int = 3
    train_batch: int = 32
    decode_images: int = 256

    @classmethod
    def quick(cls) -> Timing:
        return cls(
            stream=(2, 0.3),
            loader=(2, 0.4),
            decode=(1, 0.4),
            e2e=(2, 0.6),
            train_steps=10,
            train_warmup=2,
            train_batch=32,
            decode_images=128,
        )


@dataclass(frozen=True)
class Ratio:
    """A ratio declared on a measurement: this row's rate over the row ``ref`` (or ``ref``'s
    over this row's, ``inverse``), named ``name`` in results.json. ``ceiling``: what it cannot
    exceed on an idle machine (a value above it, beyond noise, means the machine was busy)."""

    name: str
    ref: str
    inverse: bool = False
    ceiling: float | None = None


@dataclass
class Measurement:
    """One row of the report: a child task run ``repeats`` times in fresh processes."""

    id: str
    suite: str
    group: str
    label: str
    system: str  # "gpuload" or the peer's name
    task: str
    args: dict[str, Any]
    batch_size: int | None = None
    unit: str = "rows"  # rows or images
    requires: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()  # prepared resources (see Resources)
    needs_gpu: bool = False
    uses_gpu: bool = False
    phases: dict[str, str] = field(default_factory=lambda: {"": ""})  # child phase -> id suffix
    timeout: float = 300.0
    info: dict[str, Any] = field(default_factory=dict)
    ratios: tuple[Ratio, ...] = ()

    @property
    def is_peer(self) -> bool:
        return self.system != "gpuload"

    def ids(self) -> list[str]:
        return [self.id + suffix for suffix in self.phases.values()]


@dataclass
class Context:
    """Everything the suites need to know about this run."""

    table_url: str
    rows: int
    image: str
    label: str | None
    columns: list[str]
    storage_options: dict | None
    device: str  # "cpu" or "cuda"
    cores: int
    batch_sizes: list[int]
    remote: bool
    timing: Timing
    gpu: bool
    ingest_rows: list[int]
    loader_workers: int | None = None  # DataLoader workers in the stream suite (default: cores)

    @property
    def workers(self) -> int:
        return self.loader_workers or self.cores


def missing_modules(mods) -> list[str]:
    """The modules among ``mods`` that are not installed. ``$GPULOAD_BENCH_HIDE`` (a comma list)
    makes installed modules count as missing, to check how a run reports absent peers."""
    hidden = {x.strip() for x in os.environ.get("GPULOAD_BENCH_HIDE", "").split(",") if x.strip()}
    out = []
    for m in mods:
        if m in hidden:
            out.append(m)
            continue
        try:
            if importlib.util.find_spec(m) is None:
                out.append(m)
        except (ImportError, ValueError):
            out.append(m)
    return out


def install_hint(mods) -> str:
    return "; ".join(INSTALL.get(m, f"pip install {m}") for m in mods)


# -- suites ----------------------------------------------------------------------------------
def _src(ctx: Context) -> dict:
    d = {"url": ctx.table_url}
    if ctx.storage_options:
        d["storage_options"] = ctx.storage_options
    return d


def _clamp(ctx: Context, bs: int) -> int:
    return max(1, min(bs, ctx.rows))


def ingest_suite(ctx: Context) -> list[Measurement]:
    out = []
    for n in ctx.ingest_rows:
        out.append(
            Measurement(
                id=f"ingest.gpuload.{n}",
                suite="ingest",
                group="Ingest (client.ingest of encoded rows held in memory, local disk)",
                label="gpuload ingest",
                system="gpuload",
                task="ingest",
                args={"source": ctx.table_url, "dest": "@tmp/ingest-gpuload", "rows": n},
                info={"rows": n},
            )
        )
    for n in ctx.ingest_rows:
        out.append(
            Measurement(
                id=f"ingest.deeplake.{n}",
                suite="ingest",
                group="Ingest (client.ingest of encoded rows held in memory, local disk)",
                label="Deeplake 4 append + commit (local)",
                system="deeplake",
                task="deeplake_ingest",
                args={"source": ctx.table_url, "dest": "@tmp/ingest-deeplake", "rows": n},
                requires=("deeplake",),
                info={"rows": n},
                ratios=(Ratio("gpuload_over_this", f"ingest.gpuload.{n}", inverse=True),),
            )
        )
    return out


def loader_batch(ctx: Context) -> int:
    return _clamp(ctx, 128 if 128 in ctx.batch_sizes else ctx.batch_sizes[0])


def stream_suite(ctx: Context) -> list[Measurement]:
    w, t = ctx.timing.stream
    lw, lt = ctx.timing.loader
    group = "Raw stream: table.batches(), local, no decode"
    out = []
    for bs0 in ctx.batch_sizes:
        bs = _clamp(ctx, bs0)
        for mode, shuffle in (("seq", False), ("shuffle", True)):
            # the same read without checksum verification, once (what verification costs)
            for verify in (True, False) if bs0 == loader_batch(ctx) else (True,):
                sfx = "" if verify else ".noverify"
                out.append(
                    Measurement(
                        id=f"stream.local.{mode}.bs{bs0}{sfx}",
                        suite="stream",
                        group=group,
                        label=f"gpuload batches({bs0}{', shuffle=True' if shuffle else ''})"
                        + ("" if verify else ", verify_local=False"),
                        system="gpuload",
                        task="stream",
                        args={
                            **_src(ctx),
                            "batch_size": bs,
                            "shuffle": shuffle,
                            "warmup": w,
                            "min_time": t,
                            "verify": verify,
                        },
                        batch_size=bs0,
                        ratios=(
                            (Ratio("x_sequential", f"stream.local.seq.bs{bs0}{sfx}"),)
                            if shuffle
                            else ()
                        ),
                    )
                )
        out.append(
            Measurement(
                id=f"stream.deeplake.seq.bs{bs0}",
                suite="stream",
                group=group,
                label=f"Deeplake ds.batches({bs0}) (local copy, no shuffle exists)",
                system="deeplake",
                task="deeplake_stream",
                args={"url": "@deeplake_bytes", "batch_size": bs, "warmup": w, "min_time": t},
                batch_size=bs0,
                requires=("deeplake",),
                needs=("deeplake_bytes",),
                ratios=(Ratio("gpuload_over_this", f"stream.local.seq.bs{bs0}", inverse=True),),
            )
        )
    bs = loader_batch(ctx)
    cols = [c for c in ctx.columns if c != "instruction"] if "instruction" in ctx.columns else None
    lgroup = f"Loaders into torch tensors, no decode (batch {bs}, shuffle=True)"
    largs = {"batch_size": bs, "warmup": lw, "min_time": lt, "columns": cols}
    lwk = ctx.workers
    out += [
        Measurement(
            id="loader.fast.shuffle",
            suite="stream",
            group=lgroup,
            label="gpuload.pytorch(t, batch_size, shuffle=True) fast path",
            system="gpuload",
            task="fast",
            args={**_src(ctx), **largs, "device": ctx.device},
            batch_size=bs,
            requires=("torch",),
        ),
        Measurement(
            id=f"loader.dataloader.w{lwk}.shuffle",
            suite="stream",
            group=lgroup,
            label=f"DataLoader(gpuload.pytorch(t), shuffle=True, num_workers={lwk})",
            system="gpuload",
            task="dataloader",
            args={**_src(ctx), **largs, "workers": lwk, "warmup": max(lw, lwk + 2)},
            batch_size=bs,
            requires=("torch",),
        ),
        Measurement(
            id="loader.dataloader.w0.shuffle",
            suite="stream",
            group=lgroup,
            label="DataLoader(gpuload.pytorch(t), shuffle=True, num_workers=0)",
            system="gpuload",
            task="dataloader",
            args={**_src(ctx), **largs, "workers": 0},
            batch_size=bs,
            requires=("torch",),
        ),
        Measurement(
            id="loader.deeplake.w0.shuffle",
            suite="stream",
            group=lgroup,
            label="Deeplake DataLoader(ds.pytorch(), shuffle=True, num_workers=0)",
            system="deeplake",
            task="deeplake_dataloader",
            args={"url": "@deeplake_bytes", **largs, "workers": 0},
            batch_size=bs,
            requires=("deeplake", "torch"),
            needs=("deeplake_bytes",),
            ratios=(Ratio("gpuload_fast_path_over_this", "loader.fast.shuffle", inverse=True),),
        ),
    ]
    if ctx.remote:
        out += remote_measurements(ctx)
    return out


def remote_measurements(ctx: Context) -> list[Measurement]:
    bs = loader_batch(ctx)
    s3 = {"url": "@s3_url", "storage_options": "@s3_options"}
    phases = {"epoch1": ".cold", "epoch2": ".cached"}
    group = (
        f"Loopback S3 (moto on 127.0.0.1), batch {bs}: first epoch (cold) and second (disk cache)"
    )
    req = ("s3fs", "moto")
    cols = [c for c in ctx.columns if c != "instruction"] if "instruction" in ctx.columns else None
    local = Ratio("x_local", f"stream.local.seq.bs{bs}")
    return [
        Measurement(
            id="stream.s3.seq",
            suite="stream",
            group=group,
            label=f"gpuload batches({bs}) from S3",
            system="gpuload",
            task="stream",
            args={**s3, "cache": "@fresh_cache", "batch_size": bs, "shuffle": False, "epochs": 2},
            batch_size=bs,
            requires=req,
            needs=("s3",),
            phases=phases,
            ratios=(local,),
        ),
        Measurement(
            id="stream.s3.shuffle",
            suite="stream",
            group=group,
            label=f"gpuload batches({bs}, shuffle=True) from S3",
            system="gpuload",
            task="stream",
            args={**s3, "cache": "@fresh_cache", "batch_size": bs, "shuffle": True, "epochs": 2},
            batch_size=bs,
            requires=req,
            needs=("s3",),
            phases=phases,
        ),
        Measurement(
            id="stream.s3.seq_nocache",
            suite="stream",
            group=group,
            label=f"gpuload batches({bs}) from S3, cache=False",
            system="gpuload",
            task="stream",
            args={**s3, "cache": False, "batch_size": bs, "shuffle": False, "epochs": 1},
            batch_size=bs,
            requires=req,
            needs=("s3",),
            phases={"epoch1": ""},
            ratios=(local,),
        ),
        Measurement(
            id="loader.s3.dataloader.w0",
            suite="stream",
            group=group,
            label="DataLoader(gpuload.pytorch(t), shuffle=True, num_workers=0) from S3",
            system="gpuload",
            task="dataloader",
            args={
                **s3,
                "cache": "@fresh_cache",
                "batch_size": bs,
                "workers": 0,
                "epochs": 2,
                "columns": cols,
            },
            batch_size=bs,
            requires=req + ("torch",),
            needs=("s3",),
            phases=phases,
        ),
        Measurement(
            id="loader.s3.fast",
            suite="stream",
            group=group,
            label="gpuload.pytorch(t, batch_size, shuffle=True) fast path from S3",
            system="gpuload",
            task="fast",
            args={
                **s3,
                "cache": "@fresh_cache",
                "batch_size": bs,
                "epochs": 2,
                "columns": cols,
                "device": ctx.device,
            },
            batch_size=bs,
            requires=req + ("torch",),
            needs=("s3",),
            phases=phases,
        ),
    ]


def memory_suite(ctx: Context) -> list[Measurement]:
    bs = loader_batch(ctx)
    cols = [c for c in ctx.columns if c != "instruction"] if "instruction" in ctx.columns else None
    group = f"Peak memory as the table grows (the same rows 1x and 4x, batch {bs}, shuffle=True, one epoch)"
    out = []
    for size, url in (("1x", ctx.table_url), ("4x", "@x4")):
        needs = ("x4",) if size == "4x" else ()
        out.append(
            Measurement(
                id=f"memory.stream.{size}",
                suite="memory",
                group=group,
                label=f"gpuload batches({bs}, shuffle=True), {size} rows",
                system="gpuload",
                task="stream",
                args={"url": url, "batch_size": bs, "shuffle": True, "epochs": 1},
                batch_size=bs,
                needs=needs,
                phases={"epoch1": ""},
                info={"size": size},
            )
        )
        out.append(
            Measurement(
                id=f"memory.fast.{size}",
                suite="memory",
                group=group,
                label=f"gpuload fast path (torch), {size} rows",
                system="gpuload",
                task="fast",
                args={
                    "url": url,
                    "batch_size": bs,
                    "epochs": 1,
                    "columns": cols,
                    "device": ctx.device,
                },
                batch_size=bs,
                requires=("torch",),
                needs=needs,
                phases={"epoch1": ""},
                info={"size": size},
            )
        )
    return out


def decode_limit(ctx: Context) -> Measurement:
    w, t = ctx.timing.decode
    return Measurement(
        id="decode.raw_libjpeg",
        suite="decode",
        group="Decode only: JPEG -> RGB uint8, full size unless stated, batches of 128, in memory",
        label=f"the limit: libjpeg-turbo (simplejpeg), reused buffers, {ctx.cores} threads",
        system="libjpeg-turbo",
        task="decode",
        args={
            "url": ctx.table_url,
            "image": ctx.image,
            "method": "raw_libjpeg",
            "threads": ctx.cores,
            "images": ctx.timing.decode_images,
            "warmup": w,
            "min_time": t,
        },
        batch_size=128,
        unit="images",
        requires=("simplejpeg",),
    )


def decode_suite(ctx: Context) -> list[Measurement]:
    w, t = ctx.timing.decode
    group = decode_limit(ctx).group
    base = {
        "url": ctx.table_url,
        "image": ctx.image,
        "images": ctx.timing.decode_images,
        "warmup": w,
        "min_time": t,
    }
    pool = max(8, ctx.cores)

    def m(id, label, system, args, **kw):
        return Measurement(
            id=id,
            suite="decode",
            group=group,
            label=label,
            system=system,
            task="decode",
            args={**base, **args},
            batch_size=128,
            unit="images",
            ratios=(Ratio("x_limit", "decode.raw_libjpeg"),),
            **kw,
        )

    out = [
        decode_limit(ctx),
        m(
            "decode.pil.1t",
            "PIL Image.open().convert('RGB'), 1 thread",
            "PIL",
            {"method": "pil"},
            requires=("PIL",),
        ),
        m(
            "decode.pil.pool",
            f"PIL in a ThreadPool ({pool} workers)",
            "PIL",
            {"method": "pil_pool", "threads": pool},
            requires=("PIL",),
        ),
        m(
            "decode.gpuload.cpu",
            f"gpuload CPU decode (libjpeg-turbo, {ctx.cores} threads)",
            "gpuload",
            {"method": "gpuload", "decoder": "cpu", "device": "cpu", "threads": ctx.cores},
        ),
        m(
            "decode.gpuload.cpu_dct2",
            "gpuload CPU decode, DCT downscale 1/2 (240x320)",
            "gpuload",
            {
                "method": "gpuload",
                "decoder": "cpu",
                "device": "cpu",
                "threads": ctx.cores,
                "scale": 2,
            },
        ),
    ]
    for dec, mod in (("nvimgcodec", "nvidia.nvimgcodec"), ("dali", "nvidia.dali")):
        out.append(
            m(
                f"decode.gpuload.gpu_{dec}",
                f"gpuload GPU decode ({dec}, nvJPEG)",
                "gpuload",
                {"method": "gpuload", "decoder": dec, "device": "cuda"},
                requires=(mod,),
                needs_gpu=True,
                uses_gpu=True,
            )
        )
    return out


def e2e_suite(ctx: Context) -> list[Measurement]:
    w, t = ctx.timing.e2e
    bs = _clamp(ctx, 128)
    cuda = ctx.device == "cuda"
    where = "GPU" if cuda else "CPU"
    group = (
        f"End to end: decode + RandomResizedCrop(224) + flip + normalize -> float32 NCHW tensors "
        f"on the {where}, batch 128"
    )
    base = {
        "url": ctx.table_url,
        "image": ctx.image,
        "label": ctx.label,
        "batch_size": bs,
        "device": ctx.device,
        "workers": ctx.cores,
        "warmup": w,
        "min_time": t,
    }
    dl_warm = max(w, ctx.cores + 2)

    def m(id, label, system, args, **kw):
        ratios = (Ratio("x_limit", "decode.raw_libjpeg"),)
        if id != "e2e.gpuload.on":
            ratios += (Ratio("gpuload_default_over_this", "e2e.gpuload.on", inverse=True),)
        return Measurement(
            id=id,
            suite="e2e",
            group=group,
            label=label,
            system=system,
            task="e2e",
            args={**base, **args},
            batch_size=bs,
            unit="images",
            uses_gpu=cuda,
            timeout=kw.pop("timeout", 300.0),
            ratios=ratios,
            **kw,
        )

    return [
        m(
            "e2e.gpuload.off",
            "gpuload fast path, DCT/ROI off",
            "gpuload",
            {"kind": "gpuload", "options": "off"},
            requires=("torch",),
        ),
        m(
            "e2e.gpuload.on",
            "gpuload fast path, default (DCT downscale + row-ROI)",
            "gpuload",
            {"kind": "gpuload", "options": "on"},
            requires=("torch",),
        ),
        m(
            "e2e.gpuload.on.noverify",
            "gpuload fast path, default, checksums not verified (verify_local=False)",
            "gpuload",
            {"kind": "gpuload", "options": "on", "verify": False},
            requires=("torch",),
        ),
        m(
            "e2e.gpuload.fast",
            "gpuload fast path, roi='region' + fast IDCT (opt-in)",
            "gpuload",
            {"kind": "gpuload", "options": "fast"},
            requires=("torch", "nvidia.nvimgcodec"),
        ),
        m(
            "e2e.gpuload.tf",
            "gpuload.tensorflow(t, batch_size=128, image=...) (tf.data)",
            "gpuload",
            {"kind": "gpuload_tf", "options": "on"},
            requires=("tensorflow",),
        ),
        m(
            "e2e.gpuload.dataloader",
            f"DataLoader(gpuload.pytorch(t, transform=PIL), num_workers={ctx.cores})",
            "gpuload",
            {"kind": "gpuload_dataloader", "warmup": dl_warm},
            requires=("torch",),
        ),
        m(
            "e2e.torch_pil",
            f"torch DataLoader + PIL over JPEG files, num_workers={ctx.cores}",
            "torch+PIL",
            {"kind": "torch_pil", "files": "@files", "warmup": dl_warm},
            requires=("torch",),
            needs=("files",),
        ),
        m(
            "e2e.deeplake",
            f"Deeplake DataLoader(ds.pytorch(transform=PIL), num_workers={ctx.cores})",
            "deeplake",
            {"kind": "deeplake", "deeplake_url": "@deeplake_jpg", "warmup": dl_warm},
            requires=("deeplake", "torch"),
            needs=("deeplake_jpg",),
        ),
        m(
            "e2e.dali",
            f"DALI pipeline ({'mixed/GPU' if cuda else 'CPU'} decode, {ctx.cores} threads)",
            "dali",
            {"kind": "dali"},
            requires=("nvidia.dali", "torch"),
        ),
    ]


def train_suite(ctx: Context) -> list[Measurement]:
    tm = ctx.timing
    bs = _clamp(ctx, tm.train_batch)
    where = "GPU" if ctx.device == "cuda" else "CPU"
    group = (
        f"Training a small CNN on the {where} (batch {bs}, {tm.train_steps} timed steps after "
        f"{tm.train_warmup} warm-up steps)"
    )
    base = {
        "url": ctx.table_url,
        "image": ctx.image,
        "label": ctx.label,
        "batch_size": bs,
        "device": ctx.device,
        "workers": ctx.cores,
        "steps": tm.train_steps,
        "warmup": tm.train_warmup,
        "options": "on",
    }

    def m(id, label, system, args, **kw):
        return Measurement(
            id=id,
            suite="train",
            group=group,
            label=label,
            system=system,
            task="train",
            args={**base, **args},
            batch_size=bs,
            unit="images",
            requires=("torch",) + kw.pop("requires", ()),
            uses_gpu=ctx.device == "cuda",
            timeout=900.0,
            ratios=()
            if id == "train.synthetic"
            else (Ratio("x_compute_bound", "train.synthetic", ceiling=1.0),),
            **kw,
        )

    return [
        m(
            "train.synthetic",
            "synthetic batch held in memory (compute-bound ceiling)",
            "synthetic",
            {"loader": "synthetic"},
        ),
        m(
            "train.gpuload",
            "gpuload fast path (default decode options)",
            "gpuload",
            {"loader": "gpuload"},
        ),
        m(
            "train.torch_pil",
            f"torch DataLoader + PIL over JPEG files, num_workers={ctx.cores}",
            "torch+PIL",
            {"loader": "torch_pil", "files": "@files"},
            needs=("files",),
        ),
    ]


BUILDERS = {
    "ingest": ingest_suite,
    "stream": stream_suite,
    "decode": decode_suite,
    "e2e": e2e_suite,
    "train": train_suite,
    "memory": memory_suite,
}


def build(ctx: Context, suites) -> list[Measurement]:
    """The measurements of the chosen suites, in order; e2e brings the decode limit along
    (its ratios are to it) when the decode suite is not chosen."""
    out: list[Measurement] = []
    seen = set()
    for s in suites:
        ms = BUILDERS[s](ctx)
        if s == "e2e" and "decode" not in suites:
            ms = [decode_limit(ctx)] + ms
        for m in ms:
            if m.id not in seen:
                seen.add(m.id)
                out.append(m)
    return out


# -- data: the demo table and the copies the peers read ----------------------------------------
def cache_root() -> str:
    """$GPULOAD_BENCH_CACHE, else $XDG_CACHE_HOME/gpuload/bench, else ~/.cache/gpuload/bench."""
    env = os.environ.get("GPULOAD_BENCH_CACHE")
    if env:
        return os.path.expanduser(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpuload", "bench")


def ensure_demo(
    rows: int, seed: int, root: str, progress: bool | None = None, log=print
) -> tuple[str, bool]:
    """The demo table ``<root>/demo-<rows>-<seed>``, generated unless already there.
    Returns (path, generated_now)."""
    import gpuload
    from gpuload.demo import make_demo_table
    from gpuload.errors import GpuloadError

    path = os.path.join(root, f"demo-{rows}-{seed}")
    try:
        t = gpuload.open_table(path)
        if len(t) == rows:
            return path, False
    except GpuloadError:
        pass
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    log(f"generating the {rows:,}-row demo table in {path} ...")
    make_demo_table(path, rows=rows, seed=seed, mode="overwrite", progress=progress)
    return path, True


class Resources:
    """Data the measurements read besides the table, built on first need and kept in
    ``workdir`` (reused by later runs while the table's version is unchanged)."""

    def __init__(self, ctx: Context, workdir: str, log=print) -> None:
        self.ctx = ctx
        self.workdir = workdir
        self.log = log
        self.values: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self._s3 = None
        self._tmp = tempfile.mkdtemp(prefix="gpuload-bench-")
        self.values["tmp"] = self._tmp
        os.makedirs(workdir, exist_ok=True)

    # every resource: a function returning its value (placeholders "@name")
    def get(self, name: str) -> Any:
        if name in self.values:
            return self.values[name]
        if name in self.errors:
            raise RuntimeError(self.errors[name])
        t = time.perf_counter()
        try:
            v = getattr(self, "_make_" + name)()
        except Exception as e:  # noqa: BLE001 - reported per measurement
            self.errors[name] = f"preparing {name} failed: {type(e).__name__}: {e}"
            raise RuntimeError(self.errors[name]) from e
        self.timings[name] = time.perf_counter() - t
        self.values[name] = v
        return v

    def _done(self, path: str) -> bool:
        marker = os.path.join(path, ".gpuload-bench-complete")
        if not os.path.exists(marker):
            return False
        with open(marker) as f:
            return json.load(f).get("rows") == self.ctx.rows

    def _mark(self, path: str) -> None:
        with open(os.path.join(path, ".gpuload-bench-complete"), "w") as f:
            json.dump({"rows": self.ctx.rows}, f)

    def _make_files(self) -> str:
        """Every row's JPEG as a file plus labels.npy (the plain PIL baseline's dataset)."""
        import numpy as np

        import gpuload

        path = os.path.join(self.workdir, "files")
        if self._done(path):
            return path
        self.log("writing the rows as JPEG files for the PIL baseline ...")
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        t = gpuload.open_table(self.ctx.table_url, storage_options=self.ctx.storage_options)
        labels = []
        cols = [self.ctx.image] + ([self.ctx.label] if self.ctx.label else [])
        i = 0
        for b in t.batches(512, columns=cols):
            for j, data in enumerate(b[self.ctx.image]):
                with open(os.path.join(path, f"{i:08d}.jpg"), "wb") as f:
                    f.write(data)
                labels.append(int(b[self.ctx.label][j]) if self.ctx.label else 0)
                i += 1
        np.save(os.path.join(path, "labels.npy"), np.asarray(labels, np.int64))
        self._mark(path)
        return path

    def _deeplake_copy(self, kind: str) -> str:
        from .measure import run_child

        path = os.path.join(self.workdir, f"deeplake-{kind}")
        if self._done(path):
            return path
        self.log(
            f"writing a local Deeplake copy of the rows ({'JPEG Image' if kind == 'jpg' else 'Bytes'} column) ..."
        )
        run_child(
            "deeplake_ingest",
            {
                "source": self.ctx.table_url,
                "dest": path,
                "rows": self.ctx.rows,
                "image_kind": kind,
                "keep": True,
            },
            timeout=1800,
        )
        self._mark(path)
        return path

    def _make_deeplake_bytes(self) -> str:
        return self._deeplake_copy("bytes")

    def _make_deeplake_jpg(self) -> str:
        return self._deeplake_copy("jpg")

    def _make_x4(self) -> str:
        import gpuload

        path = os.path.join(self.workdir, "x4")
        if self._done(path):
            return path
        self.log("writing the 4x table (the same rows four times) ...")
        shutil.rmtree(path, ignore_errors=True)
        src = gpuload.open_table(self.ctx.table_url, storage_options=self.ctx.storage_options)
        for k in range(4):
            gpuload.ingest(path, src, mode="append" if k else "create", progress=False)
        self._mark(path)
        return path

    def _make_s3(self) -> dict:
        import gpuload

        from ..testing.servers import LoopbackS3

        self.log("starting a loopback S3 endpoint (moto) and copying the table to it ...")
        self._s3 = LoopbackS3()
        url = self._s3.url("bench-table")
        src = gpuload.open_table(self.ctx.table_url, storage_options=self.ctx.storage_options)
        gpuload.ingest(url, src, storage_options=self._s3.storage_options, progress=False)
        self.values["s3_url"] = url
        self.values["s3_options"] = self._s3.storage_options
        return {"url": url}

    def _make_s3_url(self) -> str:
        self.get("s3")
        return self.values["s3_url"]

    def _make_s3_options(self) -> dict:
        self.get("s3")
        return self.values["s3_options"]

    def resolve(self, args: dict) -> tuple[dict, list[str]]:
        """Arguments with "@name" placeholders replaced; also the temporary folders made for
        this run of the child (to delete afterwards)."""
        out, cleanup = {}, []
        for k, v in args.items():
            if isinstance(v, str) and v.startswith("@"):
                name, _, rest = v[1:].partition("/")
                if name == "fresh_cache":
                    d = tempfile.mkdtemp(prefix="cache-", dir=self._tmp)
                    cleanup.append(d)
                    out[k] = d
                    continue
                base = self.get(name)
                out[k] = os.path.join(base, rest) if rest else base
            else:
                out[k] = v
        return out, cleanup

    def close(self) -> None:
        if self._s3 is not None:
            self._s3.close()
            self._s3 = None
        shutil.rmtree(self._tmp, ignore_errors=True)
