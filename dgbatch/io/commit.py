"""Exactly-once file creation on fsspec filesystems: the primitive behind shard commits.

A committed file appears whole or not at all, and of several writers racing for one path exactly one
wins. Local: write a hidden temp file, fsync, hard-link it into place (link() refuses an existing
target). S3: one PUT with `If-None-Match: *`. Other filesystems: exists-then-write, best effort.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

_NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}  # link() unsupported here
_warned: set[str] = set()


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return "s3" in _protocols(fs)


def put_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create `path` holding exactly `data` unless it exists. True: this call created it; False: it existed.

    On S3, if botocore retries our PUT after losing its response, the retry can meet our own object
    and return False; callers that must tell the cases apart can put an attempt id in `data`.
    """
    if isinstance(fs, LocalFileSystem):
        return _put_exclusive_local(Path(path), data)
    if _is_s3(fs):
        return _put_exclusive_s3(fs, path, data)
    name = _protocols(fs)[0]
    if name not in _warned:
        _warned.add(name)
        log.warning("exactly-once commits are best-effort on %s:// (exists check, then write)", name)
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True


def _put_exclusive_s3(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    # pipe_file(mode="create") is one conditional PUT below 100 MB (a conditional multipart complete
    # above). Not open("xb"): s3fs commits an empty "xb" file with an unconditional touch().
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except OSError as e:
        # s3fs maps PreconditionFailed to OSError(EINVAL), like many other errors: confirm the key exists.
        if isinstance(e, FileExistsError) or e.errno == errno.EINVAL:
            fs.invalidate_cache(path)
            if fs.exists(path):
                return False
        raise


def _put_exclusive_local(final: Path, data: bytes) -> bool:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_tmp(final, data)
    try:
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in _NO_LINK:
                raise
            if not _rename_noreplace(tmp, final):
                return False
        _fsync_dir(final.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _write_tmp(final: Path, data: bytes) -> Path:
    """A hidden, fsynced sibling of `final` holding `data` (same directory, so link/rename stay atomic)."""
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Linux renameat2(RENAME_NOREPLACE): atomic and refuses an existing `dst`; for filesystems without link()."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "neither link() nor renameat2() is available: cannot create files exclusively")
    at_fdcwd, rename_noreplace = -100, 1
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _fsync_dir(directory: Path) -> None:
    """Make the new directory entry durable, not only the file's bytes."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    """Write `obj` as JSON at `path`, replacing any old file atomically: readers see old or new, whole."""
    write_bytes(fs, path, (json.dumps(obj, indent=2) + "\n").encode())


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` at `path`, replacing any old file atomically: readers see old or new, whole."""
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)  # one PUT on S3: atomic
        return
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_tmp(final, data)
    try:
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(final.parent)


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any | None:
    """The JSON value at `path`, or None if there is no such file."""
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def list_names(fs: fsspec.AbstractFileSystem, dir_path: str, suffix: str) -> list[str]:
    """Sorted base names of the files directly under `dir_path` ending in `suffix`; [] if it is missing.

    One listing (paged on S3), no contents read. Hidden names (in-flight temp files) are skipped.
    """
    fs.invalidate_cache(dir_path)  # another process may have committed since our last listing
    try:
        entries = fs.ls(dir_path, detail=True)
    except FileNotFoundError:
        return []
    names = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "file")
    return sorted(n for n in names if n.endswith(suffix) and not n.startswith("."))


def list_mtimes(fs: fsspec.AbstractFileSystem, dir_path: str, suffix: str) -> dict[str, float]:
    """Base name -> modification time (Unix seconds) of the files directly under `dir_path` ending in
    `suffix` (hidden names skipped), from one listing. A data file's time is when it was committed."""
    fs.invalidate_cache(dir_path)
    try:
        entries = fs.ls(dir_path, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e["type"] != "file" or not name.endswith(suffix) or name.startswith("."):
            continue
        t = e.get("mtime", e.get("LastModified", e.get("last_modified")))
        out[name] = t.timestamp() if hasattr(t, "timestamp") else float(t or 0.0)
    return out
