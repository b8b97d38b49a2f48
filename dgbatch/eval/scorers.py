"""Scorers: (output_text, reference, row) -> (score, extracted), extracted being the answer compared.

Built in: `exact` and `contains` (after normalising whitespace and case, per eval.*), `regex` (the
answer is eval.regex's first group, or its whole match, then exact), `numeric` (the last number in
the output, or in eval.regex's match, within eval.tolerance of the reference). Anything else is a
user function `module:function`, imported from the job's working directory (`ray job submit
--working-dir` ships it): it runs the user's own code, as any scorer does. It may return a float or
a (float, extracted) pair. A row the scorer cannot score (no reference, an exception) raises
`ScoreError`, and is counted apart from the scored rows, never scored as 0 silently.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from dgbatch.config import BUILTIN_SCORERS, ConfigError, EvalSection

Scorer = Callable[[str, Any, dict], tuple[float, str | None]]
NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


class ScoreError(ValueError):
    """This row cannot be scored; the message says why."""


def normalizer(cfg: EvalSection) -> Callable[[str], str]:
    def norm(s: str) -> str:
        if cfg.normalize_whitespace:
            s = " ".join(s.split())
        return s.casefold() if cfg.ignore_case else s

    return norm


def _reference(ref: Any) -> str:
    if ref is None:
        raise ScoreError("reference is null")
    return ref if isinstance(ref, str) else str(ref)


def parse_number(text: str) -> float | None:
    """The last number in `text` ("1,234.5" -> 1234.5), or None."""
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def build(cfg: EvalSection, workdir: str | None = None) -> Scorer:
    """The scorer eval.scorer names. A user function is imported now, so a typo fails before any model loads."""
    norm = normalizer(cfg)
    pattern = re.compile(cfg.regex) if cfg.regex else None

    def exact(out: str, ref: Any, row: dict) -> tuple[float, str | None]:
        got = norm(out)
        return float(got == norm(_reference(ref))), got

    def contains(out: str, ref: Any, row: dict) -> tuple[float, str | None]:
        got = norm(out)
        return float(norm(_reference(ref)) in got), got

    def regex(out: str, ref: Any, row: dict) -> tuple[float, str | None]:
        want = norm(_reference(ref))
        m = pattern.search(out)
        if m is None:
            return 0.0, None
        got = m.group(1) if pattern.groups else m.group(0)
        return float(got is not None and norm(got) == want), got

    def numeric(out: str, ref: Any, row: dict) -> tuple[float, str | None]:
        want = parse_number(_reference(ref))
        if want is None:
            raise ScoreError(f"reference {ref!r} holds no number")
        if pattern is not None:
            m = pattern.search(out)
            out = "" if m is None else (m.group(1) if pattern.groups else m.group(0)) or ""
        found = NUMBER.findall(out)
        if not found:
            return 0.0, None
        got = parse_number(found[-1])
        return float(got is not None and abs(got - want) <= cfg.tolerance), found[-1]

    builtins = {"exact": exact, "contains": contains, "regex": regex, "numeric": numeric}
    assert set(builtins) == set(BUILTIN_SCORERS)
    if cfg.scorer in builtins:
        return builtins[cfg.scorer]
    return _user(cfg.scorer, workdir or os.getcwd())


def _user(spec: str, workdir: str) -> Scorer:
    module_name, _, attr = spec.partition(":")
    if workdir not in sys.path:
        sys.path.insert(0, workdir)  # the job's own modules, as `python -m` from there would see them
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
        raise ConfigError(f"eval.scorer {spec!r}: cannot import {module_name!r} from the working directory "
                          f"{workdir} ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"eval.scorer {spec!r}: {module_name!r} has no function {attr!r}")

    def user(out: str, ref: Any, row: dict) -> tuple[float, str | None]:
        try:
            result = fn(out, ref, row)
        except Exception as e:  # noqa: BLE001 - the user's code failed on this row
            raise ScoreError(f"{spec} raised {type(e).__name__}: {e}") from None
        score, extracted = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
        if isinstance(score, bool):
            score = float(score)
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ScoreError(f"{spec} returned {score!r}, not a finite number")
        return float(score), None if extracted is None else str(extracted)

    return user


def needs_reference(cfg: EvalSection) -> bool:
    """Built-in scorers compare with a reference; a user function may judge the output alone."""
    return cfg.scorer in BUILTIN_SCORERS
