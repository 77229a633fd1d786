"""Where tables live: a local directory or any fsspec URL.

A Store holds only (url, storage_options) and builds its filesystem lazily in each process, so it
pickles cleanly and survives fork (a forked child never reuses the parent's sockets or loops).
Local paths bypass fsspec and use os.pread for speed.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import threading
import uuid
from collections.abc import Mapping
from typing import Any

from .errors import FormatError, MissingDependencyError

__all__ = ["Store", "join_url", "is_local_url"]

# Protocol -> pip extra that provides it (an install hint when the backend is missing).
_PROTOCOL_HINTS = {
    "s3": "s3fs (pip install 'gpuload[s3]')",
    "s3a": "s3fs (pip install 'gpuload[s3]')",
    "gs": "gcsfs (pip install 'gpuload[gcs]')",
    "gcs": "gcsfs (pip install 'gpuload[gcs]')",
    "http": "aiohttp (pip install 'gpuload[http]')",
    "https": "aiohttp (pip install 'gpuload[http]')",
}


def split_protocol(url: str) -> tuple[str, str]:
    """("s3", "bucket/path") for "s3://bucket/path"; ("file", abs path) for local paths."""
    if "://" in url:
        proto, rest = url.split("://", 1)
        proto = proto.lower()
        if proto == "file":
            return "file", os.path.abspath(rest)
        if proto in ("http", "https"):
            return proto, url  # fsspec's HTTP filesystem addresses files by full URL
        return proto, rest
    return "file", os.path.abspath(os.path.expanduser(url))


def is_local_url(url: str) -> bool:
    return split_protocol(url)[0] == "file"


def join_url(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URL, with '/' separators for URLs."""
    proto, _ = split_protocol(base)
    if proto == "file" and "://" not in base:
        return os.path.join(base, *parts)
    return posixpath.join(base.rstrip("/"), *parts)


class Store:
    """Byte-level access to one table directory (local or remote). Picklable and fork-safe."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.protocol, self.root = split_protocol(url)
        self._fs = None
        self._pid = -1
        self._lock = threading.Lock()

    # -- pickling: drop live handles --------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def fs(self):
        """The fsspec filesystem, created lazily per process (reset after fork)."""
        pid = os.getpid()
        if self._fs is None or self._pid != pid:
            with self._lock:
                if self._fs is None or self._pid != pid:
                    self._fs = self._make_fs()
                    self._pid = pid
        return self._fs

    def _make_fs(self):
        import fsspec

        try:
            return fsspec.filesystem(
                self.protocol, skip_instance_cache=True, **self.storage_options
            )
        except (ImportError, ValueError) as e:
            hint = _PROTOCOL_HINTS.get(self.protocol)
            if hint and ("install" in str(e).lower() or isinstance(e, ImportError)):
                raise MissingDependencyError(
                    f"reading {self.protocol}:// URLs needs {hint}: {e}"
                ) from e
            raise

    def path(self, rel: str) -> str:
        """Absolute path (local) or protocol-less path (remote) of a file inside the store."""
        check_relpath(rel)
        if self.is_local:
            return os.path.join(self.root, *rel.split("/"))
        return posixpath.join(self.root.rstrip("/"), rel) if self.root else rel

    def url_of(self, rel: str) -> str:
        return join_url(self.url, rel)

    # -- reads -----------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        if self.is_local:
            with open(self.path(rel), "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path(rel))

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file."""
        if self.is_local:
            fd = os.open(self.path(rel), os.O_RDONLY)
            try:
                return os.pread(fd, end - start, start)
            finally:
                os.close(fd)
        return self.fs.cat_file(self.path(rel), start=start, end=end)

    def exists(self, rel: str) -> bool:
        if self.is_local:
            return os.path.exists(self.path(rel))
        return self.fs.exists(self.path(rel))

    def size(self, rel: str) -> int:
        if self.is_local:
            return os.path.getsize(self.path(rel))
        return int(self.fs.size(self.path(rel)))

    def listdir(self, rel: str = "") -> list[str]:
        """Names of the entries directly under a folder of the store ([] when absent)."""
        if self.is_local:
            p = self.path(rel) if rel else self.root
            try:
                return sorted(os.listdir(p))
            except FileNotFoundError:
                return []
        p = self.path(rel) if rel else self.root
        try:
            entries = self.fs.ls(p, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def list_files(self, rel: str = "") -> list[tuple[str, int, float | None]]:
        """(name, size, modification time in epoch seconds or None when the store does not say)
        of the files directly under a folder of the store ([] when absent)."""
        if self.is_local:
            p = self.path(rel) if rel else self.root
            out = []
            try:
                with os.scandir(p) as it:
                    for e in it:
                        if e.is_file(follow_symlinks=False):
                            st = e.stat(follow_symlinks=False)
                            out.append((e.name, st.st_size, st.st_mtime))
            except FileNotFoundError:
                return []
            return sorted(out)
        p = self.path(rel) if rel else self.root
        self.fs.invalidate_cache(p)  # listings are cached per instance; another process may write
        try:
            entries = self.fs.ls(p, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            if e.get("type", "file") != "file":
                continue
            name = posixpath.basename(str(e["name"]).rstrip("/"))
            out.append((name, int(e.get("size") or 0), _mtime_of(e)))
        return sorted(out)

    # -- writes ----------------------------------------------------------------------------
    def write_atomic(self, rel: str, data: bytes) -> None:
        """Publish a whole file in one atomic step (rename locally; a single PUT remotely)."""
        if self.is_local:
            p = self.path(rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            tmp = f"{p}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, p)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            _fsync_dir(os.path.dirname(p))
            return
        self.fs.pipe_file(self.path(rel), data)

    def write_new(self, rel: str, parts: list) -> int:
        """Write a new immutable file from buffers; returns its size. Not visible to readers
        until a manifest that names it is committed."""
        if self.is_local:
            p = self.path(rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            n = 0
            with open(p, "wb") as f:
                for part in parts:
                    n += f.write(part)
                f.flush()
                os.fsync(f.fileno())
            return n
        data = b"".join(bytes(p) if not isinstance(p, bytes) else p for p in parts)
        self.fs.pipe_file(self.path(rel), data)
        return len(data)

    def makedirs(self, rel: str = "") -> None:
        # Object stores have no directories: files appear with their keys.
        if self.is_local:
            os.makedirs(self.path(rel) if rel else self.root, exist_ok=True)
        elif self.protocol in ("memory", "ftp", "sftp", "smb"):
            self.fs.makedirs(self.path(rel) if rel else self.root, exist_ok=True)

    def remove(self, rel: str) -> None:
        """Delete a file; a file that is already gone is fine."""
        with contextlib.suppress(FileNotFoundError):
            if self.is_local:
                os.unlink(self.path(rel))
            else:
                self.fs.rm_file(self.path(rel))

    def remove_tree(self) -> None:
        """Delete the whole store directory."""
        if self.is_local:
            import shutil

            shutil.rmtree(self.root, ignore_errors=False)
            return
        self.fs.rm(self.root, recursive=True)


def _mtime_of(info: Mapping[str, Any]) -> float | None:
    """Modification time of an fsspec ``info`` dict (local: mtime; S3: LastModified; GCS:
    updated; memory: created), or None."""
    import datetime as _dt

    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, _dt.datetime):
            if v.tzinfo is None:
                v = v.replace(tzinfo=_dt.timezone.utc)
            return v.timestamp()
        if isinstance(v, str):
            try:
                d = _dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                continue
            if d.tzinfo is None:
                d = d.replace(tzinfo=_dt.timezone.utc)
            return d.timestamp()
    return None


def check_relpath(rel: str) -> str:
    """Refuse paths that could leave the table root (absolute, '..', backslashes, empty parts)."""
    if (
        not isinstance(rel, str)
        or not rel
        or rel.startswith("/")
        or "\\" in rel
        or "\x00" in rel
        or any(part in ("", ".", "..") for part in rel.split("/"))
        or "://" in rel
    ):
        raise FormatError(f"refusing path {rel!r}: it would leave the table root")
    return rel


def _fsync_dir(path: str) -> None:
    # Make the rename durable; some filesystems refuse fsync on a directory, which is harmless.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
