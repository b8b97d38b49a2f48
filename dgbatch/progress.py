"""The driver's progress: what a running job has done (rows, shards, output tokens, speed, ETA), shown.

`JobProgress` is the state: rows count as they finish inside a shard (replicas report them about
once a second), not only when their shard commits. Speed is over the last `RATE_WINDOW_S` (start-up
and model loading left out), so the ETA follows the job as it is now.

It is shown one of two ways (`display`): a rich progress bar when stdout is a terminal; otherwise
one plain line every few seconds, with no cursor movement, colour or carriage return, so the log of
a `ray job submit` (a file: `ray job logs --follow`) reads line by line.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field

RATE_WINDOW_S = 60.0


def fmt_duration(s: float | None) -> str:
    """12s, 3m05s, 2h07m; '?' when unknown."""
    if s is None:
        return "?"
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass
class JobProgress:
    rows_total: int
    shards_total: int
    rows_committed: int = 0  # rows of committed shards, earlier runs' included
    shards_done: int = 0  # committed shards, earlier runs' included
    shards_failed: int = 0
    shards_in_flight: int = 0
    tokens_committed: int = 0  # output tokens of the shards this run committed
    started_at: float = field(default_factory=time.time)
    in_flight: dict[str, tuple[int, int]] = field(default_factory=dict)  # shard -> (rows, tokens) finished
    _base_rows: int | None = None  # rows committed before this run
    _samples: deque = field(default_factory=deque)  # (time, rows done, tokens done)

    def __post_init__(self) -> None:
        if self._base_rows is None:
            self._base_rows = self.rows_committed

    # ---- what happens ---------------------------------------------------------------------------

    def committed(self, shard: str, stats: dict) -> None:
        self.in_flight.pop(shard, None)
        self.rows_committed += stats["rows"]
        self.tokens_committed += stats["output_tokens"]
        self.shards_done += 1

    def running(self, shard: str, rows: int, tokens: int) -> None:
        """Rows (and their output tokens) of a shard in flight finished so far (0: lost or committed)."""
        if rows:
            self.in_flight[shard] = (rows, tokens)
        else:
            self.in_flight.pop(shard, None)

    # ---- what it adds up to ---------------------------------------------------------------------

    @property
    def rows_done(self) -> int:
        return self.rows_committed + sum(r for r, _ in self.in_flight.values())

    @property
    def output_tokens(self) -> int:
        """Generated in this run, rows inside shards included."""
        return self.tokens_committed + sum(t for _, t in self.in_flight.values())

    def sample(self, now: float | None = None) -> None:
        """Take a reading for the rates (the driver does, every round)."""
        now = time.time() if now is None else now
        s = self._samples
        s.append((now, self.rows_done, self.output_tokens))
        # keep the last reading before any row finished (the rates start there) or before the window
        while len(s) >= 2 and (s[1][0] <= now - RATE_WINDOW_S or s[1][1] <= self._base_rows):
            s.popleft()

    def rates(self) -> tuple[float | None, float | None]:
        """(rows/s, output tokens/s) over the recent window; None before a row has finished."""
        if len(self._samples) < 2:
            return None, None
        (t0, r0, k0), (t1, r1, k1) = self._samples[0], self._samples[-1]
        if t1 <= t0 or r1 <= self._base_rows:
            return None, None
        return max(r1 - r0, 0) / (t1 - t0), max(k1 - k0, 0) / (t1 - t0)

    def eta_s(self) -> float | None:
        rows_per_s, _ = self.rates()
        if not rows_per_s:
            return None
        return max(self.rows_total - self.rows_done, 0) / rows_per_s

    def line(self) -> str:
        """The progress in one plain line."""
        rows_per_s, tokens_per_s = self.rates()
        done = self.rows_done
        pct = 100 * done / max(self.rows_total, 1)
        speed = "? rows/s | ? output tok/s" if rows_per_s is None else \
            f"{rows_per_s:,.1f} rows/s | {tokens_per_s:,.0f} output tok/s"
        return (f"rows {done:,}/{self.rows_total:,} ({pct:.1f}%) | {self.shards_text()} | {speed} | "
                f"ETA {fmt_duration(self.eta_s())}")

    def shards_text(self) -> str:
        return (f"shards {self.shards_done:,}/{self.shards_total:,} done, {self.shards_in_flight} in flight, "
                f"{self.shards_failed} failed")


class LineDisplay:
    """One plain line every `every_s` (and a last one at the end)."""

    def __init__(self, every_s: float, out=None):
        self.every_s = every_s
        self.out = out or sys.stdout
        self.last: float | None = None

    def update(self, p: JobProgress, now: float) -> None:
        if self.last is None or now - self.last >= self.every_s:
            self.last = now
            print(p.line(), file=self.out, flush=True)

    def close(self, p: JobProgress) -> None:
        print(p.line(), file=self.out, flush=True)


class BarDisplay:
    """A live rich progress bar on the terminal; what else the driver prints meanwhile goes above it."""

    def __init__(self, p: JobProgress, out=None):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        self.bar = Progress(
            TextColumn("rows"), BarColumn(), TaskProgressColumn(),
            TextColumn("{task.completed:,}/{task.total:,}"), TextColumn("{task.fields[shards]}"),
            TextColumn("{task.fields[speed]}"), TextColumn("ETA {task.fields[eta]}"),
            console=Console(file=out or sys.stdout), refresh_per_second=4,
        )  # fmt: skip
        self.task = self.bar.add_task("rows", total=p.rows_total, **self._fields(p))
        self.bar.start()

    @staticmethod
    def _fields(p: JobProgress) -> dict:
        rows_per_s, tokens_per_s = p.rates()
        speed = "? rows/s" if rows_per_s is None else f"{rows_per_s:,.1f} rows/s, {tokens_per_s:,.0f} tok/s"
        return {"completed": p.rows_done, "shards": p.shards_text(), "speed": speed, "eta": fmt_duration(p.eta_s())}

    def update(self, p: JobProgress, now: float) -> None:
        self.bar.update(self.task, **self._fields(p))

    def close(self, p: JobProgress) -> None:
        self.update(p, time.time())
        self.bar.stop()


def display(p: JobProgress, every_s: float, out=None) -> LineDisplay | BarDisplay:
    """A bar on a terminal, plain lines anywhere else (a pipe, a file, `ray job submit`'s log)."""
    out = out or sys.stdout
    isatty = getattr(out, "isatty", None)
    return BarDisplay(p, out) if isatty is not None and isatty() else LineDisplay(every_s, out)
