"""Prompt rows to token ids: chat template, tokenize, and a row-level error for anything unusable.

A bad row never raises here: it comes back with an error string, and becomes that row's error
record in the output, so one bad prompt never fails its shard or the job.

Planning runs over millions of rows, so the common case is made cheap: for a single user turn the
chat template is rendered once with a placeholder and each prompt is spliced in, which is exact
whenever the template inserts the content verbatim (checked on probes first; otherwise every row
is rendered by the template itself), and tokenization is one batched call into the Rust tokenizer.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from dgbatch.config import InputSection

_PLACEHOLDER = "\x00dgbatch-prompt\x00"
_PROBES = ("a", "  spaced text\n with lines  ", "{{ not jinja }} <b>", "x" * 300)


def _text(value: Any) -> tuple[str | None, str | None]:
    if value is None:
        return None, "prompt is null"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"prompt is not valid UTF-8 ({e})"
    if not value.strip():
        return None, "prompt is empty"
    return value, None


def _messages(value: Any) -> tuple[list[dict] | None, str | None]:
    if value is None or len(value) == 0:
        return None, "messages are null or empty"
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None, "each message needs a string role and a string content"
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["content"].strip() for m in out):
        return None, "messages have no content"
    return out, None


class PromptEncoder:
    """Chat-templates and tokenizes prompt columns for one tokenizer."""

    def __init__(self, tokenizer, max_prompt_tokens: int):
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self._splice = self._find_splice()

    def _render(self, chat: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)

    def _find_splice(self) -> tuple[str, str] | None:
        """(prefix, suffix) such that render(user: c) == prefix + c + suffix for every probe, else None."""
        try:
            prefix, sep, suffix = self._render([{"role": "user", "content": _PLACEHOLDER}]).partition(_PLACEHOLDER)
            if not sep or _PLACEHOLDER in suffix:
                return None
            if all(self._render([{"role": "user", "content": p}]) == prefix + p + suffix for p in _PROBES):
                return prefix, suffix
        except Exception:  # noqa: BLE001 - any template trouble: render row by row instead
            pass
        return None

    def render(self, chat: list[dict]) -> str:
        if self._splice and len(chat) == 1 and chat[0]["role"] == "user":
            return self._splice[0] + chat[0]["content"] + self._splice[1]
        return self._render(chat)

    def encode_column(self, table: pa.Table, section: InputSection) -> tuple[list, list[str | None]]:
        """(token ids or None, error or None) for each row of the prompt (or messages) column."""
        col = section.prompt_column or section.messages_column
        errors: list[str | None] = []
        texts: list[str] = []
        rows: list[int] = []
        for i, v in enumerate(table.column(col).to_pylist()):
            if section.prompt_column:
                text, err = _text(v)
                chat = [{"role": "user", "content": text}] if err is None else None
            else:
                chat, err = _messages(v)
            if err is None:
                try:
                    texts.append(self.render(chat))
                    rows.append(i)
                except Exception as e:  # noqa: BLE001 - a template that rejects this row
                    err = f"chat template failed: {e}"
            errors.append(err)
        ids: list[list[int] | None] = [None] * len(errors)
        # The rendered template already holds the special tokens (bos, turn markers).
        encodings = self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
        for i, enc in zip(rows, encodings):
            if len(enc.ids) > self.max_prompt_tokens:
                errors[i] = f"prompt has {len(enc.ids)} tokens; the model accepts at most {self.max_prompt_tokens}"
            else:
                ids[i] = enc.ids
        return ids, errors
