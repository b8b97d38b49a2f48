"""Storage faults on demand, for tests: an fsspec filesystem wrapper that, seeded, makes calls time out,
answer throttling (SlowDown) or a 5xx, reset the connection, or tear an upload.

Not part of dgbatch. A job's processes (driver, planning tasks, replicas on every node) pick it up
from the environment: `DGBATCH_TEST_FS_WRAPPER=tests.faults:wrap` makes `dgbatch.io.fs.filesystem` wrap
each raw filesystem in it (below dgbatch's retry layer), and `DGBATCH_FAULTS` (JSON, `FaultSpec`) says
what to inject, or `DGBATCH_FAULTS_FILE` names a file that does (the simulated cluster's nodes are
started with the hook on and that variable set; no file, no faults). Each injected fault is appended to `FaultSpec.log` as one JSON line (pid, op, path,
kind), so a test can count them against what the job's summary reports.

Which calls fail is decided by a hash of (seed, op, path, n: how often this process made that call
before), not by timing, so a run's faults are reproducible and a retry rolls again. Faults are raised
as s3fs raises the real ones: SlowDown as OSError(EBUSY), InternalError as OSError(EREMOTEIO), a read
timeout as fsspec's FSTimeoutError, a reset as ConnectionResetError. A torn upload of a replacing write
leaves the first half of the bytes in place (a partial object / file) and then resets; a torn exclusive
create either leaves nothing or, half the time, the whole object with its response lost, which is how
a real conditional PUT tears. With `down_file` set, every call fails (connection refused) while that
file exists: a store that is down for good, until the test says otherwise.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field

from fsspec.exceptions import FSTimeoutError

ENV = "DGBATCH_FAULTS"
ENV_FILE = "DGBATCH_FAULTS_FILE"  # or: a file holding that JSON (for processes started before the test)
WRAPPER = "tests.faults:wrap"
KINDS = ("timeout", "throttled", "server_error", "connection", "torn")
FAULTED = frozenset({"info", "ls", "exists", "isfile", "isdir", "cat_file", "cat", "pipe_file", "rm", "rm_file",
                     "mv", "makedirs", "find", "glob", "open"})
WRITES = frozenset({"pipe_file"})


@dataclass
class FaultSpec:
    seed: int = 0
    rate: float = 0.0  # chance that one call fails
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    paths: str = ""  # regex: only calls on matching paths fail ("": all)
    log: str = ""  # where each fault is appended as a JSON line
    down_file: str = ""  # while this file exists, every call on a matching path fails (store down)
    max_per_call: int = 0  # at most this many faults for one (op, path) in a process (0: no limit)

    def env(self) -> dict[str, str]:
        """The environment that turns these faults on in every process of a job."""
        return {"DGBATCH_TEST_FS_WRAPPER": WRAPPER, ENV: json.dumps(asdict(self))}


def wrap(fs):
    """The DGBATCH_TEST_FS_WRAPPER hook: `fs` with the faults of $DGBATCH_FAULTS, or of the file that
    $DGBATCH_FAULTS_FILE names (a simulated cluster's nodes start before any test writes it)."""
    raw = os.environ.get(ENV)
    if not raw and os.environ.get(ENV_FILE):
        try:
            with open(os.environ[ENV_FILE]) as f:
                raw = f.read()
        except FileNotFoundError:
            raw = None
    if not raw:
        return fs
    spec = FaultSpec(**json.loads(raw))
    _log_drains(spec.log)
    return FaultyFileSystem(fs, spec)


def _log_drains(log: str) -> None:
    """Log each `dgbatch.io.retry.drain` too (the retries it hands on to the driver), so a test can tell
    the faults a process reported from those it took with it when it was killed."""
    from dgbatch.io import retry

    if not log or getattr(retry.drain, "logged_to", None) == log:
        return
    real = getattr(retry.drain, "real", retry.drain)

    def drain() -> dict[str, int]:
        out = real()
        _append(log, {"pid": os.getpid(), "drained": sum(out.get(k, 0) for k in retry.KINDS)})
        return out

    drain.real, drain.logged_to = real, log
    retry.drain = drain


def _fault(kind: str, op: str, path: str) -> Exception:
    if kind == "timeout":
        return FSTimeoutError(f"injected: read timeout on {op} {path}")
    if kind == "throttled":
        return OSError(errno.EBUSY, f"Please reduce your request rate. (SlowDown, injected on {op})")
    if kind == "server_error":
        return OSError(errno.EREMOTEIO, f"We encountered an internal error. (InternalError, injected on {op})")
    if kind == "down":
        return ConnectionRefusedError(errno.ECONNREFUSED, f"Connection refused (injected: store down) on {op}")
    return ConnectionResetError(errno.ECONNRESET, f"Connection reset by peer (injected on {op})")


class FaultyFileSystem:
    """`inner`, with the calls in FAULTED failing as `spec` says; everything else passes through."""

    def __init__(self, inner, spec: FaultSpec):
        self.inner, self.spec = inner, spec
        self.seen: Counter[tuple[str, str]] = Counter()  # calls per (op, path)
        self.faulted: Counter[tuple[str, str]] = Counter()  # faults per (op, path)
        self.lock = threading.Lock()
        self.paths = re.compile(spec.paths) if spec.paths else None

    def __getattr__(self, name: str):
        attr = getattr(self.inner, name)
        if name in FAULTED and callable(attr):
            return lambda *args, **kwargs: self._call(name, attr, args, kwargs)
        return attr

    def pipe_file(self, path, value, mode: str = "overwrite", **kwargs):
        return self._call("pipe_file", self.inner.pipe_file, (path, value), {"mode": mode, **kwargs})

    def open(self, path, mode: str = "rb", *args, **kwargs):
        return self._call("open", self.inner.open, (path, mode, *args), kwargs)

    def _roll(self, op: str, path: str) -> str | None:
        """The fault this call gets, or None."""
        if self.paths is not None and not self.paths.search(path):
            return None
        if self.spec.down_file and os.path.exists(self.spec.down_file):
            return "down"
        if self.spec.rate <= 0:
            return None
        with self.lock:
            n = self.seen[(op, path)]
            self.seen[(op, path)] += 1
            if self.spec.max_per_call and self.faulted[(op, path)] >= self.spec.max_per_call:
                return None
            h = hashlib.sha256(f"{self.spec.seed}|{op}|{path}|{n}".encode()).digest()
            if int.from_bytes(h[:8], "big") / 2**64 >= self.spec.rate:
                return None
            self.faulted[(op, path)] += 1
        kinds = [k for k in self.spec.kinds if k != "torn" or op in WRITES] or ["connection"]
        return kinds[h[8] % len(kinds)]

    def _call(self, op: str, fn, args: tuple, kwargs: dict):
        path = str(args[0] if args else kwargs.get("path", ""))
        kind = self._roll(op, path)
        if kind is None:
            return fn(*args, **kwargs)
        self._log(op, path, kind)
        if kind == "torn":
            data = args[1]
            if kwargs.get("mode") == "create":
                if hashlib.sha256(data).digest()[0] % 2:  # the PUT landed, its response did not
                    fn(*args, **kwargs)
            else:
                fn(args[0], data[: len(data) // 2], **kwargs)  # half an object, then the reset
        raise _fault(kind, op, path)

    def _log(self, op: str, path: str, kind: str) -> None:
        if self.spec.log:
            _append(self.spec.log, {"pid": os.getpid(), "op": op, "path": path, "kind": kind})


def _append(log: str, entry: dict) -> None:
    with open(log, "a") as f:  # one short O_APPEND write per line: processes do not interleave
        f.write(json.dumps(entry) + "\n")


def reported(entries: list[dict]) -> tuple[list[dict], list[dict]]:
    """(faults whose retries their process handed on with a drain, faults after its last drain): in a
    process that was killed, the second are retries nobody could report."""
    last: dict[int, int] = {}
    for i, e in enumerate(entries):
        if "drained" in e:
            last[e["pid"]] = i
    faults = [(i, e) for i, e in enumerate(entries) if "kind" in e]
    return ([e for i, e in faults if i < last.get(e["pid"], -1)], [e for i, e in faults if i > last.get(e["pid"], -1)])


def read_log(path) -> list[dict]:
    """What a job's processes logged: one dict per fault ({pid, op, path, kind}), and one per drain of
    their retry counts ({pid, drained})."""
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
