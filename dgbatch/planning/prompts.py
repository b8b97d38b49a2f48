"""Prompt rows to token ids: chat template, tokenize, and a row-level error for anything unusable.

Which chat each row makes (prompt column, messages, template, system prompt) is `chats.py`'s job.

A bad row never raises here: it comes back with an error string, and becomes that row's error
record in the output, so one bad prompt never fails its shard or the job.

Planning runs over millions of rows, so the common case is made cheap: for a single user turn the
chat template is rendered once with a placeholder and each prompt is spliced in, which is exact
whenever the template inserts the content verbatim (checked on probes first; otherwise every row
is rendered by the template itself), and tokenization is one batched call into the Rust tokenizer.
"""

from __future__ import annotations

import pyarrow as pa

from dgbatch.config import InputSection
from dgbatch.planning.chats import row_chats

_PLACEHOLDER = "\x00dgbatch-prompt\x00"
_PROBES = ("a", "  spaced text\n with lines  ", "{{ not jinja }} <b>", "x" * 300)


class PromptEncoder:
    """Chat-templates and tokenizes prompt columns for one tokenizer (and one system prompt: the turns
    every chat starts with, which the fast path renders once)."""

    def __init__(self, tokenizer, max_prompt_tokens: int, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self._head = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self._splice = self._find_splice()

    def _render(self, chat: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)

    def _find_splice(self) -> tuple[str, str] | None:
        """(prefix, suffix) such that render(head + user: c) == prefix + c + suffix for every probe, else None."""
        user = lambda c: [*self._head, {"role": "user", "content": c}]
        try:
            prefix, sep, suffix = self._render(user(_PLACEHOLDER)).partition(_PLACEHOLDER)
            if not sep or _PLACEHOLDER in suffix or _PLACEHOLDER in prefix:
                return None
            if all(self._render(user(p)) == prefix + p + suffix for p in _PROBES):
                return prefix, suffix
        except Exception:  # noqa: BLE001 - any template trouble: render row by row instead
            pass
        return None

    def render(self, chat: list[dict]) -> str:
        head = self._head
        if self._splice and len(chat) == len(head) + 1 and chat[-1]["role"] == "user" and chat[:-1] == head:
            return self._splice[0] + chat[-1]["content"] + self._splice[1]
        return self._render(chat)

    def encode_column(self, table: pa.Table, section: InputSection) -> tuple[list, list[str | None]]:
        """(token ids or None, error or None) for each row of the table (`chats.row_chats` makes its chat)."""
        errors: list[str | None] = []
        texts: list[str] = []
        rows: list[int] = []
        for i, (chat, err) in enumerate(row_chats(table, section)):
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
