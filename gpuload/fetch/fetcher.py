"""The one fetcher every read goes through.

Byte ranges are coalesced (adjacent rows become one request), issued concurrently with a bounded
number in flight, and written into the caller's preallocated buffer. Chunks written since format
2 carry page checksums: their reads are widened to whole pages, verified, and only then copied
(refetched once on a mismatch, then an IntegrityError naming table, chunk and range). Remote
reads are always verified, local ones unless ``FetchOptions.verify_local`` is False; the block
cache only ever stores verified bytes and is verified again on every read from it. Transient
errors are retried with backoff; the final error names the table, chunk and byte range. Thread
pools and file descriptors are created lazily per process, so a Fetcher survives pickling and
fork.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import numpy as np

from ..checksums import PageChecksums, hash_bytes
from ..errors import FetchError, FormatError, GpuloadError
from ..retry import RetryPolicy, call_with_retry
from ..storage import Store
from ..threads import DaemonThreadPool
from .cache import BlockCache, CacheOptions
from .catalog import DEFAULT_LIMIT, FileCatalog, Resolver
from .inflight import InFlightLimit
from .ranges import Groups, Read, ReadPlan, coalesce_plan
from .verify import DirectLayout, PageTables, contiguous, integrity_error, widen

__all__ = ["FetchOptions", "Fetcher", "Read", "ReadPlan"]

T = TypeVar("T")
_IOV_MAX = 1024
_POOL_NAME = "gpuload-fetch"
LOCAL_THREADS = 16  # threads for large local reads when FetchOptions.max_in_flight is None

log = logging.getLogger("gpuload.fetch")


@dataclass(frozen=True)
class FetchOptions:
    """How reads are issued. ``None`` picks a default suited to local or remote storage.
    ``max_in_flight``: requests to a remote table at once; ``None`` sizes it from measured
    throughput (16 to start, 8 to 64: see ``gpuload.fetch.inflight``), a number pins it (a far
    bucket may want more; local reads use at most this many threads, 16 when ``None``).
    ``verify_local``: check page checksums on local reads too (remote reads always are)."""

    max_in_flight: int | None = None
    max_gap: int | None = None
    max_request: int | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    verify_local: bool = True

    def __post_init__(self) -> None:
        n = self.max_in_flight
        if n is None:
            return
        try:
            ok = not isinstance(n, bool) and operator.index(n) >= 1
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"FetchOptions.max_in_flight must be None or an int >= 1, got {n!r}")
        object.__setattr__(self, "max_in_flight", operator.index(n))  # numpy ints become int


class Fetcher:
    """Reads byte ranges of one table's files into caller-owned buffers. What it knows of each
    file (size, page checksums) comes from ``sizes`` and ``checksums``, or is looked up through
    ``resolve`` (a chunk index: see ``gpuload.fetch.catalog``), keeping at most ``limit``."""

    def __init__(
        self,
        store: Store,
        label: str,
        options: FetchOptions | None = None,
        cache: CacheOptions | bool | str | None = None,
        sizes: Mapping[str, int] | None = None,
        checksums: Mapping[str, PageChecksums] | None = None,
        *,
        resolve: Resolver | None = None,
        limit: int = DEFAULT_LIMIT,
    ) -> None:
        self.store = store
        self.label = label
        self.options = options or FetchOptions()
        self.cache_options = CacheOptions.coerce(cache)
        self.catalog = FileCatalog(sizes, checksums, resolve, limit, label)
        local = store.is_local
        self.max_gap = (
            self.options.max_gap
            if self.options.max_gap is not None
            else (4096 if local else 256 << 10)
        )
        self.max_request = (
            self.options.max_request
            if self.options.max_request is not None
            else (64 << 20 if local else 16 << 20)
        )
        use_cache = (
            self.cache_options.enabled if self.cache_options.enabled is not None else not local
        )
        self.cache = (
            BlockCache(store.url, self.cache_options) if (use_cache and not local) else None
        )
        self.verify = self.catalog.has_checksums and (not local or self.options.verify_local)
        fixed = self.options.max_in_flight
        self.limit = InFlightLimit(fixed if fixed is not None or not local else LOCAL_THREADS)
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._pool: DaemonThreadPool | None = None
        self._fds: OrderedDict[str | tuple, int] = OrderedDict()  # files and ("block", f, b)
        # Descriptors evicted from the LRU close only once no read is running: a thread still
        # reading through one must never see its number reused for another file.
        self._evicted: list[int] = []
        self._active = 0
        self._inflight: dict[tuple[str, int], Future] = {}
        self._prefetching = 0  # downloads started by prefetch() and not finished
        self._scratch = threading.local()
        self._pages = PageTables(self._sums)
        self.catalog.after_fork()
        self.limit.after_fork()
        self.stats = {
            "requests": 0,
            "bytes": 0,
            "retries": 0,
            "cache_hits": 0,
            "cache_misses": 0,
            "verified_bytes": 0,
            "refetches": 0,
            "prefetched": 0,
        }

    @property
    def sizes(self) -> dict[str, int]:
        """The file sizes known now (every chunk's, unless they are resolved on demand)."""
        self._check_pid()
        return self.catalog.snapshot()[0]

    @property
    def checksums(self) -> dict[str, PageChecksums]:
        """The page checksums known now (every chunk's, unless resolved on demand)."""
        self._check_pid()
        return self.catalog.snapshot()[1]

    def _sums(self, file: str) -> PageChecksums:
        """The page checksums of a file known to have them."""
        sums = self.catalog.sums(file)
        if sums is None:
            raise FormatError(
                f"table {self.label!r}: {file} has no page checksums in this snapshot"
            )
        return sums

    def __getstate__(self):
        cat = self.catalog
        sizes, sums = ({}, {}) if cat.resolve is not None else cat.snapshot()
        return {
            "store": self.store,
            "label": self.label,
            "options": self.options,
            "cache": self.cache_options,
            "sizes": sizes,
            "checksums": sums,
            "resolve": cat.resolve,
            "limit": cat.limit or DEFAULT_LIMIT,
        }

    def __setstate__(self, state):
        self.__init__(
            state["store"],
            state["label"],
            state["options"],
            state["cache"],
            state["sizes"],
            state.get("checksums"),
            resolve=state.get("resolve"),
            limit=state.get("limit", DEFAULT_LIMIT),
        )

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            # After fork: the parent's threads do not exist here and its fds are shared; start over.
            self._reset()

    def _executor(self) -> DaemonThreadPool:
        self._check_pid()
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    # threads for the in-flight limit now; more when it rises
                    self._pool = DaemonThreadPool(self.limit.limit, thread_name_prefix=_POOL_NAME)
                    self.limit.on_raise = self._pool.set_max_workers
                    self.limit.backlog = self._pool.backlog
        return self._pool

    def close(self) -> None:
        """Release threads and file descriptors (they are recreated on next use)."""
        if self._pid != os.getpid():
            self._reset()
            return
        with self._lock:
            pool, self._pool = self._pool, None
            if pool is not None:
                self.limit.on_raise = self.limit.backlog = None
        if pool is not None:
            # joined outside the lock: a running download takes it when it ends
            pool.shutdown(wait=True)
        with self._lock:
            for fd in [*self._fds.values(), *self._evicted]:
                os.close(fd)
            self._fds.clear()
            self._evicted.clear()

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None and getattr(self, "_pid", None) == os.getpid():
            pool.shutdown(wait=False)
        if getattr(self, "_pid", None) == os.getpid():
            for fd in [*getattr(self, "_fds", {}).values(), *getattr(self, "_evicted", [])]:
                try:
                    os.close(fd)
                except OSError:
                    continue

    # -- public API ------------------------------------------------------------------------
    def read(self, file: str, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of a table file."""
        out = bytearray(length)
        self.read_into([Read(file, start, length, 0)], out)
        return bytes(out)

    def read_into(
        self, reads: Sequence[Read] | ReadPlan, out, rows_checked: bool = False, fresh: bool = False
    ) -> None:
        """Fill ``out`` (a writable buffer) from the given reads. Returns when every read landed
        (verified against its chunk's page checksums where the chunk has them).

        ``rows_checked``: the caller checks what it reads against per-row hashes (whole rows of
        variable-length columns), so the reads are not widened to pages. ``fresh``: the caller's
        check failed; cached blocks under these reads are dropped and fetched again first."""
        with self._reading():
            plan = reads if isinstance(reads, ReadPlan) else ReadPlan.from_reads(reads)
            view = memoryview(out).cast("B")
            if len(plan) == 0:
                return
            if plan.dest.min() < 0 or int((plan.dest + plan.length).max()) > len(view):
                raise ValueError(f"reads do not fit the {len(view)}-byte output buffer")
            if fresh and self.cache is not None:
                self._drop_blocks(plan)
            self._read_into(plan, view, rows_checked)

    def _drop_blocks(self, plan: ReadPlan) -> None:
        bs = self.cache_options.block_bytes
        keep = plan.length > 0
        for fi, a, b in zip(
            plan.fidx[keep].tolist(), plan.start[keep].tolist(), plan.end[keep].tolist()
        ):
            for blk in range(a // bs, (b - 1) // bs + 1):
                self._drop_block(plan.files[fi], blk)

    def _read_into(self, plan: ReadPlan, view: memoryview, rows_checked: bool) -> None:
        if self.verify and not rows_checked:
            used = np.unique(plan.fidx)
            has = np.array(
                [self.catalog.sums(plan.files[i]) is not None for i in used.tolist()], dtype=bool
            )
            if has.all():
                self._read_verified(plan, view, used)
                return
            if has.any():
                checked = np.isin(plan.fidx, used[has])
                self._read_verified(_subplan(plan, checked), view, used[has])
                plan = _subplan(plan, ~checked)
        if self.store.is_local:
            self._read_local(plan, view)
        elif self.cache is not None:
            self._read_cached(plan, view)
        else:
            self._read_remote(plan, view)

    def ensure_sizes(self, files: Sequence[str]) -> None:
        """``ensure_size`` for several chunks; remote checks run concurrently (one round trip
        each, however many chunks a shuffled batch touches)."""
        self._check_pid()  # a forked child's fresh locks before the catalog's is taken
        todo = [f for f in files if not self.catalog.checked(f)]
        with self._reading():
            if len(todo) > 1 and not self.store.is_local:
                self._run_all([lambda f=f: self._ensure_size(f) for f in todo])
                return
            for f in todo:
                self._ensure_size(f)

    def ensure_size(self, file: str) -> None:
        """Check once per process that a chunk file is as large as its manifest says, before
        anything is allocated from the manifest's sizes (a manifest may lie)."""
        self.ensure_sizes([file])

    def _ensure_size(self, file: str) -> None:
        if self.catalog.checked(file):
            return
        claimed = self.catalog.size(file)
        if claimed is None:
            raise FormatError(f"table {self.label!r}: {file} is not a chunk of this snapshot")
        if self.store.is_local:
            try:
                real = os.fstat(self._fd(file)).st_size
            except GpuloadError:
                raise
            except OSError as e:
                raise self._fail(file, 0, claimed, e) from e
        elif self.catalog.sums(file) is not None:
            self._page_table(file)  # reading the hash table reads the chunk's last bytes
            real = claimed
        else:
            try:
                real = self.store.size(file)
            except FileNotFoundError as e:
                raise self._fail(file, 0, claimed, e) from e
        if real != claimed:
            raise FormatError(
                f"table {self.label!r}, chunk {file}: the manifest says {claimed} bytes, the "
                f"file has {real}"
            )
        self.catalog.mark_checked(file)

    # -- helpers ---------------------------------------------------------------------------
    def _where(self, file: str, start: int, end: int) -> str:
        return f"table {self.label!r}, chunk {file}, bytes [{start}, {end})"

    def _fail(self, file: str, start: int, end: int, exc: BaseException) -> FetchError:
        tries = getattr(exc, "gpuload_tries", 1)
        return FetchError(
            f"reading {self._where(file, start, end)} failed after {tries} tr{'y' if tries == 1 else 'ies'}: "
            f"{type(exc).__name__}: {exc}"
        )

    def _run_all(self, jobs: list) -> None:
        """Run callables concurrently (bounded by the pool); wait for all, then raise the first
        error. On a fetch thread they run here, one after another: a pool thread waiting on
        jobs queued behind other waiting jobs would deadlock the pool."""
        if len(jobs) == 1 or threading.current_thread().name.startswith(_POOL_NAME):
            first: BaseException | None = None
            for j in jobs:
                try:
                    j()
                except BaseException as e:  # noqa: BLE001 - collected, re-raised after all ran
                    first = first or e
            if first is not None:
                raise first
            return
        pool = self._executor()
        futures = [pool.submit(j) for j in jobs]
        first = None
        for f in futures:
            try:
                f.result()
            except BaseException as e:  # noqa: BLE001 - collected, re-raised after all finish
                first = first or e
        if first is not None:
            raise first

    def _buffer(self, n: int) -> memoryview:
        """A reused per-thread scratch buffer of at least ``n`` bytes."""
        buf = getattr(self._scratch, "buf", None)
        if buf is None or len(buf) < n:
            buf = self._scratch.buf = bytearray(max(n, 1 << 20))
        return memoryview(buf)[:n]

    # -- local files -----------------------------------------------------------------------
    def _fd(self, file: str) -> int:
        """An open descriptor for a table file (LRU of 256, per process)."""
        return self._cached_fd(file, lambda: self.store.open_local(file))

    def _cached_fd(self, key, opener: Callable[[], int]) -> int:
        """An open descriptor from the per-process LRU (table files and cached blocks)."""
        with self._lock:
            fd = self._fds.get(key)
            if fd is not None:
                self._fds.move_to_end(key)
                return fd
        fd = opener()
        with self._lock:
            old = self._fds.get(key)
            if old is not None:
                os.close(fd)
                return old
            self._fds[key] = fd
            while len(self._fds) > 256:
                _, victim = self._fds.popitem(last=False)
                self._evicted.append(victim)
        return fd

    def _drop_block(self, file: str, b: int) -> None:
        """Remove a cached block that failed a check (and forget any descriptor on it)."""
        with self._lock:
            fd = self._fds.pop(("block", file, b), None)
            if fd is not None:
                self._evicted.append(fd)
        self.cache.discard(file, b)

    @contextlib.contextmanager
    def _reading(self):
        """Marks a read in progress (descriptors it uses stay open until all reads end)."""
        self._check_pid()
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0 and self._evicted:
                    for fd in self._evicted:
                        os.close(fd)
                    self._evicted.clear()

    def _read_local(self, plan: ReadPlan, view: memoryview) -> None:
        groups = coalesce_plan(plan, self.max_gap, self.max_request)
        n = len(groups)
        total = int((groups.gend - groups.gstart).sum())
        # Page-cache reads are memcpy: threads only pay off for many large requests (cold disks).
        if n >= 4 and total >= (8 << 20) and total / n >= (256 << 10):
            self._run_all([lambda g=g: self._local_group(plan, groups, g, view) for g in range(n)])
            return
        # The common case, many small rows: one loop over plain Python ints.
        gfile, gstart, gend = groups.gfile.tolist(), groups.gstart.tolist(), groups.gend.tolist()
        bounds, order = groups.bounds.tolist(), groups.order.tolist()
        start, length, dest = plan.start.tolist(), plan.length.tolist(), plan.dest.tolist()
        fds: dict[int, int] = {}
        for g in range(n):
            fi = gfile[g]
            fd = fds.get(fi)
            if fd is None:
                try:
                    fd = fds[fi] = self._fd(plan.files[fi])
                except GpuloadError:
                    raise
                except OSError as e:
                    raise self._fail(plan.files[fi], gstart[g], gend[g], e) from e
            a, b = bounds[g], bounds[g + 1]
            try:
                if b - a == 1:  # a lone read: straight into its place
                    i = order[a]
                    d, ln = dest[i], length[i]
                    if os.preadv(fd, [view[d : d + ln]], start[i]) != ln:
                        self._pread_exact(fd, [view[d : d + ln]], start[i], plan.files[fi])
                else:
                    m = order[a:b]
                    self._preadv_group(
                        fd,
                        plan.files[fi],
                        gstart[g],
                        gend[g],
                        [start[i] for i in m],
                        [length[i] for i in m],
                        [dest[i] for i in m],
                        view,
                    )
            except GpuloadError:
                raise
            except OSError as e:
                raise self._fail(plan.files[fi], gstart[g], gend[g], e) from e
        self.stats["requests"] += n
        self.stats["bytes"] += total

    def _local_group(self, plan: ReadPlan, groups: Groups, g: int, view: memoryview) -> None:
        file = plan.files[int(groups.gfile[g])]
        gs, ge = int(groups.gstart[g]), int(groups.gend[g])
        try:
            fd = self._fd(file)
            m = groups.members(g)
            self._preadv_group(
                fd,
                file,
                gs,
                ge,
                plan.start[m].tolist(),
                plan.length[m].tolist(),
                plan.dest[m].tolist(),
                view,
            )
        except GpuloadError:
            raise
        except OSError as e:
            raise self._fail(file, gs, ge, e) from e
        with self._lock:
            self.stats["requests"] += 1
            self.stats["bytes"] += ge - gs

    def _preadv_group(
        self,
        fd: int,
        file: str,
        gs: int,
        ge: int,
        starts: list,
        lens: list,
        dests: list,
        view: memoryview,
    ) -> None:
        """Read one coalesced request with preadv: members land in place, gaps in scratch."""
        overlapping = any(starts[i] < starts[i - 1] + lens[i - 1] for i in range(1, len(starts)))
        if overlapping:
            buf = self._buffer(ge - gs)
            self._pread_exact(fd, [buf], gs, file)
            for s0, ln, d in zip(starts, lens, dests):
                view[d : d + ln] = buf[s0 - gs : s0 - gs + ln]
            return
        iov: list[memoryview] = []
        scratch = None
        pos = gs
        for s0, ln, d in zip(starts, lens, dests):
            if s0 > pos:
                gap = s0 - pos
                if scratch is None or len(scratch) < gap:
                    scratch = memoryview(bytearray(max(gap, 4096)))
                iov.append(scratch[:gap])
            iov.append(view[d : d + ln])
            pos = s0 + ln
        offset = gs
        for i in range(0, len(iov), _IOV_MAX):
            part = iov[i : i + _IOV_MAX]
            self._pread_exact(fd, part, offset, file)
            offset += sum(len(b) for b in part)

    def _pread_exact(self, fd: int, bufs: list[memoryview], offset: int, file: str) -> None:
        """preadv until every buffer is full; a file that ends early is a truncated chunk."""
        want = sum(len(b) for b in bufs)
        got = os.preadv(fd, bufs, offset)
        if got == want:
            return
        done = got
        while done < want:
            # locate the first unfilled buffer and continue from there
            pos = 0
            rest: list[memoryview] = []
            for b in bufs:
                if pos + len(b) <= done:
                    pos += len(b)
                    continue
                rest.append(b[max(0, done - pos) :])
                pos += len(b)
            n = os.preadv(fd, rest, offset + done)
            if n <= 0:
                raise FetchError(
                    f"short read in {self._where(file, offset, offset + want)}: file ends after "
                    f"{offset + done} bytes (truncated chunk?)"
                )
            done += n

    # -- remote, uncached ------------------------------------------------------------------
    def _get(self, file: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a remote file: retried, checked to be exactly that range."""
        attempts = [0]

        def once() -> bytes:
            attempts[0] += 1
            with self.limit.slot() as moved:
                data = self.store.read_range(file, start, end)
                moved(len(data))
            return data

        try:
            data = call_with_retry(once, self.options.retry, lambda: self._where(file, start, end))
        except GpuloadError as e:
            if isinstance(e, FetchError) and getattr(e, "gpuload_tries", 1) > 1:
                raise self._fail(file, start, end, e) from e
            raise
        except Exception as e:  # any storage error after retries becomes one clear FetchError
            raise self._fail(file, start, end, e) from e
        finally:
            with self._lock:
                self.stats["retries"] += max(0, attempts[0] - 1)
        with self._lock:
            self.stats["requests"] += 1
            self.stats["bytes"] += len(data)
        return data

    def _read_remote(self, plan: ReadPlan, view: memoryview) -> None:
        groups = coalesce_plan(plan, self.max_gap, self.max_request)

        def job(g: int) -> None:
            file = plan.files[int(groups.gfile[g])]
            gs = int(groups.gstart[g])
            src = memoryview(self._get(file, gs, int(groups.gend[g])))
            _scatter(plan, groups.members(g), gs, src, view)

        self._run_all([lambda g=g: job(g) for g in range(len(groups))])

    # -- remote, cached in blocks ----------------------------------------------------------
    def _blocks_of(self, plan: ReadPlan) -> dict[str, set[int]]:
        """The cache blocks each file's reads in ``plan`` touch."""
        bs = self.cache_options.block_bytes
        keep = plan.length > 0
        first = plan.start // bs
        last = (plan.end - 1) // bs
        needed: dict[str, set[int]] = {}
        for fi, b0, b1 in zip(plan.fidx[keep].tolist(), first[keep].tolist(), last[keep].tolist()):
            needed.setdefault(plan.files[fi], set()).update(range(b0, b1 + 1))
        return needed

    def prefetch(self, plan: ReadPlan) -> bool:
        """Start downloading the cache blocks ``plan`` will read, without waiting: a loader
        calls it for batches it will assemble later, so their round trips overlap the current
        ones. At most half of ``max_in_flight`` (of 16 when adaptive: a raised limit does not
        multiply the cache blocks held in memory), and of the limit now, such downloads are
        outstanding (the rest are left to the read itself); a no-op without the block cache. A failed download is
        not reported here: the read that needs the block waits for it and raises its error.
        Returns True when every block of ``plan`` is now cached or downloading, False when the
        bound left some out (call again later)."""
        if self.cache is None or not len(plan):
            return True
        pool = self._executor()
        needed = self._blocks_of(plan)
        with self._lock:
            # half the pool at most, so the reads a batch waits for now are not queued behind
            most = min(self.options.max_in_flight or InFlightLimit.START, self.limit.limit)
            room = max(1, most // 2) - self._prefetching
            for file, blocks in needed.items():
                for b in sorted(blocks):
                    if (file, b) in self._inflight or os.path.exists(
                        self.cache.block_path(file, b)
                    ):
                        continue
                    if room <= 0:
                        return False
                    fut: Future = Future()
                    self._inflight[(file, b)] = fut
                    self._prefetching += 1
                    self.stats["prefetched"] += 1
                    room -= 1
                    pool.submit(self._prefetch_one, file, b, fut)
        return True

    def _prefetch_one(self, file: str, b: int, fut: Future) -> None:
        try:
            self._download(file, [b], fut)
        except BaseException as e:  # noqa: BLE001 - the read waiting on ``fut`` raises it
            log.debug("prefetching block %d of %s failed: %s", b, file, e)
        finally:
            with self._lock:
                self._prefetching -= 1

    def _read_cached(self, plan: ReadPlan, view: memoryview) -> None:
        self._ensure_blocks(self._blocks_of(plan))
        for fi, s0, ln, d in zip(
            plan.fidx.tolist(), plan.start.tolist(), plan.length.tolist(), plan.dest.tolist()
        ):
            self._read_from_blocks(plan.files[fi], s0, view[d : d + ln])

    def _read_from_blocks(self, file: str, start: int, out: memoryview) -> None:
        """Copy file bytes [start, start + len(out)) out of cached blocks (fetching any evicted
        since they were ensured)."""
        bs = self.cache_options.block_bytes
        pos, end = start, start + len(out)
        while pos < end:
            b = pos // bs
            b_end = min(end, (b + 1) * bs)
            part = out[pos - start : b_end - start]
            for attempt in range(2):
                fd = self._open_block(file, b)
                try:
                    self._pread_exact(fd, [part], pos - b * bs, file)
                    break
                except FetchError:  # a cut-short block (a crash while it was written): refetch
                    if attempt:
                        raise
                    self._drop_block(file, b)
            pos = b_end

    def _open_block(self, file: str, b: int) -> int:
        """A descriptor for a cached block, kept open in the LRU (blocks are immutable, so one
        evicted from disk meanwhile still reads its verified bytes); a block gone before it
        was opened is fetched again."""
        with self._lock:
            fd = self._fds.get(("block", file, b))
        if fd is not None:
            return fd
        for _ in range(3):
            path = self.cache.lookup(file, b)
            if path is not None:
                try:
                    return self._cached_fd(
                        ("block", file, b), lambda p=path: os.open(p, os.O_RDONLY)
                    )
                except FileNotFoundError:
                    pass  # evicted between lookup and open: fetch it again below
            self._ensure_blocks({file: {b}})
        raise FetchError(
            f"{self._where(file, b * self.cache_options.block_bytes, (b + 1) * self.cache_options.block_bytes)}: "
            "the block cache evicted this block three times while reading it; the cache is too "
            "small for the processes sharing it (CacheOptions.max_bytes)"
        )

    def _ensure_blocks(self, needed: dict[str, set[int]]) -> None:
        bs = self.cache_options.block_bytes
        waits: list[Future] = []
        jobs: list = []
        with self._lock:
            for file, blocks in needed.items():
                missing = []
                for b in sorted(blocks):
                    key = (file, b)
                    fut = self._inflight.get(key)
                    if fut is not None:
                        waits.append(fut)
                    elif os.path.exists(self.cache.block_path(file, b)):
                        self.stats["cache_hits"] += 1
                    else:
                        missing.append(b)
                # consecutive missing blocks become one request of at most max_request bytes
                per_req = max(1, self.max_request // bs)
                run: list[int] = []
                for b in missing + [None]:
                    if run and (b is None or b != run[-1] + 1 or len(run) >= per_req):
                        fut = Future()
                        for rb in run:
                            self._inflight[(file, rb)] = fut
                        jobs.append((file, list(run), fut))
                        run = []
                    if b is not None:
                        run.append(b)
        with self._lock:
            self.stats["cache_misses"] += len(jobs)
        try:
            if jobs:
                self._run_all([lambda j=j: self._download(*j) for j in jobs])
        finally:  # a download that never ran must not leave waiters hanging on its future
            for file, run, fut in jobs:
                if not fut.done():
                    fut.set_exception(FetchError(f"{self._where(file, 0, 0)}: download not run"))
                    with self._lock:
                        for b in run:
                            self._inflight.pop((file, b), None)
        for fut in waits:
            fut.result()

    def _download(self, file: str, blocks: list[int], fut: Future) -> None:
        bs = self.cache_options.block_bytes
        start = blocks[0] * bs
        try:
            size = self.catalog.size(file)
            if size is None:
                size = self.store.size(file)
                self.catalog.learn_size(file, size)
            end = min((blocks[-1] + 1) * bs, size)
            if start >= end:
                raise FetchError(
                    f"{self._where(file, start, end)} lies past the end of the {size}-byte file"
                )
            data = self._fetch_checked(file, start, end)
            for i, b in enumerate(blocks):
                part = data[i * bs : (i + 1) * bs]
                if len(part):
                    self.cache.store(file, b, part)
            fut.set_result(None)
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            with self._lock:
                for b in blocks:
                    self._inflight.pop((file, b), None)

    def _fetch_checked(self, file: str, start: int, end: int) -> memoryview:
        """Remote bytes [start, end), verified when the chunk has checksums (the range is
        widened to whole pages for that): what the block cache may store."""
        sums = self.catalog.sums(file)
        if sums is None:
            return memoryview(self._get(file, start, end))
        table = self._page_table(file)
        lo = start - start % sums.page
        hi = end if end >= sums.covers else min(-(-end // sums.page) * sums.page, sums.covers)
        data = self._get(file, lo, hi)
        if self._pages.bad(file, table, lo, data):
            data = self._once_more(
                file, lambda: self._get(file, lo, hi), lambda d: self._pages.bad(file, table, lo, d)
            )
        with self._lock:
            self.stats["verified_bytes"] += len(data)
        return memoryview(data)[start - lo : end - lo]

    def _once_more(self, file: str, fetch: Callable[[], T], bad: Callable[[T], list[int]]) -> T:
        """Fetch again what failed its checksum; still wrong: IntegrityError naming the page."""
        with self._lock:
            self.stats["refetches"] += 1
        data = fetch()
        wrong = bad(data)
        if wrong:
            raise self._page_error(file, wrong[0])
        return data

    # -- verified reads --------------------------------------------------------------------
    def _page_table(self, file: str) -> np.ndarray:
        """The chunk's page hashes, read from the end of the file and checked against the
        manifest's digest (once per process; refetched once on a mismatch)."""
        table = self._pages.get(file)
        if table is not None:
            return table
        sums = self._sums(file)
        lo, hi = sums.table_offset, sums.end
        for attempt in range(2):
            if self.store.is_local:
                raw = memoryview(bytearray(hi - lo))  # not the scratch: callers may hold it
                self._pread_exact(self._fd(file), [raw], lo, file)
            elif self.cache is not None and attempt == 0 and self._cached(file, lo, hi):
                raw = memoryview(bytearray(hi - lo))
                self._read_from_blocks(file, lo, raw)
            else:
                raw = self._get(file, lo, hi)
            table = self._pages.accept(file, raw)
            if table is not None:
                return table
            with self._lock:
                self.stats["refetches"] += 1
        raise integrity_error(
            self.label, file, lo, hi, "the page hash table does not match the manifest"
        )

    def _cached(self, file: str, start: int, end: int) -> bool:
        bs = self.cache_options.block_bytes
        return all(
            os.path.exists(self.cache.block_path(file, b))
            for b in range(start // bs, (end - 1) // bs + 1)
        )

    def _page_error(self, file: str, page: int) -> GpuloadError:
        sums = self._sums(file)
        if page >= sums.pages:
            lo, hi = sums.table_offset, sums.end
        else:
            lo, hi = page * sums.page, min((page + 1) * sums.page, sums.covers)
        return integrity_error(self.label, file, lo, hi, f"page {page} does not match its checksum")

    def _read_verified(self, plan: ReadPlan, view: memoryview, used: np.ndarray) -> None:
        """Widen reads to whole pages, fetch each coalesced group, verify it, then copy out.
        ``used``: the sorted indexes into ``plan.files`` that the plan reads."""
        names = [plan.files[i] for i in used.tolist()]
        sums = [self._sums(f) for f in names]
        at = np.searchsorted(used, plan.fidx)
        page = np.array([s.page for s in sums], dtype=np.int64)[at]
        covers = np.array([s.covers for s in sums], dtype=np.int64)[at]
        if (plan.end > covers).any():
            i = int(np.flatnonzero(plan.end > covers)[0])
            f = plan.files[int(plan.fidx[i])]
            raise FormatError(
                f"{self._where(f, int(plan.start[i]), int(plan.end[i]))} lies outside the "
                "checksummed pages"
            )
        missing = [f for f in names if self._pages.get(f) is None]
        if len(missing) > 1 and not self.store.is_local:
            self._run_all([lambda f=f: self._page_table(f) for f in missing])
        for f in missing:
            self._page_table(f)
        groups = coalesce_plan(widen(plan, page, covers), self.max_gap, self.max_request)
        if self.store.is_local:
            self._verified_local(plan, groups, view)
            return
        if self.cache is not None:  # blocks fetched (and verified) concurrently, then read here
            bs = self.cache_options.block_bytes
            needed: dict[str, set[int]] = {}
            for f, a, b in zip(groups.gfile.tolist(), groups.gstart.tolist(), groups.gend.tolist()):
                needed.setdefault(plan.files[f], set()).update(range(a // bs, (b - 1) // bs + 1))
            self._ensure_blocks(needed)
            gpage = np.array([self._sums(plan.files[f]).page for f in groups.gfile.tolist()])
            self._verified_copied(
                plan, groups, np.ones(len(groups), bool), gpage, view, self._from_cache
            )
            return

        def job(g: int) -> None:
            file = plan.files[int(groups.gfile[g])]
            gs, ge = int(groups.gstart[g]), int(groups.gend[g])
            data = self._verified_group(file, gs, ge)
            _scatter(plan, groups.members(g), gs, data, view)

        self._run_all([lambda g=g: job(g) for g in range(len(groups))])

    def _verified_local(self, plan: ReadPlan, groups: Groups, view: memoryview) -> None:
        """Local verified reads, one preadv per coalesced group. Long groups whose reads are
        contiguous in the file and in ``view`` (sequential runs) read their inner pages straight
        into ``view`` and only their first and last page into scratch; the others (shuffled
        rows) are read into scratch, hashed in one pass and copied out. The read returns only
        once every page matched; when one does not, it raises and ``view`` is unspecified."""
        files = plan.files
        page = np.fromiter(
            (self._sums(files[f]).page for f in groups.gfile.tolist()), np.int64, len(groups)
        )
        # direct reads pay off once a group's inner pages outweigh its per-group bookkeeping
        long = np.flatnonzero(groups.gend - groups.gstart > 16 * page).tolist()
        direct = [g for g in long if contiguous(plan, groups.members(g))]
        copied = np.ones(len(groups), dtype=bool)
        copied[direct] = False
        if direct:
            self._verified_direct(plan, groups, direct, view)
        if copied.any():
            self._verified_copied(plan, groups, copied, page, view, self._from_disk)
        total = int((groups.gend - groups.gstart).sum())
        with self._lock:
            self.stats["requests"] += len(groups)
            self.stats["bytes"] += total
            if direct:
                sizes = groups.gend[direct] - groups.gstart[direct]
                self.stats["verified_bytes"] += int(sizes.sum())

    def _verified_direct(self, plan: ReadPlan, groups: Groups, direct: list, view) -> None:
        scratch = self._buffer(
            sum(2 * self._sums(plan.files[groups.gfile[g]]).page for g in direct)
        )
        lay = DirectLayout(plan, groups, view, scratch)
        for g in direct:
            file = plan.files[int(groups.gfile[g])]
            try:
                fd = self._fd(file)
                k = lay.add(g, fd, self._page_table(file), self._sums(file))
                self._read_pieces(fd, lay.iov[k], lay.gstart[g], file)
            except GpuloadError:
                raise
            except OSError as e:
                raise self._fail(file, int(groups.gstart[g]), int(groups.gend[g]), e) from e
        for k in lay.bad():
            g = lay.groups[k]
            file = plan.files[int(groups.gfile[g])]
            reread = partial(self._read_pieces, lay.fds[k], lay.iov[k], lay.gstart[g], file)
            self._once_more(file, reread, lambda _, k=k: lay.bad_pages(k))
        lay.copy_out()

    def _from_disk(self, file: str, start: int, part: memoryview, again: bool) -> None:
        """Bytes [start, start + len(part)) of a local chunk file into ``part``."""
        try:
            self._read_pieces(self._fd(file), [part], start, file)
        except GpuloadError:
            raise
        except OSError as e:
            raise self._fail(file, start, start + len(part), e) from e

    def _from_cache(self, file: str, start: int, part: memoryview, again: bool) -> None:
        """The same out of the block cache; ``again``: the cached copy failed its check, so
        its blocks are dropped and fetched anew first."""
        if again:
            bs = self.cache_options.block_bytes
            blocks = set(range(start // bs, (start + len(part) - 1) // bs + 1))
            for b in blocks:
                self._drop_block(file, b)
            self._ensure_blocks({file: blocks})
        self._read_from_blocks(file, start, part)

    def _verified_copied(self, plan, groups: Groups, sel: np.ndarray, page, view, read) -> None:
        """Selected groups into one scratch buffer (through ``read(file, start, part, again)``),
        all their pages hashed in one loop, then each read copied out (plain-int loops: a
        shuffled batch is one group per row)."""
        files = plan.files
        gsel = np.flatnonzero(sel)
        gs, ge = groups.gstart[gsel], groups.gend[gsel]
        offs = np.zeros(len(gsel) + 1, dtype=np.int64)
        np.cumsum(ge - gs, out=offs[1:])
        buf = self._buffer(int(offs[-1]))
        gfile, gsl, boff = groups.gfile[gsel].tolist(), gs.tolist(), offs.tolist()
        for j in range(len(gsel)):
            read(files[gfile[j]], gsl[j], buf[boff[j] : boff[j + 1]], False)
        for j in self._bad_copied(files, gfile, gs, ge, page[gsel], offs, buf):
            file, part, at = files[gfile[j]], buf[boff[j] : boff[j + 1]], gsl[j]
            table = self._page_table(file)
            self._once_more(
                file,
                partial(read, file, at, part, True),
                lambda _, f=file, t=table, a=at, p=part: self._pages.bad(f, t, a, p),
            )
        # where each selected read's bytes sit in the scratch buffer, then one copy each
        slot = np.full(len(groups), -1, dtype=np.int64)
        slot[gsel] = np.arange(len(gsel))
        group_of = np.full(len(plan), -1, dtype=np.int64)  # empty reads belong to no group
        group_of[groups.order] = np.repeat(slot, np.diff(groups.bounds))
        mine = group_of >= 0
        j = group_of[mine]
        src = (offs[:-1][j] + plan.start[mine] - gs[j]).tolist()
        for so, ln, d in zip(src, plan.length[mine].tolist(), plan.dest[mine].tolist()):
            view[d : d + ln] = buf[so : so + ln]
        with self._lock:
            self.stats["verified_bytes"] += int(offs[-1])

    def _bad_copied(self, files, gfile: list, gs, ge, page, offs, buf) -> list[int]:
        """Groups (read into ``buf`` at ``offs``, page-aligned in their files) holding a page
        whose hash does not match: every page of every group hashed in one loop."""
        n = len(gfile)
        first = gs // page
        counts = -(-(ge - gs) // page)
        gi = np.repeat(np.arange(n), counts)
        k = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        at = k * page[gi]
        length = np.minimum(page[gi], (ge - gs)[gi] - at).tolist()
        where = (offs[:-1][gi] + at).tolist()
        pidx = first[gi] + k
        want = np.empty(len(pidx), dtype=np.uint64)
        pfile = np.asarray(gfile, dtype=np.int64)[gi]
        for f in set(gfile):
            m = pfile == f
            want[m] = self._page_table(files[f])[pidx[m]]
        h = hash_bytes
        got = np.fromiter(
            (h(buf[o : o + ln]) for o, ln in zip(where, length)), np.uint64, len(want)
        )
        return np.unique(gi[got != want]).tolist()

    def _read_pieces(self, fd: int, iov: list[memoryview], offset: int, file: str) -> None:
        want = sum(len(b) for b in iov)
        if os.preadv(fd, iov, offset) != want:
            self._pread_exact(fd, iov, offset, file)

    def _verified_group(self, file: str, gs: int, ge: int) -> memoryview:
        """One uncached remote group, verified (fetched once more on a mismatch)."""
        table = self._page_table(file)
        data = memoryview(self._get(file, gs, ge))
        if self._pages.bad(file, table, gs, data):
            data = self._once_more(
                file,
                lambda: memoryview(self._get(file, gs, ge)),
                lambda d: self._pages.bad(file, table, gs, d),
            )
        with self._lock:
            self.stats["verified_bytes"] += ge - gs
        return data


def _subplan(plan: ReadPlan, mask: np.ndarray) -> ReadPlan:
    return ReadPlan(
        plan.files, plan.fidx[mask], plan.start[mask], plan.length[mask], plan.dest[mask]
    )


def _scatter(plan: ReadPlan, members, gs: int, src: memoryview, view: memoryview) -> None:
    """Copy the plan's reads ``members`` out of ``src`` (file bytes starting at ``gs``)."""
    for s0, ln, d in zip(
        plan.start[members].tolist(), plan.length[members].tolist(), plan.dest[members].tolist()
    ):
        view[d : d + ln] = src[s0 - gs : s0 - gs + ln]
