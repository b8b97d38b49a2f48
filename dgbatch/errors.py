"""One error path for job-level problems.

Anything that makes the whole job impossible as configured (a bad config value, an unreadable input,
a checkpoint that cannot be used, storage that refuses us, an output root that is not ours) raises a
`JobError` subclass wherever it is found. The CLI prints it as one line, scrubbed of secrets, and exits
2 (`EXIT_BAD_INPUT`); nothing heavy has started by then, or what started is stopped. Raise it with a
message that says what is wrong and what to do about it; never put a secret or a traceback in it.

A problem with one row is never a JobError: it becomes that row's error record.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_BAD_INPUT = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # stopped by Ctrl-C / SIGTERM: 128 + the signal, as shells report it


class JobError(Exception):
    """A job-level problem the user must fix: exit 2 with `line()`."""

    exit_code = EXIT_BAD_INPUT

    def line(self) -> str:
        """The message on one line (newlines and runs of spaces collapsed)."""
        return one_line(str(self))


def one_line(text: str, limit: int = 2000) -> str:
    """`text` as one line of at most `limit` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def root_cause(err: BaseException) -> BaseException:
    """The exception behind Ray's wrappers: a Ray task's own error travels as RayTaskError(...).cause."""
    for _ in range(8):
        inner = getattr(err, "cause", None)
        if inner is None or inner is err or not type(err).__module__.startswith("ray"):
            return err
        err = inner
    return err
