"""One measurement, in a fresh process: ``python -m gpuload.bench.child TASK 'JSON ARGS'``.

Every task builds what it measures, runs a warm-up that is excluded, times the rest with a
:class:`~gpuload.bench.measure.Meter` and prints one record per phase (see ``emit``); but
``startup``, which times a fresh process's imports, build and first two batches, warm-up none. The
system-specific parts live in ``gpuload.bench.systems`` (one module per compared system, found
by name and imported only by the child that runs it, so a peer's import cost and state never
leak into another measurement); the tasks here are the ones every system shares: decode only,
end to end into tensors, and a short training run. The parent (the runner) resolves every
argument: paths, URLs, batch sizes, warm-up and timing windows.
"""

from __future__ import annotations

import json
import os
import sys
import time

from .harness import (
    batch_nbytes,
    batch_rows,
    cores,
    forever,
    image_of,
    run_epochs,
    run_timed,
    stage_record,
    torch_sync,
    value_nbytes,
)
from .measure import emit, process_tree
from .systems import DECODERS, LOADERS, TASKS, load


def decode(a: dict) -> dict:
    """Decode the table's first images in batches, over and over, full size unless stated, with
    the step ``a["method"]`` names (``systems.DECODERS``)."""
    import gpuload

    t = gpuload.open_table(a["url"])
    n = min(int(a.get("images", 256)), len(t))
    images = list(t[:n][a["image"]])
    bs = min(int(a.get("batch_size", 128)), n)
    batches = [images[i : i + bs] for i in range(0, n - bs + 1, bs)] or [images]
    threads = int(a.get("threads") or cores())
    step, sync = load(DECODERS, a["method"], "decode method")(batches, threads, a)
    nbytes = {id(b): sum(len(x) for x in b) for b in batches}

    def epoch(e):
        for b in batches:
            step(b)
            if sync is not None:
                sync()
            yield b

    return run_timed(a, lambda e: epoch(e), rows=len, nbytes=lambda b: nbytes[id(b)])


def e2e_loader(a: dict):
    """(make_epoch, sync, gpuload loader or None) for the end-to-end loader ``a["kind"]``
    (``systems.LOADERS``); batches hold tensors."""
    workers = int(a.get("workers") or cores())
    return load(LOADERS, a["kind"], "end-to-end loader")(a, workers)


def e2e(a: dict) -> dict:
    """Images/s of augmented float32 NCHW batches (batch 128) delivered as tensors; whole
    epochs, each its own phase, when ``a["epochs"]`` (a remote table, cold then cached)."""
    epoch, sync, loader = e2e_loader(a)
    run = run_epochs if a.get("epochs") else run_timed
    return run(
        a,
        epoch,
        rows=lambda b: batch_rows(image_of(b)),
        nbytes=lambda b: value_nbytes(image_of(b)),
        sync=sync,
        stats=loader.stats if loader is not None else None,
    )


# What a fresh process may hold before a task runs: startup records name the ones the harness
# itself brought in (``python -m gpuload.bench.child`` imports the gpuload package first).
HEAVY_MODULES = ("gpuload", "numpy", "numba", "torch", "tensorflow", "nvidia.dali", "PIL")


def _files_under(path: str) -> int:
    """Files anywhere under ``path`` (0 when it does not exist)."""
    return sum(len(files) for _, _, files in os.walk(path))


def _two_batches(a: dict, build) -> dict:
    """Build a loader with ``build`` (timed), wait ``a["idle_s"]`` (what a script does before
    iterating, e.g. building its model; 0 by default), then take the first two batches of its
    first epoch, nothing warmed up, each after a device sync; the usual record fields over
    those two (``first_batch_s`` from the start of iterating)."""
    tree = process_tree()
    t0 = time.perf_counter()
    epoch, sync, loader = build(a, int(a.get("workers") or cores()))
    built = time.perf_counter()
    time.sleep(float(a.get("idle_s") or 0))  # a script building its model before iterating
    t1, w1, c1 = time.perf_counter(), time.time(), tree.cpu_times()
    gen = forever(epoch)  # a table of one batch gives its second from the next epoch
    batches, marks = [], []
    for _ in range(2):
        batches.append(next(gen))
        if sync is not None:
            sync()
        marks.append((time.perf_counter(), time.time()))
    gen.close()
    stats = loader.stats() if loader is not None else None
    return {
        "rows": sum(batch_rows(b) for b in batches),
        "bytes": sum(batch_nbytes(b) for b in batches),
        "wall_s": max(marks[1][0] - t1, 1e-9),
        "cpu_s": type(tree).cpu_delta(c1, tree.cpu_times()),
        "peak_rss": tree.peak_rss(),
        "window": [w1, time.time()],
        "build_s": built - t0,
        "first_batch_s": marks[0][0] - t1,
        "second_batch_s": marks[1][0] - marks[0][0],
        "first_batch_at": marks[0][1],
        "loader_first_batch_s": stats.time_to_first_batch_s if stats is not None else None,
    }


def startup(a: dict) -> dict:
    """Time to first batch in a fresh process, nothing warmed up: import the framework and the
    loader (``a["imports"]``, timed), build the loader ``a["kind"]`` (``systems.LOADERS``),
    then its first and second batch. ``a["spawned"]``: the parent's ``time.time()`` as it
    started this process (process start -> first batch); the harness's own imports before the
    task (``preimported``) fall in ``harness_s``, not ``import_s``."""
    import importlib

    started = time.time()
    pre = [m for m in HEAVY_MODULES if m in sys.modules]
    t0 = time.perf_counter()
    for mod in a.get("imports", ()):
        importlib.import_module(mod)
    build = load(LOADERS, a["kind"], "end-to-end loader")
    import_s = time.perf_counter() - t0
    from gpuload.fetch.cache import default_cache_dir  # where this process's caches are

    kernels = _files_under(os.path.join(default_cache_dir(), "kernels"))
    numba_dir = os.environ.get("NUMBA_CACHE_DIR")
    numba_files = _files_under(numba_dir) if numba_dir else None
    rec = _two_batches(a, build)
    ops = sys.modules.get("gpuload.ops")
    if ops is not None:  # leave the kernel compiled and cached (a later warm run needs it)
        ops.wait_for_warmups(timeout=900)
    spawned = float(a.get("spawned") or started)
    rec.update(
        import_s=import_s,
        process_s=rec.pop("first_batch_at") - spawned,
        harness_s=started - spawned,
        kernel_cache_files_at_start=kernels,
        numba_cache_files_at_start=numba_files,
        preimported=pre,
        cold=bool(a.get("cold")),
        cache_dir=os.environ.get("GPULOAD_CACHE_DIR"),
    )
    return {"": rec}


def _train_batches(a: dict, dev):
    """(make_epoch, sync, gpuload loader or None) for the training loop: one synthetic batch
    held in memory (the compute-bound ceiling) or an end-to-end loader."""
    import torch

    bs = a["batch_size"]
    if a["loader"] == "synthetic":
        x = torch.randn(bs, 3, 224, 224, device=dev)
        y = torch.randint(0, 10, (bs,), device=dev)

        def epoch(e):
            while True:
                yield {"image": x, "label": y}

        return epoch, torch_sync(a.get("device", "cpu")), None
    return e2e_loader(dict(a, kind=a["loader"], batch_size=bs))


def _labels(batch, n: int):
    import torch

    lab = batch.get("label") if isinstance(batch, dict) else (batch[1] if len(batch) > 1 else None)
    return torch.zeros(n, dtype=torch.int64) if lab is None else lab


class _TrainClock:
    """What the timed part of the training loop measured: wall, CPU, images, time waiting."""

    def __init__(self, sync, loader) -> None:
        self.sync, self.loader, self.tree = sync, loader, process_tree()
        self.t0 = self.w0 = None
        self.c0: dict = {}
        self.before = None
        self.waited = 0.0
        self.images = 0

    def start(self) -> None:
        if self.sync is not None:
            self.sync()
        self.t0, self.w0, self.c0 = time.perf_counter(), time.time(), self.tree.cpu_times()
        self.waited, self.images = 0.0, 0
        self.before = self.loader.stats() if self.loader is not None else None

    def record(self, steps: int) -> dict:
        if self.sync is not None:
            self.sync()
        wall = max(time.perf_counter() - self.t0, 1e-9)
        if self.loader is not None:  # gpuload's own counter of the loop's wait where it has one
            waited = self.loader.stats().wait_s - self.before.wait_s
        else:
            waited = self.waited
        rec = {
            "rows": self.images,
            "bytes": self.images * 3 * 224 * 224 * 4,
            "wall_s": wall,
            "cpu_s": type(self.tree).cpu_delta(self.c0, self.tree.cpu_times()),
            "peak_rss": self.tree.peak_rss(),
            "window": [self.w0, time.time()],
            "steps": steps,
            "steps_s": steps / wall,
            "wait_fraction": waited / wall,
        }
        if self.loader is not None:
            rec.update(stage_record(self.loader.stats, self.before))
        return rec


def train(a: dict) -> dict:
    """A small CNN trained for ``steps`` steps (after ``warmup`` excluded steps) on batches from
    ``loader``: "gpuload" (fast path, image ops), "synthetic" (one batch held in memory: the
    compute-bound ceiling) or "torch_pil" (DataLoader + PIL). Reports steps/s, images/s and the
    fraction of the loop's time spent waiting for the next batch."""
    import torch

    from .workloads import small_cnn

    torch.manual_seed(0)
    device = a.get("device", "cpu")
    dev = torch.device(device if str(device).startswith("cuda") else "cpu")
    epoch, sync, loader = _train_batches(a, dev)
    model = small_cnn(10).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    lossf = torch.nn.CrossEntropyLoss()
    warm, steps = int(a.get("warmup", 3)), int(a["steps"])
    clock = _TrainClock(sync, loader)
    gen = forever(epoch)
    losses = []
    try:
        for step in range(warm + steps):
            if step == warm:
                clock.start()
            tw = time.perf_counter()
            batch = next(gen)
            clock.waited += time.perf_counter() - tw
            img = image_of(batch)
            lab = _labels(batch, len(img)).to(dev, non_blocking=True).long() % 10
            opt.zero_grad(set_to_none=True)
            loss = lossf(model(img.to(dev, non_blocking=True)), lab)
            loss.backward()
            opt.step()
            clock.images += len(img)
            if step + 1 > warm and (step + 1 - warm) % max(1, steps // 10) == 0:
                losses.append(float(loss.detach()))
    finally:
        gen.close()
    rec = clock.record(steps)
    rec.update(
        loss_first=losses[0] if losses else float(loss.detach()), loss_last=float(loss.detach())
    )
    if str(device).startswith("cuda"):
        rec["gpu_mem_peak"] = int(torch.cuda.max_memory_allocated())
    return {"": rec}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in TASKS:
        print(
            f"usage: python -m gpuload.bench.child TASK JSON; tasks: {sorted(TASKS)}",
            file=sys.stderr,
        )
        return 2
    process_tree()  # start sampling memory now
    args = json.loads(argv[1])
    out = load(TASKS, argv[0], "task")(args)
    emit(out)
    # The task's loaders are garbage now: collecting them shuts DataLoader workers down (they
    # would otherwise linger until their watchdog notices). Then skip interpreter teardown,
    # which worker pools and library threads of some peers can hang; a timer makes sure.
    import gc
    import threading

    threading.Timer(30.0, os._exit, args=(0,)).start()
    del out
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
