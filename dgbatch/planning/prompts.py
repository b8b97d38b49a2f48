"""Prompt rows to token ids: chat template, tokenize, and a row-level error for anything unusable.

A bad row never raises here: it comes back with an error string, and becomes that row's error
record in the output, so one bad prompt never fails its shard or the job.

Planning runs over millions of rows, so the common case is made cheap: for a single user turn the
chat template is rendered once with a placeholder and each prompt is spliced in, which is exact
whenever the template inserts the content verbatim (checked on probes first; otherwise every row
is rendered by the template itself), and tokenization is one batched call into the Rust tokenizer.

Images (`input.image_column`, or image parts in messages) are not read here: each becomes one image
placeholder token in the rendered prompt, which the replica expands to the image's soft tokens once
it has read the image (`dgbatch.planning.images`, `dgbatch.vision`). For bucketing a prompt counts
each image at the most tokens the checkpoint's processor gives one (`planned_length`).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from dgbatch.config import InputSection
from dgbatch.planning.images import check_refs, message_refs

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


def _content(value: Any) -> tuple[Any, str | None]:
    """A message's content for the template: a string, or text / image parts (images without their data)."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, list) and value and all(isinstance(p, dict) for p in value):
        parts = []
        for p in value:
            if p.get("type") == "text" and isinstance(p.get("text"), str):
                parts.append({"type": "text", "text": p["text"]})
            elif p.get("type") == "image":
                parts.append({"type": "image"})
            else:
                return None, f"unsupported content part {p.get('type')!r}: expected text or image parts"
        return parts, None
    return None, "each message needs a string role and a string content (or a list of text / image parts)"


def _has_content(content: Any) -> bool:
    if isinstance(content, str):
        return bool(content.strip())
    return any(p["type"] == "image" or p["text"].strip() for p in content)


def _messages(value: Any) -> tuple[list[dict] | None, str | None]:
    if value is None or len(value) == 0:
        return None, "messages are null or empty"
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return None, "each message needs a string role and a string content"
        content, err = _content(m.get("content"))
        if err:
            return None, err
        out.append({"role": m["role"], "content": content})
    if not any(_has_content(m["content"]) for m in out):
        return None, "messages have no content"
    return out, None


class PromptEncoder:
    """Chat-templates and tokenizes prompt columns for one tokenizer (and the checkpoint's image tokens,
    `dgbatch.vision.ImageTokens`, None for a text-only checkpoint)."""

    def __init__(self, tokenizer, max_prompt_tokens: int, image_tokens=None):
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.image_tokens = image_tokens
        self._splice = self._find_splice()

    def planned_length(self, ids: list[int]) -> int:
        """Prompt tokens once its images are expanded, each image counted at its most (an upper bound)."""
        if self.image_tokens is None:
            return len(ids)
        return len(ids) + ids.count(self.image_tokens.image_id) * (self.image_tokens.max_tokens_per_image - 1)

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
        if self._splice and len(chat) == 1 and chat[0]["role"] == "user" and isinstance(chat[0]["content"], str):
            return self._splice[0] + chat[0]["content"] + self._splice[1]
        return self._render(chat)

    def encode_column(self, table: pa.Table, section: InputSection) -> tuple[list, list[str | None]]:
        """(token ids or None, error or None) for each row of the prompt (or messages) column."""
        col = section.prompt_column or section.messages_column
        errors: list[str | None] = []
        texts: list[str] = []
        rows: list[int] = []
        num_images: list[int] = []
        images = table.column(section.image_column).to_pylist() if section.image_column else None
        for i, v in enumerate(table.column(col).to_pylist()):
            refs = []
            if section.prompt_column:
                text, err = _text(v)
                refs = [images[i]] if images is not None and images[i] is not None else []
                content = [{"type": "image"}, {"type": "text", "text": text}] if refs else text
                chat = [{"role": "user", "content": content}] if err is None else None
            else:
                chat, err = _messages(v)
                refs = message_refs(v) if err is None else []
            num_images.append(len(refs))
            if err is None and refs:
                err = self._check_images(refs, section)
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
        image_id = self.image_tokens.image_id if self.image_tokens is not None else None
        for i, enc in zip(rows, encodings):
            n = self.planned_length(enc.ids)
            placeholders = enc.ids.count(image_id) if image_id is not None else 0
            if placeholders != num_images[i]:
                errors[i] = (f"prompt holds {placeholders} image tokens for {num_images[i]} images: its text contains "
                             f"the image placeholder {self.tokenizer.convert_ids_to_tokens(image_id)!r}")
            elif n > self.max_prompt_tokens:
                how = " (images counted at their most)" if num_images[i] else ""
                errors[i] = f"prompt has {n} tokens{how}; the model accepts at most {self.max_prompt_tokens}"
            else:
                ids[i] = enc.ids
        return ids, errors

    def _check_images(self, refs: list, section: InputSection) -> str | None:
        if self.image_tokens is None:
            return "the row has images, but the checkpoint has no image processor (processor_config.json)"
        return check_refs(refs, section)
