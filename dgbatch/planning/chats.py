"""Rows to chats: what the checkpoint's chat template renders for each row.

A row's user turn comes from one place (input.prompt_column, input.messages_column or input.template),
and input.system_prompt adds a system turn before it. A row that cannot make a chat gets an error
string instead, which becomes its error record; nothing here raises for a bad row.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from dgbatch import template
from dgbatch.config import InputSection

Chat = list[dict[str, str]]


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


def content_text(content: Any, where: str) -> tuple[str | None, str | None]:
    """A message's content as text: a string, or Hugging Face content parts [{"type": "text", "text": ...}]
    joined in order (as Gemma's chat templates join them). The one place that decides which parts a
    prompt may hold: any other part type (an image) is the row's error until the engine takes it."""
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        return None, f"{where}: content must be a string or a list of parts"
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            return None, f"{where}: each content part needs a string 'type'"
        if kind != "text":
            return None, (f"{kind} prompts are not supported yet ({where} has a content part of type {kind!r}; "
                          "only 'text' parts are)")
        if not isinstance(part.get("text"), str):
            return None, f"{where}: a text part needs a string 'text'"
        texts.append(part["text"])
    return "".join(texts), None


def _messages(value: Any) -> tuple[Chat | None, str | None]:
    if value is None or len(value) == 0:
        return None, "messages are null or empty"
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m.get("content") is None:
            return None, "each message needs a string role and a string content"
        text, err = content_text(m["content"], f"message {i}")
        if err:
            return None, err
        out.append({"role": m["role"], "content": text})
    if not any(m["content"].strip() for m in out):
        return None, "messages have no content"
    return out, None


def _user(text: str | None, err: str | None) -> tuple[Chat | None, str | None]:
    if err is None:
        text, err = _text(text)
    return ([{"role": "user", "content": text}], None) if err is None else (None, err)


def row_chats(table: pa.Table, section: InputSection) -> list[tuple[Chat | None, str | None]]:
    """(chat, None) or (None, why) for each row of `table`."""
    key, source = section.prompt_source
    if key == "input.template":
        used = [c for c in sorted(template.columns(source)) if c in table.column_names]
        out = [_user(*template.render(source, row)) for row in table.select(used).to_pylist()]
    elif key == "input.prompt_column":
        out = [_user(v, None) for v in table.column(source).to_pylist()]
    else:
        out = [_messages(v) for v in table.column(source).to_pylist()]
    if section.system_prompt:
        system = {"role": "system", "content": section.system_prompt}
        out = [([system, *chat] if chat and chat[0]["role"] != "system" else chat, err) for chat, err in out]
    return out
