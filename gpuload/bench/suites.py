"""The benchmark suites: which measurements exist, with what arguments, and the data they need.

A :class:`Measurement` names a child task (:mod:`gpuload.bench.child`) and its arguments; the
runner runs each one ``repeats`` times, each time in a fresh process. Arguments may refer to
prepared resources with ``"@name"`` placeholders (a JPEG-file copy of the rows for the plain
PIL baseline, local Deeplake copies, a 4x table, a loopback S3 copy, the HTTP object servers
of ``--remote``), which :class:`Resources` builds once, on demand, in the benchmark's cache
folder (the servers: for the run).

Suites: ``ingest``, ``stream`` (raw ``batches()`` and the loaders without decode), ``decode``,
``e2e`` (decode + RandomResizedCrop + flip + normalize into tensors), ``train`` (a small CNN),
``startup`` (time to first batch in a fresh process, cold and warm caches), and, not run by
default: ``memory`` (peak memory as the table grows), ``codecs`` (every decode
backend and ROI/DCT mode at 1 thread and all cores) and ``kernel`` (the fused CPU kernel alone).
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

SUITES = (
    "ingest", "stream", "decode", "e2e", "train", "startup", "memory", "codecs", "kernel", "gpu",
)  # fmt: skip
DEFAULT_SUITES = ("ingest", "stream", "decode", "e2e", "train", "startup")

INSTALL = {
    "torch": "pip install torch",
    "tensorflow": "pip install tensorflow-cpu (or tensorflow; or pip install 'gpuload[peers]')",
    "deeplake": "pip install deeplake (or pip install 'gpuload[peers]')",
    "nvidia.dali": "pip install nvidia-dali-cuda120 (or pip install 'gpuload[peers]')",
    "nvidia.nvimgcodec": "pip install nvidia-nvimgcodec-cu12 (or pip install 'gpuload[peers]')",
    "s3fs": "pip install s3fs (or pip install 'gpuload[peers]')",
    "moto": "pip install 'moto[server]' (or pip install 'gpuload[peers]')",
    "aiohttp": "pip install aiohttp (or pip install 'gpuload[http]')",
    "PIL": "pip install pillow",
    "simplejpeg": "pip install simplejpeg",
    "torchvision": "pip install torchvision (the build matching your torch)",
    "jax": "pip install 'jax[cpu]' (or pip install 'gpuload[jax]')",
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
    # timed batches at least, in every timed row (None: each task's own minimum, 5); fewer only
    # for a cheaper smoke run (the runner passes it to each child, see runner._run_once)
    min_batches: int | None = None

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
    exceed on an idle machine (a value above it, beyond noise, means the machine was busy).
    ``{phase}`` in ``ref`` stands for the phase suffix of the id it is declared on (the same
    phase of another row: ``.cold`` with ``.cold``)."""

    name: str
    ref: str
    inverse: bool = False
    ceiling: float | None = None

    def ref_for(self, suffix: str) -> str:
        """The reference id for the phase whose id suffix is ``suffix``."""
        return self.ref.replace("{phase}", suffix)


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
    env: dict[str, str] = field(default_factory=dict)  # the child's extra environment ("@name" ok)
    info: dict[str, Any] = field(default_factory=dict)
    ratios: tuple[Ratio, ...] = ()
    max_repeats: int | None = None  # fewer fresh processes than the run's repeats (slow cases)
    prime_runs: int = 0  # unmeasured runs before the first measured one (to fill a warm cache)

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
    startup_repeats: int | None = None  # processes per startup row (said in its heading)
    simulated: bool = False  # device "cuda" is Numba's CUDA simulator (the GPU check's dry run)

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


# -- the cases: one table per suite ------------------------------------------------------------
# Each suite is a table of rows (id, label, system, arguments, extras) over what its rows share
# (``_table``): the suite, the group heading, the child task, the base arguments, the unit, the
# batch size and the ratios every row declares. Grids (batch sizes x order x verification)
# expand into rows; nothing else is written out twice.
def _src(ctx: Context) -> dict:
    d = {"url": ctx.table_url}
    if ctx.storage_options:
        d["storage_options"] = ctx.storage_options
    return d


def _clamp(ctx: Context, bs: int) -> int:
    return max(1, min(bs, ctx.rows))


def _table(suite: str, group: str, task: str, base: dict | None = None, **shared):
    """A row maker for one table of cases: ``row(id, label, system, args, **extras)``."""

    def row(id: str, label: str, system: str, args: dict | None = None, **kw) -> Measurement:
        fields = {**shared, **kw}
        ratios = fields.pop("ratios", ())
        if callable(ratios):
            ratios = ratios(id)
        return Measurement(
            id=id,
            suite=suite,
            group=group,
            label=label,
            system=system,
            task=fields.pop("task", task),
            args={**(base or {}), **(args or {})},
            ratios=tuple(ratios),
            **fields,
        )

    return row


def _cols(ctx: Context) -> list[str] | None:
    """The loaders' columns: all but the text instruction (when the table has one)."""
    return [c for c in ctx.columns if c != "instruction"] if "instruction" in ctx.columns else None


def ingest_suite(ctx: Context) -> list[Measurement]:
    row = _table(
        "ingest", "Ingest (client.ingest of encoded rows held in memory, local disk)", "ingest"
    )
    src = {"source": ctx.table_url}
    return [
        row(
            f"ingest.gpuload.{n}",
            "gpuload ingest",
            "gpuload",
            {**src, "dest": "@tmp/ingest-gpuload", "rows": n},
            info={"rows": n},
        )
        for n in ctx.ingest_rows
    ] + [
        row(
            f"ingest.deeplake.{n}",
            "Deeplake 4 append + commit (local)",
            "deeplake",
            {**src, "dest": "@tmp/ingest-deeplake", "rows": n},
            task="deeplake_ingest",
            requires=("deeplake",),
            info={"rows": n},
            ratios=(Ratio("gpuload_over_this", f"ingest.gpuload.{n}", inverse=True),),
        )
        for n in ctx.ingest_rows
    ]


def _loader_bs0(ctx: Context) -> int:
    """The loaders' batch size as asked for (the ids of the local rows name it unclamped)."""
    return 128 if 128 in ctx.batch_sizes else ctx.batch_sizes[0]


def loader_batch(ctx: Context) -> int:
    return _clamp(ctx, _loader_bs0(ctx))


def _raw_streams(ctx: Context) -> list[Measurement]:
    """The grid batch size x (sequential, shuffled) x (verified, and not verified once)."""
    w, t = ctx.timing.stream
    row = _table("stream", "Raw stream: table.batches(), local, no decode", "stream")
    out = []
    for bs0 in ctx.batch_sizes:
        bs = _clamp(ctx, bs0)
        for mode, shuffle in (("seq", False), ("shuffle", True)):
            for verify in (True, False) if bs0 == loader_batch(ctx) else (True,):
                sfx = "" if verify else ".noverify"
                out.append(
                    row(
                        f"stream.local.{mode}.bs{bs0}{sfx}",
                        f"gpuload batches({bs0}{', shuffle=True' if shuffle else ''})"
                        + ("" if verify else ", verify_local=False"),
                        "gpuload",
                        {
                            **_src(ctx),
                            "batch_size": bs,
                            "shuffle": shuffle,
                            "warmup": w,
                            "min_time": t,
                            "verify": verify,
                        },
                        batch_size=bs0,
                        ratios=(Ratio("x_sequential", f"stream.local.seq.bs{bs0}{sfx}"),)
                        if shuffle
                        else (),
                    )
                )
        out.append(
            row(
                f"stream.deeplake.seq.bs{bs0}",
                f"Deeplake ds.batches({bs0}) (local copy, no shuffle exists)",
                "deeplake",
                {"url": "@deeplake_bytes", "batch_size": bs, "warmup": w, "min_time": t},
                task="deeplake_stream",
                batch_size=bs0,
                requires=("deeplake",),
                needs=("deeplake_bytes",),
                ratios=(Ratio("gpuload_over_this", f"stream.local.seq.bs{bs0}", inverse=True),),
            )
        )
    return out


def stream_suite(ctx: Context) -> list[Measurement]:
    lw, lt = ctx.timing.loader
    bs, k = loader_batch(ctx), ctx.workers
    row = _table(
        "stream",
        f"Loaders into torch tensors, no decode (batch {bs}, shuffle=True)",
        "dataloader",
        {"batch_size": bs, "warmup": lw, "min_time": lt, "columns": _cols(ctx)},
        batch_size=bs,
        requires=("torch",),
    )
    loaders = [
        row(
            "loader.fast.shuffle",
            "gpuload.pytorch(t, batch_size, shuffle=True) fast path",
            "gpuload",
            {**_src(ctx), "device": ctx.device},
            task="fast",
        ),
        row(
            f"loader.dataloader.w{k}.shuffle",
            f"DataLoader(gpuload.pytorch(t), shuffle=True, num_workers={k})",
            "gpuload",
            {**_src(ctx), "workers": k, "warmup": max(lw, k + 2)},
        ),
        row(
            "loader.dataloader.w0.shuffle",
            "DataLoader(gpuload.pytorch(t), shuffle=True, num_workers=0)",
            "gpuload",
            {**_src(ctx), "workers": 0},
        ),
        row(
            "loader.deeplake.w0.shuffle",
            "Deeplake DataLoader(ds.pytorch(), shuffle=True, num_workers=0)",
            "deeplake",
            {"url": "@deeplake_bytes", "workers": 0},
            task="deeplake_dataloader",
            requires=("deeplake", "torch"),
            needs=("deeplake_bytes",),
            ratios=(Ratio("gpuload_fast_path_over_this", "loader.fast.shuffle", inverse=True),),
        ),
    ]
    return _raw_streams(ctx) + loaders + (remote_measurements(ctx) if ctx.remote else [])


#: Delays (ms) the HTTP object server adds before every answer in ``--remote`` runs; 0 is the
#: ceiling of the loopback HTTP stack itself (separates latency from the server's throughput).
HTTP_DELAYS_MS = (0, 20, 50)
HTTP_GROUP = (
    "HTTP object server (aiohttp in a child process) with {ms} ms added per request, batch {bs}, "
    "gpuload's defaults: first epoch (cold: empty block cache) and second (cached)"
)
S3_GROUP = (
    "S3 API on moto (CPU-bound at ~200 requests/s: measures moto, not the network), batch {bs}: "
    "first epoch (cold) and second (disk cache)"
)
CACHED = {"epoch1": ".cold", "epoch2": ".cached"}  # child phase -> id suffix of two-epoch rows
TWO_EPOCHS = {"epochs": 2, "cache": "@fresh_cache"}
ONE_EPOCH_NO_CACHE = {"epochs": 1, "cache": False}


def served_name(ctx: Context) -> str:
    """The table's folder name: its path under the root of every HTTP object server."""
    return os.path.basename(os.path.normpath(ctx.table_url))


def remote_measurements(ctx: Context) -> list[Measurement]:
    """``--remote``: the HTTP object server at each of HTTP_DELAYS_MS, then the S3 API (moto)."""
    return [m for ms in HTTP_DELAYS_MS for m in http_measurements(ctx, ms)] + s3_measurements(ctx)


def _http_cases(ctx: Context, bs: int) -> list[tuple]:
    """(id prefix, name, label, task, args, local row compared with, two epochs?, requires) of
    the rows read from an HTTP server; the image fast path is the e2e suite's default row."""
    bs0 = _loader_bs0(ctx)
    image = next(m for m in e2e_suite(ctx) if m.id == "e2e.gpuload.on")
    w = image.args["warmup"]  # as the local row's, unless that leaves under 3/4 of the epoch
    w = w if ctx.rows // image.args["batch_size"] >= 4 * w else 0
    part = f"from batch {w + 1} of epoch 1" if w else "whole epochs"
    plain = {"columns": _cols(ctx), "device": ctx.device}
    cases = []
    for mode, shuffle in (("seq", False), ("shuffle", True)):
        local = f"stream.local.{mode}.bs{bs0}"
        label = f"gpuload batches({bs}{', shuffle=True' if shuffle else ''})"
        cases += [
            ("stream", mode, label, "stream", {"shuffle": shuffle}, local, True, ()),
            ("stream", f"{mode}_nocache", f"{label}, cache=False", "stream",
             {"shuffle": shuffle}, local, False, ()),
        ]  # fmt: skip
    # the adaptive in-flight limit against the fixed 16 it replaced, where requests dominate
    cases.append(
        ("stream", "shuffle_nocache_fixed16",
         f"gpuload batches({bs}, shuffle=True), cache=False, max_in_flight=16 (fixed)",
         "stream", {"shuffle": True, "max_in_flight": 16}, f"stream.local.shuffle.bs{bs0}",
         False, ()),
    )  # fmt: skip
    return cases + [
        ("loader", "fast", "gpuload.pytorch(t, batch_size, shuffle=True) fast path", "fast",
         plain, "loader.fast.shuffle", True, ("torch",)),
        ("e2e", "image", f"gpuload image fast path, images/s ({part})",
         "e2e", {**{k: v for k, v in image.args.items() if k != "min_time"}, "warmup": w},
         image.id, True, image.requires),
    ]  # fmt: skip


def http_measurements(ctx: Context, ms: int) -> list[Measurement]:
    """The rows read from the HTTP object server at ``ms`` ms per request (``@http<ms>``):
    raw batches sequential and shuffled, cached (a cold and a warm epoch) and cache=False (one
    epoch), the plain and the image fast path; ratios to the same read from local disk in this
    run (x_local) and to the same row and phase at 0 ms (x_http0)."""
    bs, srv = loader_batch(ctx), f"http{ms}"
    url = f"@{srv}/{served_name(ctx)}"  # the base's url would not override a case's
    row = _table(
        "stream",
        HTTP_GROUP.format(ms=ms, bs=bs),
        "stream",
        {"server": f"@{srv}", "batch_size": bs},
        batch_size=bs,
        needs=("http",),
        info={"server": "http", "delay_ms": ms},
    )
    out = []
    for prefix, name, label, task, args, local, cached, requires in _http_cases(ctx, bs):
        ratios = [Ratio("x_local", local)]
        if ms:
            ratios.append(Ratio("x_http0", f"{prefix}.http0.{name}{{phase}}"))
        out.append(
            row(
                f"{prefix}.http{ms}.{name}",
                f"{label}, HTTP {ms} ms",
                "gpuload",
                {**args, "url": url, **(TWO_EPOCHS if cached else ONE_EPOCH_NO_CACHE)},
                task=task,
                requires=("aiohttp", *requires),
                phases=CACHED if cached else {"epoch1": ""},
                ratios=ratios,
                unit="images" if prefix == "e2e" else "rows",
                timeout=600.0,
            )
        )
    return out


def s3_measurements(ctx: Context) -> list[Measurement]:
    """The rows read through the S3 API from moto on 127.0.0.1 (``@s3_url``)."""
    bs = loader_batch(ctx)
    local = (Ratio("x_local", f"stream.local.seq.bs{_loader_bs0(ctx)}"),)
    row = _table(
        "stream",
        S3_GROUP.format(bs=bs),
        "stream",
        {"url": "@s3_url", "storage_options": "@s3_options", "batch_size": bs},
        batch_size=bs,
        requires=("s3fs", "moto"),
        needs=("s3",),
        phases=CACHED,
    )
    torch_req = ("s3fs", "moto", "torch")
    return [
        row(
            "stream.s3.seq",
            f"gpuload batches({bs}) from S3",
            "gpuload",
            {**TWO_EPOCHS, "shuffle": False},
            ratios=local,
        ),
        row(
            "stream.s3.shuffle",
            f"gpuload batches({bs}, shuffle=True) from S3",
            "gpuload",
            {**TWO_EPOCHS, "shuffle": True},
        ),
        row(
            "stream.s3.seq_nocache",
            f"gpuload batches({bs}) from S3, cache=False",
            "gpuload",
            {**ONE_EPOCH_NO_CACHE, "shuffle": False},
            phases={"epoch1": ""},
            ratios=local,
        ),
        row(
            "loader.s3.dataloader.w0",
            "DataLoader(gpuload.pytorch(t), shuffle=True, num_workers=0) from S3",
            "gpuload",
            {**TWO_EPOCHS, "workers": 0, "columns": _cols(ctx)},
            task="dataloader",
            requires=torch_req,
        ),
        row(
            "loader.s3.fast",
            "gpuload.pytorch(t, batch_size, shuffle=True) fast path from S3",
            "gpuload",
            {**TWO_EPOCHS, "columns": _cols(ctx), "device": ctx.device},
            task="fast",
            requires=torch_req,
        ),
    ]


def memory_suite(ctx: Context) -> list[Measurement]:
    bs = loader_batch(ctx)
    row = _table(
        "memory",
        f"Peak memory as the table grows (the same rows 1x and 4x, batch {bs}, shuffle=True, one epoch)",
        "stream",
        {"batch_size": bs, "epochs": 1},
        batch_size=bs,
        phases={"epoch1": ""},
    )
    out = []
    for size, url in (("1x", ctx.table_url), ("4x", "@x4")):
        needs = ("x4",) if size == "4x" else ()
        out.append(
            row(
                f"memory.stream.{size}",
                f"gpuload batches({bs}, shuffle=True), {size} rows",
                "gpuload",
                {"url": url, "shuffle": True},
                needs=needs,
                info={"size": size},
            )
        )
        out.append(
            row(
                f"memory.fast.{size}",
                f"gpuload fast path (torch), {size} rows",
                "gpuload",
                {"url": url, "columns": _cols(ctx), "device": ctx.device},
                task="fast",
                requires=("torch",),
                needs=needs,
                info={"size": size},
            )
        )
    return out


DECODE_GROUP = "Decode only: JPEG -> RGB uint8, full size unless stated, batches of 128, in memory"


def _decode_row(ctx: Context, suite: str = "decode", group: str = DECODE_GROUP, **shared):
    w, t = ctx.timing.decode
    base = {
        "url": ctx.table_url,
        "image": ctx.image,
        "images": ctx.timing.decode_images,
        "warmup": w,
        "min_time": t,
    }
    return _table(suite, group, "decode", base, batch_size=128, unit="images", **shared)


def decode_limit(ctx: Context) -> Measurement:
    row = _decode_row(ctx)
    return row(
        "decode.raw_libjpeg",
        f"the limit: libjpeg-turbo (simplejpeg), reused buffers, {ctx.cores} threads",
        "libjpeg-turbo",
        {"method": "raw_libjpeg", "threads": ctx.cores},
        requires=("simplejpeg",),
    )


def decode_suite(ctx: Context) -> list[Measurement]:
    row = _decode_row(ctx, ratios=(Ratio("x_limit", "decode.raw_libjpeg"),))
    pool, cpu = (
        max(8, ctx.cores),
        {"method": "gpuload", "decoder": "cpu", "device": "cpu", "threads": ctx.cores},
    )
    return [
        decode_limit(ctx),
        row(
            "decode.pil.1t",
            "PIL Image.open().convert('RGB'), 1 thread",
            "PIL",
            {"method": "pil"},
            requires=("PIL",),
        ),
        row(
            "decode.pil.pool",
            f"PIL in a ThreadPool ({pool} workers)",
            "PIL",
            {"method": "pil_pool", "threads": pool},
            requires=("PIL",),
        ),
        row(
            "decode.gpuload.cpu",
            f"gpuload CPU decode (libjpeg-turbo, {ctx.cores} threads)",
            "gpuload",
            cpu,
        ),
        row(
            "decode.gpuload.cpu_dct2",
            "gpuload CPU decode, DCT downscale 1/2 (240x320)",
            "gpuload",
            {**cpu, "scale": 2},
        ),
    ] + [
        row(
            f"decode.gpuload.gpu_{dec}",
            f"gpuload GPU decode ({dec}, nvJPEG)",
            "gpuload",
            {"method": "gpuload", "decoder": dec, "device": "cuda"},
            requires=(mod,),
            needs_gpu=True,
            uses_gpu=True,
        )
        for dec, mod in (("nvimgcodec", "nvidia.nvimgcodec"), ("dali", "nvidia.dali"))
    ]


CODECS_GROUP = "Decode backends: JPEG -> RGB uint8, batches of 128, in memory, {t} thread(s)"

# id, label, decoder ("@limit": raw libjpeg-turbo), args, requires. "rrc": the windows of the e2e
# suite's RandomResizedCrop, decoded as the loader asks under the DecodeOptions fields given.
# fmt: off
CODEC_CASES = (
    ("limit", "raw libjpeg-turbo (simplejpeg), reused buffers", "@limit", {}, ("simplejpeg",)),
    ("cpu", "gpuload cpu, full size", "cpu", {}, ()),
    ("cpu_dct2", "gpuload cpu, DCT 1/2", "cpu", {"scale": 2}, ()),
    ("cpu_fast", "gpuload cpu, fast IDCT/upsampling", "cpu",
     {"decode": {"dct": False, "roi": False, "fast": True}}, ()),
    ("pil", "gpuload pil backend", "pil", {}, ("PIL",)),
    ("nvimgcodec", "nvImageCodec, CPU backend", "nvimgcodec", {}, ("nvidia.nvimgcodec",)),
    ("dali", "DALI, CPU", "dali", {}, ("nvidia.dali",)),
    ("rrc.full", "RRC windows, cpu, full decode", "cpu",
     {"rrc": True, "decode": {"dct": False, "roi": False}}, ()),
    ("rrc.rows", "RRC windows, cpu, row ROI", "cpu",
     {"rrc": True, "decode": {"dct": False, "roi": True}}, ()),
    ("rrc.region", "RRC windows, cpu, region ROI (nvImageCodec for small windows)", "cpu",
     {"rrc": True, "decode": {"dct": False, "roi": "region"}}, ("nvidia.nvimgcodec",)),
    ("rrc.default", "RRC windows, cpu, the loader's default (DCT downscale + row ROI)", "cpu",
     {"rrc": True, "decode": {}}, ()),
    ("rrc.nvimgcodec", "RRC windows, nvImageCodec region decode (CPU)", "nvimgcodec",
     {"rrc": True, "decode": {"dct": False, "roi": True}}, ("nvidia.nvimgcodec",)),
    ("rrc.dali", "RRC windows, DALI slice decode (CPU)", "dali",
     {"rrc": True, "decode": {"dct": False, "roi": True}}, ("nvidia.dali",)),
)
# fmt: on


def codecs_suite(ctx: Context) -> list[Measurement]:
    """Every decode backend and ROI/DCT mode on the CPU, at 1 thread and at all cores; ratios to
    the raw libjpeg-turbo row with the same threads."""
    out = []
    for t in sorted({1, ctx.cores}):
        limit = f"codecs.limit.{t}t"
        row = _decode_row(ctx, "codecs", CODECS_GROUP.format(t=t), env={"GPULOAD_FORCE_CPU": "1"})
        for name, label, decoder, args, requires in CODEC_CASES:
            is_limit = decoder == "@limit"
            method = {"method": "raw_libjpeg"} if is_limit else {
                "method": "gpuload", "decoder": decoder, "device": "cpu"}  # fmt: skip
            out.append(
                row(
                    f"codecs.{name}.{t}t",
                    f"{label}, {t} thread{'s' if t > 1 else ''}",
                    "libjpeg-turbo" if is_limit else "gpuload",
                    {**method, **args, "threads": t},
                    requires=requires,
                    ratios=() if is_limit else (Ratio("x_limit", limit),),
                )
            )
    return out


def kernel_suite(ctx: Context) -> list[Measurement]:
    """The fused CPU kernel alone (decoded 480x640 uint8 -> 224x224), per op preset, at 1 thread
    and at all cores (NUMBA_NUM_THREADS set before numba loads)."""
    from .workloads import KERNEL_PRESETS

    t = ctx.timing.decode[1]
    row = _table(
        "kernel",
        "Fused CPU kernel alone: decoded 480x640x3 uint8 -> 224x224, batch 64",
        "kernel",
        {"batch_size": 64, "warmup": 3, "min_time": t},
        batch_size=64,
        unit="images",
        requires=("numba",),
    )
    return [
        row(
            f"kernel.{p}.{n}t",
            f"{p}, {n} thread{'s' if n > 1 else ''}",
            "gpuload",
            {"preset": p},
            env={"NUMBA_NUM_THREADS": str(n), "NUMBA_ENABLE_CUDASIM": "0"},
        )
        for p in KERNEL_PRESETS
        for n in sorted({1, ctx.cores})
    ]


# The GPU suite's sizes: (real GPU, the dry run under Numba's CUDA simulator, which runs one
# Python call per GPU thread and so gets outputs of a few pixels).
GPU_SIZES = {
    "decode_batch": (128, 4),
    "decode_images": (512, 8),
    "kernel_batch": (256, 2),
    "out_size": (224, 8),
    "kernel_src": ((480, 640), (24, 32)),  # decoded source size of the kernel rows
    "e2e_batch": (256, 2),
    "h2d_mb": (256, 1),
    "warmup": (2, 1),
    "min_time": (2.0, 0.2),
}


def gpu_suite(ctx: Context) -> list[Measurement]:
    """What only a GPU answers, each row beside its same-run reference (benchmarks/gpu_check.sh):
    nvJPEG decode by nvImageCodec backend and torchvision's, against gpuload's CPU decode on all
    cores; the fused kernel on the device against the device's copy bandwidth and the CPU
    kernel; gpuload.pytorch(device="cuda") end to end against its CPU path and torchvision +
    torch ops on the GPU; pinned against pageable host-to-device copies. Under the simulator
    (``ctx.simulated``) the same rows run at tiny sizes with decoding on the CPU."""
    sim = ctx.simulated
    z = {k: v[1] if sim else v[0] for k, v in GPU_SIZES.items()}
    gpu = {"needs_gpu": not sim, "uses_gpu": True}
    env = {"NUMBA_ENABLE_CUDASIM": "1"} if sim else {}
    dry = {"dry": True} if sim else {}
    timed = {"warmup": z["warmup"], "min_time": z["min_time"], **dry}
    dec = _table(
        "gpu",
        f"GPU decode: JPEG -> RGB uint8 on the device, batches of {z['decode_batch']}",
        "gpu_nvjpeg",
        {**_src(ctx), "image": ctx.image, "batch_size": z["decode_batch"],
         "images": z["decode_images"], **timed},
        batch_size=z["decode_batch"],
        unit="images",
        ratios=lambda id: () if id == "gpu.decode.cpu" else (Ratio("x_cpu", "gpu.decode.cpu"),),
    )  # fmt: skip
    rows = [
        dec(
            "gpu.decode.cpu",
            f"gpuload CPU decode (libjpeg-turbo, {ctx.cores} threads)",
            "gpuload",
            {"method": "gpuload", "decoder": "cpu", "device": "cpu", "threads": ctx.cores},
            task="decode",
        )
    ]
    for backend, label in (
        ("hw", "hardware JPEG engines only"),
        ("cuda", "CUDA only"),
        ("default", "nvImageCodec's default split"),
    ):
        rows.append(
            dec(
                f"gpu.decode.nvjpeg_{backend}",
                f"nvImageCodec (nvJPEG), {label}" + (" [dry run: CPU backend]" if sim else ""),
                "gpuload",
                {"backend": backend},
                requires=("nvidia.nvimgcodec",),
                env=env,
                **gpu,
            )
        )
    rows.append(
        dec(
            "gpu.decode.torchvision",
            "torchvision.io.decode_jpeg(list, device='cuda')",
            "torchvision",
            task="gpu_torchvision_decode",
            requires=("torch", "torchvision"),
            needs_gpu=True,
            uses_gpu=True,
        )
    )
    return rows + _gpu_kernel_rows(ctx, z, gpu, env, timed) + _gpu_e2e_rows(ctx, z, gpu, env, timed)


def _gpu_kernel_rows(ctx: Context, z: dict, gpu: dict, env: dict, timed: dict) -> list:
    bs, size = z["kernel_batch"], z["out_size"]
    kern = _table(
        "gpu",
        f"Fused kernel alone: decoded {z['kernel_src'][0]}x{z['kernel_src'][1]}x3 uint8 -> "
        f"{size}x{size}, RandomResizedCrop + flip"
        f" + Normalize -> bfloat16, batch {bs}",
        "gpu_kernel",
        {
            "batch_size": bs,
            "size": size,
            "dtype": "bfloat16",
            "height": z["kernel_src"][0],
            "width": z["kernel_src"][1],
            **timed,
        },  # fmt: skip
        batch_size=bs,
        unit="images",
        requires=("numba",),
    )
    h2d = _table(
        "gpu",
        f"Host to device copies of {z['h2d_mb']} MB",
        "gpu_h2d",
        {"mb": z["h2d_mb"], **timed},
        unit="copies",
        requires=("numba",),
    )
    return [
        kern(
            "gpu.kernel.cuda",
            "gpuload fused kernel on the GPU (x_copy: output GB/s over the device's copy GB/s)",
            "gpuload",
            env=env,
            ratios=(Ratio("x_cpu", "gpu.kernel.cpu"),),
            **gpu,
        ),
        kern(
            "gpu.kernel.cpu",
            f"gpuload fused kernel on the CPU, {ctx.cores} threads",
            "gpuload",
            {"preset": "rrc_flip_norm_bf16"},
            task="kernel",
            env={"NUMBA_ENABLE_CUDASIM": "0"},
        ),
        h2d(
            "gpu.h2d",
            "host -> device, pinned and pageable source",
            "gpuload",
            env=env,
            phases={"pinned": ".pinned", "pageable": ".pageable"},
            ratios=lambda id: (Ratio("x_pageable", "gpu.h2d.pageable"),),
            **gpu,
        ),
    ]


def _gpu_e2e_rows(ctx: Context, z: dict, gpu: dict, env: dict, timed: dict) -> list:
    bs, size, sim = z["e2e_batch"], z["out_size"], ctx.simulated
    row = _table(
        "gpu",
        f"End to end: gpuload.pytorch(t, batch_size={bs}, shuffle=True, image=[RandomResized"
        f"Crop({size}), flip, Normalize, ToDtype('bfloat16')]), images/s",
        "gpu_e2e",
        {**_src(ctx), "image": ctx.image, "batch_size": bs, "size": size, **timed},
        batch_size=bs,
        unit="images",
        requires=("torch",),
    )
    # the dry run: t.batches (CPU torch holds no CUDA tensors) and the CPU decoder, whose DCT
    # downscale keeps the simulated kernel's filters small
    front = {"front": "batches", "decoder": "cpu"} if sim else {}
    return [
        row(
            "gpu.e2e.gpuload",
            "gpuload.pytorch(device='cuda')"
            + (" [dry run: t.batches, CPU decode, simulator]" if sim else ""),
            "gpuload",
            {"device": "cuda", **front},
            env=env,
            ratios=(Ratio("x_cpu", "gpu.e2e.cpu"), Ratio("x_torchvision", "gpu.e2e.torchvision")),
            **gpu,
        ),
        row(
            "gpu.e2e.cpu",
            f"gpuload.pytorch(device='cpu'), {ctx.cores} cores" + (" [dry run]" if sim else ""),
            "gpuload",
            {"device": "cpu", **front},
            env={"NUMBA_ENABLE_CUDASIM": "0"},
        ),
        row(
            "gpu.e2e.torchvision",
            "t.batches bytes -> torchvision decode_jpeg(device='cuda') -> v2 transforms per image",
            "torchvision",
            task="gpu_torchvision_e2e",
            requires=("torch", "torchvision"),
            needs_gpu=True,
            uses_gpu=True,
        ),
    ]


def _e2e_ratios(id: str) -> tuple[Ratio, ...]:
    default = Ratio("gpuload_default_over_this", "e2e.gpuload.on", inverse=True)
    return (Ratio("x_limit", "decode.raw_libjpeg"),) + (
        () if id == "e2e.gpuload.on" else (default,)
    )


# id, label ({n}: DataLoader workers; {where}: DALI's decode), system, args, requires, needs.
# fmt: off
E2E_CASES = (
    ("e2e.gpuload.off", "gpuload fast path, DCT/ROI off", "gpuload",
     {"kind": "gpuload", "options": "off"}, ("torch",), ()),
    ("e2e.gpuload.on", "gpuload fast path, default (DCT downscale + row-ROI)", "gpuload",
     {"kind": "gpuload", "options": "on"}, ("torch",), ()),
    ("e2e.gpuload.on.noverify",
     "gpuload fast path, default, checksums not verified (verify_local=False)", "gpuload",
     {"kind": "gpuload", "options": "on", "verify": False}, ("torch",), ()),
    ("e2e.gpuload.fast", "gpuload fast path, roi='region' + fast IDCT (opt-in)", "gpuload",
     {"kind": "gpuload", "options": "fast"}, ("torch", "nvidia.nvimgcodec"), ()),
    ("e2e.gpuload.jax", "gpuload.jax(t, batch_size=128, image=...) (jax.Array)", "gpuload",
     {"kind": "gpuload_jax", "options": "on"}, ("jax",), ()),
    ("e2e.gpuload.tf", "gpuload.tensorflow(t, batch_size=128, image=...) (tf.data)", "gpuload",
     {"kind": "gpuload_tf", "options": "on"}, ("tensorflow",), ()),
    ("e2e.gpuload.dataloader", "DataLoader(gpuload.pytorch(t, transform=PIL), num_workers={n})",
     "gpuload", {"kind": "gpuload_dataloader", "warmup": "@dl"}, ("torch",), ()),
    ("e2e.torch_pil", "torch DataLoader + PIL over JPEG files, num_workers={n}", "torch+PIL",
     {"kind": "torch_pil", "files": "@files", "warmup": "@dl"}, ("torch",), ("files",)),
    ("e2e.deeplake", "Deeplake DataLoader(ds.pytorch(transform=PIL), num_workers={n})",
     "deeplake", {"kind": "deeplake", "deeplake_url": "@deeplake_jpg", "warmup": "@dl"},
     ("deeplake", "torch"), ("deeplake_jpg",)),
    ("e2e.dali", "DALI pipeline ({where} decode, {n} threads)", "dali", {"kind": "dali"},
     ("nvidia.dali", "torch"), ()),
)
# fmt: on


def e2e_suite(ctx: Context) -> list[Measurement]:
    w, t = ctx.timing.e2e
    bs, n, cuda = _clamp(ctx, 128), ctx.cores, ctx.device == "cuda"
    row = _table(
        "e2e",
        "End to end: decode + RandomResizedCrop(224) + flip + normalize -> float32 NCHW tensors "
        f"on the {'GPU' if cuda else 'CPU'}, batch 128",
        "e2e",
        {"url": ctx.table_url, "image": ctx.image, "label": ctx.label, "batch_size": bs,
         "device": ctx.device, "workers": n, "warmup": w, "min_time": t},
        batch_size=bs, unit="images", uses_gpu=cuda, ratios=_e2e_ratios,
    )  # fmt: skip
    dl_warm = max(w, n + 2)  # DataLoader rows warm up until every worker has delivered
    where = "mixed/GPU" if cuda else "CPU"
    return [
        row(
            id,
            label.format(n=n, where=where),
            system,
            {k: (dl_warm if v == "@dl" else v) for k, v in args.items()},
            requires=requires,
            needs=needs,
        )
        for id, label, system, args, requires, needs in E2E_CASES
    ]


# name, the e2e case whose pipeline it starts (None: the fast path without image ops), the
# modules a user's script imports for it, whether a cold start compiles the fused kernel.
# fmt: off
STARTUP_CASES = (
    ("gpuload.image", "e2e.gpuload.on", ("torch", "gpuload"), True),
    ("gpuload.plain", None, ("torch", "gpuload"), False),
    ("gpuload.dataloader", "e2e.gpuload.dataloader", ("torch", "PIL.Image", "gpuload"), False),
    ("gpuload.tf", "e2e.gpuload.tf", ("tensorflow", "gpuload"), True),
    ("torch_pil", "e2e.torch_pil", ("torch", "PIL.Image"), False),
    ("dali", "e2e.dali", ("torch", "nvidia.dali"), False),
)
# fmt: on
STARTUP_CACHES = ("GPULOAD_CACHE_DIR", "NUMBA_CACHE_DIR", "XDG_CACHE_HOME")
# cases also measured with IDLE_S seconds between building the loader and iterating it (what
# a training script spends building its model): what starting work at build time buys
IDLE_CASES = ("gpuload.image", "torch_pil", "dali")
IDLE_S = 2.0
COLD_COMPILE_REPEATS = 1  # a cold start that compiles the fused kernel takes ~15-20 s here
STARTUP_GROUP = (
    "Startup: time to first batch in a fresh process, nothing warmed up (batch {bs}, {where}). "
    "cold: empty gpuload kernel, Numba and XDG caches (a new folder per process); warm: the "
    "same caches after one unmeasured run filled them; the OS page cache is warm in both. "
    "import s: what the script imports (gpuload itself is imported by the harness, in "
    "'python + harness s'). {per}"
)


def _startup_plain(ctx: Context, bs: int) -> Measurement:
    """The fast path without image ops (the table's numeric and label columns), as an e2e row
    would be declared (the startup rows are derived from e2e rows)."""
    cols = [c for c in ctx.columns if c not in (ctx.image, "instruction")]
    return Measurement(
        "startup.plain", "startup", "", f"gpuload fast path, no image ops ({', '.join(cols)})",
        "gpuload", "startup",
        {"url": ctx.table_url, "batch_size": bs, "device": ctx.device, "columns": cols,
         "kind": "gpuload_plain"},
        batch_size=bs, unit="rows", requires=("torch",), uses_gpu=ctx.device == "cuda",
    )  # fmt: skip


def startup_suite(ctx: Context) -> list[Measurement]:
    """Time to first batch, cold and warm, for the e2e suite's own pipelines (and the plain
    fast path); peers have no on-disk cache, so one row each (cold caches, warm page cache)."""
    import dataclasses

    bs, r, k = _clamp(ctx, 128), ctx.startup_repeats, COLD_COMPILE_REPEATS
    per = f"{r} process(es) per row" if r else "Processes per row: the run's repeats"
    if not r or r > k:
        per += f", {k} for the cold rows that compile the kernel"
    group = STARTUP_GROUP.format(bs=bs, where="GPU" if ctx.device == "cuda" else "CPU", per=per)
    e2e = {m.id: m for m in e2e_suite(ctx)}
    out = []
    for name, ref, imports, compiles in STARTUP_CASES:
        base = e2e[ref] if ref else _startup_plain(ctx, bs)
        args = {k: v for k, v in base.args.items() if k not in ("warmup", "min_time")}
        args.update(imports=list(imports), spawned="@now")
        pair = base.system == "gpuload"  # peers: one row (no cache of theirs to warm)
        phases = ["cold", "warm"] if pair else ["cold"]
        if name in IDLE_CASES:
            phases.append("idle")
        for phase in phases:
            cold, idle = phase == "cold", phase == "idle"
            fresh = cold or not pair  # peers keep no disk cache: every row of theirs is fresh
            tag = "warm" if pair else "no disk cache"
            tag = f"{tag}, {IDLE_S:g} s idle before iterating" if idle else (phase if pair else tag)
            out.append(
                dataclasses.replace(
                    base,
                    id=f"startup.{name}.{phase}" if pair or idle else f"startup.{name}",
                    suite="startup",
                    group=group,
                    label=f"{base.label} [{tag}]",
                    task="startup",
                    args={**args, "cold": cold, "idle_s": IDLE_S if idle else 0},
                    env={
                        k: "@fresh_cache" if fresh else f"@warm_cache/{k}" for k in STARTUP_CACHES
                    },
                    ratios=(),
                    max_repeats=COLD_COMPILE_REPEATS if cold and compiles else None,
                    prime_runs=0 if fresh else 1,
                )
            )
    return out


def train_suite(ctx: Context) -> list[Measurement]:
    tm, cuda = ctx.timing, ctx.device == "cuda"
    bs = _clamp(ctx, tm.train_batch)
    row = _table(
        "train",
        f"Training a small CNN on the {'GPU' if cuda else 'CPU'} (batch {bs}, "
        f"{tm.train_steps} timed steps after {tm.train_warmup} warm-up steps)",
        "train",
        {
            "url": ctx.table_url,
            "image": ctx.image,
            "label": ctx.label,
            "batch_size": bs,
            "device": ctx.device,
            "workers": ctx.cores,
            "steps": tm.train_steps,
            "warmup": tm.train_warmup,
            "options": "on",
        },
        batch_size=bs,
        unit="images",
        requires=("torch",),
        uses_gpu=cuda,
        timeout=900.0,
        ratios=(Ratio("x_compute_bound", "train.synthetic", ceiling=1.0),),
    )
    return [
        row(
            "train.synthetic",
            "synthetic batch held in memory (compute-bound ceiling)",
            "synthetic",
            {"loader": "synthetic"},
            ratios=(),
        ),
        row(
            "train.gpuload",
            "gpuload fast path (default decode options)",
            "gpuload",
            {"loader": "gpuload"},
        ),
        row(
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
    "startup": startup_suite,
    "memory": memory_suite,
    "codecs": codecs_suite,
    "kernel": kernel_suite,
    "gpu": gpu_suite,
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


# Values a resource brings along with its own (placeholders "@s3_url", "@http20", ...).
PART_OF = {"s3_url": "s3", "s3_options": "s3", **{f"http{ms}": "http" for ms in HTTP_DELAYS_MS}}


class Resources:
    """Data the measurements read besides the table, built on first need and kept in
    ``workdir`` (reused by later runs while the table's version is unchanged), and the servers
    of ``--remote`` runs (started once, closed by :meth:`close`)."""

    def __init__(self, ctx: Context, workdir: str, log=print) -> None:
        self.ctx = ctx
        self.workdir = workdir
        self.log = log
        self.values: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self._s3 = None
        self._servers: list = []  # the HTTP object servers (ShapedHTTPServer), once started
        self._tmp = tempfile.mkdtemp(prefix="gpuload-bench-")
        self.values["tmp"] = self._tmp
        os.makedirs(workdir, exist_ok=True)

    # every resource: a function returning its value (placeholders "@name")
    def get(self, name: str) -> Any:
        if name in self.values:
            return self.values[name]
        if name in self.errors:
            raise RuntimeError(self.errors[name])
        if name in PART_OF:
            self.get(PART_OF[name])
            return self.values[name]
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

    def _make_http(self) -> dict[str, str]:
        """One shaped HTTP object server per delay of HTTP_DELAYS_MS, each a child process
        serving a folder that holds only (a link to) the table under its own name; their URLs
        are the values ``http<ms>``."""
        from ..testing.shaped import ShapedHTTPServer, Shaping

        src = self.ctx.table_url
        if "://" in src or not os.path.isdir(src):
            raise RuntimeError(f"the HTTP rows serve a table in a local folder; {src} is not one")
        www = os.path.join(self._tmp, "www")
        os.makedirs(www)
        os.symlink(os.path.abspath(src), os.path.join(www, served_name(self.ctx)))
        delays = "/".join(map(str, HTTP_DELAYS_MS))
        self.log(f"starting the HTTP object servers ({delays} ms per request, child processes) ...")
        for ms in HTTP_DELAYS_MS:
            server = ShapedHTTPServer(www, Shaping(delay_s=ms / 1e3), process=True)
            self._servers.append(server)  # closed by close(), even if a later one fails
            self.values[f"http{ms}"] = server.url
        return {f"http{ms}": self.values[f"http{ms}"] for ms in HTTP_DELAYS_MS}

    def _make_warm_cache(self) -> str:
        """One cache folder for this run, shared by the warm startup cases (each fills it with
        an unmeasured run first; see ``Measurement.prime_runs``)."""
        return tempfile.mkdtemp(prefix="warm-", dir=self._tmp)

    def resolve(self, args: dict) -> tuple[dict, list[str]]:
        """Arguments (or an environment) with "@name" placeholders replaced; also the temporary
        folders made for this run of the child (to delete afterwards). "@fresh_cache": a new
        empty folder per run; "@now": ``time.time()`` as resolving ends (the child's spawn)."""
        out, cleanup, now = {}, [], []
        for k, v in args.items():
            if isinstance(v, str) and v.startswith("@"):
                name, _, rest = v[1:].partition("/")
                if name == "fresh_cache":
                    d = tempfile.mkdtemp(prefix="cache-", dir=self._tmp)
                    cleanup.append(d)
                    out[k] = d
                    continue
                if name == "now":
                    now.append(k)
                    continue
                base = self.get(name)
                out[k] = os.path.join(base, rest) if rest else base
            else:
                out[k] = v
        out.update(dict.fromkeys(now, time.time()))
        return out, cleanup

    def close(self) -> None:
        """Stop the servers (logging what each HTTP server served) and remove the temporary
        folders."""
        if self._s3 is not None:
            self._s3.close()
            self._s3 = None
        for ms, server in zip(HTTP_DELAYS_MS, self._servers):
            server.close()
            try:
                st = server.stats()
            except RuntimeError:  # its child ended before the counters were read
                continue
            self.log(
                f"HTTP server at {ms} ms/request: {st['requests']:,} requests, "
                f"{st['bytes_served'] / 1e6:,.0f} MB served, peak {st['peak_in_flight']} in flight"
            )
        self._servers = []
        shutil.rmtree(self._tmp, ignore_errors=True)
