"""A size-bounded on-disk block cache for remote tables.

Chunk files are immutable and uniquely named, so a block of one (url, file, block index) never
goes stale. Blocks are written to a temporary name and renamed, so processes sharing the cache
(DataLoader workers, DDP ranks) never see a partial block. Eviction removes the least recently
used blocks (by mtime, refreshed on use) once the total passes the bound.

The bound holds for a table's cache directory (``<cache>/blocks/<hash of the table URL>``) as a
whole, across every process sharing it:

* Publishing a block (rename into place), accounting for it and evicting happen under an
  advisory ``fcntl.flock`` on ``<dir>/.lock``. The lock file is opened anew for each locked
  section, so the lock excludes other threads of this process as well as other processes, and
  no descriptor is kept that a forked child could inherit (nothing is created at import).
* A shared counter, ``<dir>/.total`` ("<bytes> <crc32>"), holds the bytes of ``.blk`` files. It is
  read and replaced (write + rename) under the lock, so a store does not scan the directory. It
  is rebuilt by a scan when missing or unparseable and on every eviction, and it is written
  before a block is renamed into place: a crash in between over-counts, never under-counts.
* A store first evicts (oldest mtime first, down to 90% of the bound) until the new block fits,
  then renames it into place, so the ``.blk`` total never exceeds ``max_bytes``. The only slack
  is the ``.tmp`` files of writes in flight: at most one block per concurrent writer.
* A block larger than ``max_bytes`` is not cached at all (``CacheOptions`` also refuses a
  ``block_bytes`` above ``max_bytes``, so the fetcher never produces one).
* Two writers publishing the same block count it once: the second finds it under the lock and
  drops its temporary file. Temporary files of crashed writers are removed by the eviction scan
  once older than an hour.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

__all__ = ["CacheOptions", "BlockCache", "default_cache_dir"]

log = logging.getLogger("gpuload.cache")

LOCK_NAME = ".lock"
COUNTER_NAME = ".total"
STALE_TMP_SECONDS = 3600.0  # a temporary file this old belongs to a writer that died
TOUCH_EVERY_SECONDS = 30.0  # lookup refreshes a block's mtime (its recency) at most this often
EVICT_TO = 0.9  # eviction frees down to this fraction of the bound, so it does not run every store


def default_cache_dir() -> str:
    env = os.environ.get("GPULOAD_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpuload")


@dataclass(frozen=True)
class CacheOptions:
    """Local disk cache of remote tables. ``enabled=None`` means on for remote, off for local."""

    enabled: bool | None = None
    directory: str | None = None
    max_bytes: int = 32 << 30
    block_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.block_bytes <= 0:
            raise ValueError("CacheOptions.max_bytes and block_bytes must be positive")
        if self.block_bytes > self.max_bytes:
            raise ValueError(
                f"CacheOptions.block_bytes ({self.block_bytes}) must not exceed max_bytes "
                f"({self.max_bytes}): a block larger than the whole cache is never kept"
            )

    @classmethod
    def coerce(cls, value: CacheOptions | bool | str | None) -> CacheOptions:
        """Accept CacheOptions, True/False/None, or a directory path."""
        if isinstance(value, CacheOptions):
            return value
        if value is None:
            return cls()
        if isinstance(value, bool):
            return cls(enabled=value)
        if isinstance(value, (str, os.PathLike)):
            return cls(enabled=True, directory=os.fspath(value))
        raise TypeError(
            f"cache must be CacheOptions, bool, a directory or None, not {type(value).__name__}"
        )


class BlockCache:
    """Blocks of remote files kept on local disk under a size bound shared by all processes."""

    def __init__(self, namespace: str, opts: CacheOptions) -> None:
        root = opts.directory or default_cache_dir()
        key = hashlib.sha256(namespace.encode()).hexdigest()[:24]
        self._setup(os.path.join(root, "blocks", key), opts)

    def _setup(self, directory: str, opts: CacheOptions) -> None:
        """Per-process state only: the lock and counter live in files, opened when used."""
        self.opts = opts
        self.dir = directory
        self._lock_path = os.path.join(directory, LOCK_NAME)
        self._counter_path = os.path.join(directory, COUNTER_NAME)
        self._touched: dict[str, float] = {}
        os.makedirs(directory, exist_ok=True)

    def __getstate__(self) -> dict[str, object]:
        return {"namespace_dir": self.dir, "opts": self.opts}

    def __setstate__(self, state: dict[str, object]) -> None:
        self._setup(str(state["namespace_dir"]), cast(CacheOptions, state["opts"]))

    def block_path(self, file: str, block: int) -> str:
        h = hashlib.sha1(file.encode()).hexdigest()[:20]
        return os.path.join(self.dir, f"{h}-{block:08d}.blk")

    def lookup(self, file: str, block: int) -> str | None:
        """Path of a cached block, refreshing its recency, or None."""
        p = self.block_path(file, block)
        if not os.path.exists(p):
            return None
        now = time.time()
        if now - self._touched.get(p, 0.0) > TOUCH_EVERY_SECONDS:
            self._touched[p] = now
            # evicted by another process meanwhile: it was still a hit a moment ago
            with contextlib.suppress(OSError):
                os.utime(p, (now, now))
        return p

    def store(self, file: str, block: int, data: bytes | memoryview) -> str:
        """Publish a block atomically, evicting old blocks first so the bound always holds.

        A block larger than ``max_bytes`` is not cached: the returned path then does not exist.
        """
        p = self.block_path(file, block)
        size = memoryview(data).nbytes
        if size > self.opts.max_bytes:
            log.warning("cache %s: a %d-byte block exceeds max_bytes; not cached", self.dir, size)
            return p
        tmp = f"{p}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:  # the slow part, outside the lock
                f.write(data)
            with self._locked():
                self._publish(tmp, p, size)
        except BaseException:
            with contextlib.suppress(OSError):  # best effort; the original error is what matters
                os.unlink(tmp)
            raise
        return p

    def discard(self, file: str, block: int) -> bool:
        """Remove one block (e.g. found corrupt by the caller); True if it was there."""
        p = self.block_path(file, block)
        self._touched.pop(p, None)
        with self._locked():
            try:
                size = os.stat(p).st_size
                os.unlink(p)
            except FileNotFoundError:
                return False
            total = self._read_total()
            if total is not None:  # a missing or bad counter stays so: the next store rescans
                self._write_total(max(0, total - size))
        return True

    def total_bytes(self) -> int:
        """Bytes of cached blocks on disk now (a directory scan, not the counter)."""
        return sum(size for _, size, _ in self._entries())

    def clear(self) -> None:
        """Remove every cached block; the lock file stays so concurrent users stay excluded."""
        self._touched.clear()
        with self._locked():
            for _, _, path in self._entries():
                with contextlib.suppress(FileNotFoundError):  # removed by hand meanwhile
                    os.unlink(path)
            self._remove_stale_tmp()
            self._write_total(0)

    # -- under the lock ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the directory's flock. A fresh open file description per call excludes threads
        too; re-lock if the lock file was replaced (directory removed by hand) while waiting."""
        while True:
            os.makedirs(self.dir, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if _same_file(fd, self._lock_path):
                    yield
                    return
            finally:
                os.close(fd)  # releases the flock

    def _publish(self, tmp: str, path: str, size: int) -> None:
        """Account for, make room for and rename one written block; the caller holds the lock."""
        if os.path.exists(path):  # another process or thread published it: count it once
            os.unlink(tmp)
            with contextlib.suppress(FileNotFoundError):  # removed by hand: still a valid store
                os.utime(path)
            return
        total = self._read_total()
        if total is None or total + size > self.opts.max_bytes:
            total = self._evict_for(size)
        self._write_total(total + size)  # first: a crash before the rename over-counts only
        os.replace(tmp, path)

    def _evict_for(self, size: int) -> int:
        """Scan (rebuilding the total); if ``size`` more would pass the bound, remove the least
        recently used blocks down to 90% of it. Returns the bytes of blocks left."""
        entries = sorted(self._entries())
        total = sum(sz for _, sz, _ in entries)
        self._remove_stale_tmp()
        if total + size <= self.opts.max_bytes:
            return total
        target = max(int(self.opts.max_bytes * EVICT_TO), size)
        for _, sz, path in entries:
            if total + size <= target:
                break
            with contextlib.suppress(FileNotFoundError):  # removed by hand: no longer counted
                os.unlink(path)
            total -= sz
            self._touched.pop(path, None)
        log.debug("cache %s evicted down to %d bytes", self.dir, total)
        return total

    def _remove_stale_tmp(self) -> None:
        """Delete temporary files left by writers that died (older than an hour)."""
        cutoff = time.time() - STALE_TMP_SECONDS
        with os.scandir(self.dir) as it:
            for e in it:
                if not e.name.endswith(".tmp"):
                    continue
                # FileNotFoundError: its writer renamed or removed it meanwhile
                with contextlib.suppress(FileNotFoundError):
                    if e.stat().st_mtime < cutoff:
                        os.unlink(e.path)

    def _read_total(self) -> int | None:
        """The shared counter, or None when missing or unparseable (the caller rescans)."""
        try:
            with open(self._counter_path, "rb") as f:
                text = f.read(64).decode("ascii")
        except (OSError, UnicodeDecodeError):
            return None
        parts = text.split()
        if len(parts) != 2 or not text.endswith("\n") or not parts[0].isdigit():
            return None
        if parts[1] != f"{zlib.crc32(parts[0].encode()):08x}":
            return None
        return int(parts[0])

    def _write_total(self, total: int) -> None:
        """Replace the shared counter atomically (write a temporary file, then rename)."""
        tmp = self._counter_path + ".tmp"
        digits = str(total)
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{digits} {zlib.crc32(digits.encode()):08x}\n")
        os.replace(tmp, self._counter_path)

    def _entries(self) -> list[tuple[float, int, str]]:
        """(mtime, size, path) of every cached block."""
        out = []
        with os.scandir(self.dir) as it:
            for e in it:
                if not e.name.endswith(".blk"):
                    continue
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                out.append((st.st_mtime, st.st_size, e.path))
        return out


def _same_file(fd: int, path: str) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not unlinked or replaced since opened)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)
