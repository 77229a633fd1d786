"""The one fetcher every read goes through.

Byte ranges are coalesced (adjacent rows become one request), issued concurrently with a bounded
number in flight, and written straight into the caller's preallocated buffer: ``os.preadv`` for
local files and cached blocks, one copy from the response for remote reads. Transient errors are
retried with backoff; the final error names the table, chunk and byte range. Remote files are
cached on local disk in blocks (size-bounded, opt-out). Thread pools and file descriptors are
created lazily per process, so a Fetcher survives pickling and fork.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import FetchError
from ..storage import Store
from .cache import BlockCache, CacheOptions
from .ranges import Groups, Read, ReadPlan, coalesce_plan
from .retry import RetryPolicy, call_with_retry

__all__ = ["FetchOptions", "Fetcher", "Read", "ReadPlan"]

_IOV_MAX = 1024


@dataclass(frozen=True)
class FetchOptions:
    """How reads are issued. ``None`` picks a default suited to local or remote storage."""

    max_in_flight: int = 16
    max_gap: int | None = None
    max_request: int | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"FetchOptions.max_in_flight must be >= 1, got {self.max_in_flight}")


class Fetcher:
    """Reads byte ranges of one table's files into caller-owned buffers."""

    def __init__(
        self,
        store: Store,
        label: str,
        options: FetchOptions | None = None,
        cache: CacheOptions | bool | str | None = None,
        sizes: Mapping[str, int] | None = None,
    ) -> None:
        self.store = store
        self.label = label
        self.options = options or FetchOptions()
        self.cache_options = CacheOptions.coerce(cache)
        self.sizes: dict[str, int] = dict(sizes or {})
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
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._inflight: dict[tuple[str, int], Future] = {}
        self.stats = {"requests": 0, "bytes": 0, "retries": 0, "cache_hits": 0, "cache_misses": 0}

    def __getstate__(self):
        return {
            "store": self.store,
            "label": self.label,
            "options": self.options,
            "cache": self.cache_options,
            "sizes": self.sizes,
        }

    def __setstate__(self, state):
        self.__init__(
            state["store"], state["label"], state["options"], state["cache"], state["sizes"]
        )

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            # After fork: the parent's threads do not exist here and its fds are shared; start over.
            self._reset()

    def _executor(self) -> ThreadPoolExecutor:
        self._check_pid()
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        max_workers=self.options.max_in_flight, thread_name_prefix="gpuload-fetch"
                    )
        return self._pool

    def close(self) -> None:
        """Release threads and file descriptors (they are recreated on next use)."""
        if self._pid != os.getpid():
            self._reset()
            return
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None and getattr(self, "_pid", None) == os.getpid():
            pool.shutdown(wait=False)
        fds = getattr(self, "_fds", None)
        if fds and getattr(self, "_pid", None) == os.getpid():
            for fd in fds.values():
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

    def read_into(self, reads: Sequence[Read] | ReadPlan, out) -> None:
        """Fill ``out`` (a writable buffer) from the given reads. Returns when every read landed."""
        self._check_pid()
        plan = reads if isinstance(reads, ReadPlan) else ReadPlan.from_reads(reads)
        view = memoryview(out).cast("B")
        if len(plan) == 0:
            return
        if plan.dest.min() < 0 or int((plan.dest + plan.length).max()) > len(view):
            raise ValueError(f"reads do not fit the {len(view)}-byte output buffer")
        if self.store.is_local:
            self._read_local(plan, view)
        elif self.cache is not None:
            self._read_cached(plan, view)
        else:
            self._read_remote(plan, view)

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
        """Run callables concurrently (bounded by the pool); wait for all, then raise the first error."""
        if len(jobs) == 1:
            jobs[0]()
            return
        pool = self._executor()
        futures = [pool.submit(j) for j in jobs]
        first: BaseException | None = None
        for f in futures:
            try:
                f.result()
            except BaseException as e:  # noqa: BLE001 - collected, re-raised after all finish
                first = first or e
        if first is not None:
            raise first

    # -- local files -----------------------------------------------------------------------
    def _fd(self, file: str) -> int:
        """An open descriptor for a table file (LRU of 256, per process)."""
        with self._lock:
            fd = self._fds.get(file)
            if fd is not None:
                self._fds.move_to_end(file)
                return fd
        fd = os.open(self.store.path(file), os.O_RDONLY)
        with self._lock:
            old = self._fds.get(file)
            if old is not None:
                os.close(fd)
                return old
            self._fds[file] = fd
            while len(self._fds) > 256:
                _, victim = self._fds.popitem(last=False)
                os.close(victim)
        return fd

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
            except FetchError:
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
        except FetchError:
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
            buf = memoryview(bytearray(ge - gs))
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
        path = self.store.path(file)
        attempts = [0]

        def once() -> bytes:
            attempts[0] += 1
            data = self.store.fs.cat_file(path, start=start, end=end)
            if len(data) != end - start:
                raise FetchError(
                    f"short read in {self._where(file, start, end)}: got {len(data)} bytes"
                )
            return data

        try:
            data = call_with_retry(once, self.options.retry, lambda: self._where(file, start, end))
        except FetchError:
            raise
        except Exception as e:  # any storage error after retries becomes one clear FetchError
            raise self._fail(file, start, end, e) from e
        finally:
            self.stats["retries"] += max(0, attempts[0] - 1)
        self.stats["requests"] += 1
        self.stats["bytes"] += len(data)
        return data

    def _read_remote(self, plan: ReadPlan, view: memoryview) -> None:
        groups = coalesce_plan(plan, self.max_gap, self.max_request)

        def job(g: int) -> None:
            file = plan.files[int(groups.gfile[g])]
            gs = int(groups.gstart[g])
            src = memoryview(self._get(file, gs, int(groups.gend[g])))
            m = groups.members(g)
            for s0, ln, d in zip(
                plan.start[m].tolist(), plan.length[m].tolist(), plan.dest[m].tolist()
            ):
                view[d : d + ln] = src[s0 - gs : s0 - gs + ln]

        self._run_all([lambda g=g: job(g) for g in range(len(groups))])

    # -- remote, cached in blocks ----------------------------------------------------------
    def _read_cached(self, plan: ReadPlan, view: memoryview) -> None:
        bs = self.cache_options.block_bytes
        keep = plan.length > 0
        first = plan.start // bs
        last = (plan.end - 1) // bs
        needed: dict[str, set[int]] = {}
        for fi, b0, b1 in zip(plan.fidx[keep].tolist(), first[keep].tolist(), last[keep].tolist()):
            needed.setdefault(plan.files[fi], set()).update(range(b0, b1 + 1))
        self._ensure_blocks(needed)
        for fi, s0, ln, d in zip(
            plan.fidx.tolist(), plan.start.tolist(), plan.length.tolist(), plan.dest.tolist()
        ):
            file = plan.files[fi]
            pos, end = s0, s0 + ln
            while pos < end:
                b = pos // bs
                b_end = min(end, (b + 1) * bs)
                path = self.cache.lookup(file, b)
                if path is None:  # evicted between ensure and read (tiny cache): fetch it again
                    self._ensure_blocks({file: {b}})
                    path = self.cache.block_path(file, b)
                fd = os.open(path, os.O_RDONLY)
                try:
                    self._pread_exact(
                        fd, [view[d + (pos - s0) : d + (b_end - s0)]], pos - b * bs, file
                    )
                finally:
                    os.close(fd)
                pos = b_end

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
        self.stats["cache_misses"] += len(jobs)
        if jobs:
            self._run_all([lambda j=j: self._download(*j) for j in jobs])
        for fut in waits:
            fut.result()

    def _download(self, file: str, blocks: list[int], fut: Future) -> None:
        bs = self.cache_options.block_bytes
        start = blocks[0] * bs
        end = (blocks[-1] + 1) * bs
        size = self.sizes.get(file)
        if size is None:
            size = self.sizes[file] = self.store.size(file)
        end = min(end, size)
        try:
            if start >= end:
                raise FetchError(
                    f"{self._where(file, start, end)} lies past the end of the {size}-byte file"
                )
            data = memoryview(self._get(file, start, end))
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
