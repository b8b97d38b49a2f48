"""Storage calls tried again: the one place where dgbatch retries storage.

`filesystem()` (io/fs.py) hands out every filesystem wrapped in `RetryingFileSystem`, so each call any
part of dgbatch makes on storage (a listing, a GET, a PUT, an exclusive create) goes through `call`: a
transient error (a timeout; throttling, SlowDown or 503; another 5xx; a connection reset or refused; a
transfer torn mid-body) is tried again after an exponential, fully jittered wait, at most
`storage.retries` times and for at most `storage.retry_max_s` seconds after the first failure. Then
the call raises `StorageUnavailable`, a job-level error: the driver stops handing out shards (nothing
more is generated into a commit that cannot happen), committed shards stay, a rerun resumes.

What is retried is one call, and each call is idempotent on its own (a replace-PUT, a GET, a listing),
except an exclusive create: retried after its response was lost, it can meet the object its own
earlier attempt created. That object is recognised by its bytes and the create counts as done, so a
shard is still committed exactly once. Errors that say something about the request (not found, exists,
denied, no space, read-only) are never retried.

Every retry is counted by kind (`drain`): replicas hand their counts to the driver with each shard's
result, and the driver adds its own; `_summary.json` reports them under `retries`.
"""

from __future__ import annotations

import errno
import functools
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from dgbatch.errors import one_line

log = logging.getLogger(__name__)

KINDS = ("timeout", "throttled", "server_error", "connection")  # what a retried error was
BASE_WAIT_S = 0.25  # the first wait is uniform in [0, 0.25 s], then doubling
MAX_WAIT_S = 15.0  # one wait, at most

_THROTTLED = ("SlowDown", "reduce your request rate", "Throttl", "TooManyRequests", "RequestLimitExceeded",
              "ServiceUnavailable", "Service Unavailable", "(503)", " 503")
_SERVER = ("InternalError", "Internal Server Error", "Bad Gateway", "Gateway Timeout", "(500)", "(502)", "(504)",
           " 500", " 502", " 504")
_CONNECTION_TYPES = {"EndpointConnectionError", "ConnectionClosedError", "IncompleteRead", "ResponseStreamingError",
                     "ClientPayloadError", "ServerDisconnectedError", "ClientConnectionError", "ProtocolError",
                     "RemoteDisconnected"}
_CONNECTION_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT}
_REMOTE_TYPES = {"ClientError", "BotoCoreError"}  # botocore's: their text is the server's answer


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 6
    max_s: float = 60.0

    @staticmethod
    def of(storage) -> RetryPolicy:
        """The policy of a `StorageSection` (None: the defaults)."""
        if storage is None:
            return RetryPolicy()
        return RetryPolicy(storage.retries, storage.retry_max_s)


def kind_of(err: BaseException) -> str | None:
    """Which transient kind `err` is ("timeout", "throttled", "server_error", "connection"), or None: not
    worth another try (not found, exists, denied, no space, read-only, a precondition, anything unknown).
    s3fs turns botocore's errors into OSErrors (SlowDown and 503: EBUSY; 500: EREMOTEIO; others: EIO
    with the server's message) and keeps botocore's as the cause."""
    from dgbatch.errors import JobError

    if isinstance(err, (JobError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                        NotADirectoryError)):
        return None
    chain = [err] + ([err.__cause__] if err.__cause__ is not None else [])
    names = {c.__name__ for e in chain for c in type(e).__mro__}
    code = getattr(err, "errno", None)
    if isinstance(err, TimeoutError) or any("Timeout" in n for n in names) or code == errno.ETIMEDOUT:
        return "timeout"
    if code == errno.EBUSY:
        return "throttled"
    if code == errno.EREMOTEIO:
        return "server_error"
    if isinstance(err, ConnectionError) or names & _CONNECTION_TYPES or code in _CONNECTION_ERRNOS:
        return "connection"
    if not names & _REMOTE_TYPES:  # a local error's text is no server's answer (it may hold a path)
        return None
    text = " ".join(str(e) for e in chain)
    if any(t in text for t in _THROTTLED):
        return "throttled"
    if any(t in text for t in _SERVER):
        return "server_error"
    return None


_counts: Counter[str] = Counter()
_lock = threading.Lock()


def count(kind: str, n: int = 1) -> None:
    with _lock:
        _counts[kind] += n


def drain() -> dict[str, int]:
    """This process's retry counts since the last drain (kind -> retries; "own_object": exclusive creates
    that met their own earlier attempt's object; "gave_up": calls that ran out of retries)."""
    with _lock:
        out = dict(_counts)
        _counts.clear()
    return out


def _wait_s(retry: int) -> float:
    """Full jitter: uniform in [0, min(MAX_WAIT_S, BASE_WAIT_S * 2**retry)]."""
    return random.uniform(0.0, min(MAX_WAIT_S, BASE_WAIT_S * 2**retry))


def call(policy: RetryPolicy, what: str, fn, *args, **kwargs) -> Any:
    """`fn(*args, **kwargs)`, tried again on transient errors under `policy`; `what` names the call for
    the one line `StorageUnavailable` says (e.g. "pipe_file s3://bucket/out/data/x.parquet")."""
    retries, first = 0, None
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            kind = kind_of(e)
            if kind is None:
                raise
            now = time.monotonic()
            first = now if first is None else first
            elapsed = now - first
            if retries >= policy.retries or elapsed >= policy.max_s:
                count("gave_up")
                from dgbatch.io.fs import StorageUnavailable

                brief = one_line(f"{type(e).__name__}: {e}", 300)
                raise StorageUnavailable(
                    f"storage kept failing: {what} failed {retries + 1} time(s) over {elapsed:.0f} s "
                    f"(storage.retries={policy.retries}, storage.retry_max_s={policy.max_s:g}); last error: {brief}"
                ) from None
            retries += 1
            count(kind)
            wait = min(_wait_s(retries - 1), max(policy.max_s - elapsed, 0.0))
            log.debug("storage %s: %s (%s); retry %d in %.2f s", kind, what, type(e).__name__, retries, wait)
            time.sleep(wait)


# What is retried: every call that reaches the store. Anything else (protocol, _strip_protocol,
# invalidate_cache, a file object's reads) passes straight through.
RETRIED = frozenset({
    "info", "ls", "exists", "isfile", "isdir", "cat_file", "cat", "pipe", "rm", "rm_file", "mv", "copy",
    "makedirs", "mkdir", "glob", "find", "get", "get_file", "put_file", "size", "modified", "touch", "du",
    "checksum", "ukey", "head", "tail", "read_bytes",
})  # fmt: skip


class RetryingFileSystem:
    """`inner` with every storage call retried under `policy` (see the module docstring). Attributes and
    methods are the inner filesystem's; `open` is retried for reading (writes open once)."""

    def __init__(self, inner, policy: RetryPolicy):
        self.inner = inner
        self.policy = policy

    def __getattr__(self, name: str):
        attr = getattr(self.inner, name)
        if name in RETRIED and callable(attr):
            return functools.partial(self._call, name, attr)
        return attr

    def __repr__(self) -> str:
        return f"RetryingFileSystem({type(self.inner).__name__}, retries={self.policy.retries})"

    def _call(self, name: str, fn, *args, **kwargs):
        path = args[0] if args else kwargs.get("path", "")
        return call(self.policy, f"{name} {_label(path)}", fn, *args, **kwargs)

    def open(self, path, mode: str = "rb", *args, **kwargs):
        if "r" in mode and "+" not in mode:
            return call(self.policy, f"open {_label(path)}", self.inner.open, path, mode, *args, **kwargs)
        return self.inner.open(path, mode, *args, **kwargs)

    def pipe_file(self, path, value, mode: str = "overwrite", **kwargs):
        if mode != "create":
            return call(self.policy, f"pipe_file {_label(path)}", self.inner.pipe_file, path, value, **kwargs)
        attempts = [0]

        def create_once():
            attempts[0] += 1
            try:
                return self.inner.pipe_file(path, value, mode="create", **kwargs)
            except OSError as e:
                exists = isinstance(e, FileExistsError) or getattr(e, "errno", None) == errno.EINVAL
                if attempts[0] > 1 and exists and self._holds(path, value):
                    count("own_object")  # an earlier attempt created it and its response was lost
                    log.info("exclusive create of %s met its own earlier attempt's object; counted as created",
                             _label(path))
                    return None
                raise

        return call(self.policy, f"create {_label(path)}", create_once)

    def _holds(self, path, value: bytes) -> bool:
        self.inner.invalidate_cache(path)
        try:
            return call(self.policy, f"cat_file {_label(path)}", self.inner.cat_file, path) == value
        except FileNotFoundError:
            return False


def _label(path) -> str:
    if isinstance(path, (list, tuple)):
        return f"{_label(path[0])} (+{len(path) - 1})" if path else "[]"
    return str(path)
