"""Keep credentials out of everything the job prints or writes.

Secrets reach the job through config fields typed `SecretStr` or the AWS environment. Their values
are collected once and scrubbed from every log record; messages the CLI prints pass through `scrub`.
"""

from __future__ import annotations

import logging
import os

from dgbatch.config import JobConfig

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
MASK = "***"
_secrets: set[str] = set()


def secrets_of(cfg: JobConfig | None) -> set[str]:
    found = {os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    if cfg is not None:
        for field in (cfg.storage.key, cfg.storage.secret):
            if field is not None and field.get_secret_value():
                found.add(field.get_secret_value())
    return {s for s in found if len(s) >= 4}  # a 1-3 character "secret" would mask ordinary text


def scrub(text: str) -> str:
    for s in sorted(_secrets, key=len, reverse=True):
        text = text.replace(s, MASK)
    return text


class _Scrubber(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets:
            msg = record.getMessage()
            clean = scrub(msg)
            if clean != msg or record.exc_info:
                record.msg, record.args = clean, None
                if record.exc_info:
                    import traceback

                    record.msg = clean + "\n" + scrub("".join(traceback.format_exception(*record.exc_info)))
                    record.exc_info = record.exc_text = None
        return True


def install(cfg: JobConfig | None) -> None:
    """Scrub this process's log records of the job's secrets (idempotent)."""
    _secrets.update(secrets_of(cfg))
    root = logging.getLogger()
    for target in [root, *root.handlers]:
        if not any(isinstance(f, _Scrubber) for f in target.filters):
            target.addFilter(_Scrubber())
