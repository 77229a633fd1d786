"""A size-bounded on-disk block cache for remote tables.

Chunk files are immutable and uniquely named, so a block of one (url, file, block index) never
goes stale. Blocks are written to a temporary name and renamed, so processes sharing the cache
(DataLoader workers, DDP ranks) never see a partial block. Eviction removes the least recently
used blocks (by mtime, refreshed on use) once the total passes the bound.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass

__all__ = ["CacheOptions", "BlockCache", "default_cache_dir"]

log = logging.getLogger("gpuload.cache")


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
    """Blocks of remote files kept on local disk under a size bound."""

    def __init__(self, namespace: str, opts: CacheOptions) -> None:
        self.opts = opts
        root = opts.directory or default_cache_dir()
        key = hashlib.sha256(namespace.encode()).hexdigest()[:24]
        self.dir = os.path.join(root, "blocks", key)
        os.makedirs(self.dir, exist_ok=True)
        self._lock = threading.Lock()
        self._total: int | None = None
        self._touched: dict[str, float] = {}

    def __getstate__(self):
        return {"namespace_dir": self.dir, "opts": self.opts}

    def __setstate__(self, state):
        self.opts = state["opts"]
        self.dir = state["namespace_dir"]
        os.makedirs(self.dir, exist_ok=True)
        self._lock = threading.Lock()
        self._total = None
        self._touched = {}

    def block_path(self, file: str, block: int) -> str:
        h = hashlib.sha1(file.encode()).hexdigest()[:20]
        return os.path.join(self.dir, f"{h}-{block:08d}.blk")

    def lookup(self, file: str, block: int) -> str | None:
        """Path of a cached block, refreshing its recency, or None."""
        p = self.block_path(file, block)
        if not os.path.exists(p):
            return None
        now = time.time()
        if now - self._touched.get(p, 0.0) > 30.0:
            self._touched[p] = now
            with contextlib.suppress(
                OSError
            ):  # evicted by another process meanwhile: still a hit now
                os.utime(p, (now, now))
        return p

    def store(self, file: str, block: int, data: bytes | memoryview) -> str:
        """Publish a block atomically and evict old blocks if over the bound."""
        p = self.block_path(file, block)
        tmp = f"{p}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
        self._account(len(data))
        return p

    def _account(self, added: int) -> None:
        with self._lock:
            if self._total is None:
                self._total = self._scan_total()
            self._total += added
            if self._total <= self.opts.max_bytes:
                return
            self._total = self._evict(int(self.opts.max_bytes * 0.9))

    def _entries(self) -> list[tuple[float, int, str]]:
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

    def _scan_total(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def _evict(self, target: int) -> int:
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= target:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                total -= size
                self._touched.pop(path, None)
        log.debug("cache %s evicted down to %d bytes", self.dir, total)
        return total

    def total_bytes(self) -> int:
        return self._scan_total()

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir, exist_ok=True)
        with self._lock:
            self._total = 0
