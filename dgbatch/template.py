"""Prompt templates: Jinja2 over a row's columns, sandboxed, with undefined names an error.

A template is user text run over user data, so it gets jinja2's `SandboxedEnvironment` (no attribute
access to internals such as `__class__`, no unsafe calls) and `StrictUndefined` (a name that is not a
column, or a column that is null in this row, fails loudly instead of rendering as empty text).
Imports only jinja2, so the config can check a template's syntax before anything else happens.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateError, UndefinedError, meta
from jinja2.sandbox import SandboxedEnvironment


@functools.cache
def environment() -> SandboxedEnvironment:
    # autoescape off: prompts are text, not HTML. keep_trailing_newline: render what the user wrote.
    return SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


def check(source: str) -> None:
    """Raise ValueError naming the problem if `source` is not a valid template."""
    try:
        environment().parse(source)
    except TemplateError as e:
        line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise ValueError(f"not a valid Jinja2 template{line}: {e.message or e}") from None


def columns(source: str) -> set[str]:
    """The top-level names the template reads: the columns it needs (loop and `set` names excluded)."""
    return set(meta.find_undeclared_variables(environment().parse(source)))


@functools.lru_cache(maxsize=16)
def compiled(source: str):
    return environment().from_string(source)


def render(source: str, row: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(text, None), or (None, why) when this row cannot be rendered. Null values are left undefined,
    so a template that uses one fails for that row (test for it with `{% if col is defined %}`)."""
    context = {k: v for k, v in row.items() if v is not None}
    try:
        return compiled(source).render(context), None
    except UndefinedError as e:
        return None, f"template failed: {e} (a null value in this row leaves its column undefined)"
    except Exception as e:  # noqa: BLE001 - anything the template raises is this row's problem
        return None, f"template failed: {type(e).__name__}: {e}"
