"""Rows to chats: what the checkpoint's chat template renders for each row.

A row's user turn comes from one place (input.prompt_column, input.messages_column or input.template),
and input.system_prompt adds a system turn before it. A row that cannot make a chat gets an error
string instead, which becomes its error record; nothing here raises for a bad row.

Images: a message's image parts, or input.image_column's value beside a prompt column or template,
become `{"type": "image"}` parts of the user content (no data: the template renders one image
placeholder for each, and the replica reads the image itself, `planning/images.py`).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from dgbatch import template
from dgbatch.config import InputSection

Chat = list[dict[str, Any]]  # content: a string, or parts [{"type": "text", "text": ...} | {"type": "image"}]
IMAGE_PART = {"type": "image"}


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


def content_of(content: Any, where: str) -> tuple[Any, str | None]:
    """A message's content for the template: a string, or Hugging Face content parts. Text parts alone are
    joined in order (as Gemma's chat templates join them) into a string; with image parts the parts are
    kept, text and `IMAGE_PART` (the image's data stays in the input). The one place that decides which
    parts a prompt may hold: any other part type is the row's error."""
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        return None, f"{where}: content must be a string or a list of parts"
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            return None, f"{where}: each content part needs a string 'type'"
        if kind == "image":
            parts.append(IMAGE_PART)
        elif kind != "text":
            return None, f"unsupported content part {kind!r} in {where}: expected text or image parts"
        elif not isinstance(part.get("text"), str):
            return None, f"{where}: a text part needs a string 'text'"
        else:
            parts.append({"type": "text", "text": part["text"]})
    if IMAGE_PART not in parts:
        return "".join(p["text"] for p in parts), None
    return parts, None


def text_of(content: Any) -> str:
    """The text of a message's content (its text parts joined)."""
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def num_images(chat: Chat) -> int:
    return sum(1 for m in chat if not isinstance(m["content"], str) for p in m["content"] if p == IMAGE_PART)


def _messages(value: Any) -> tuple[Chat | None, str | None]:
    if value is None or len(value) == 0:
        return None, "messages are null or empty"
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m.get("content") is None:
            return None, "each message needs a string role and a string content"
        content, err = content_of(m["content"], f"message {i}")
        if err:
            return None, err
        out.append({"role": m["role"], "content": content})
    if not any(text_of(m["content"]).strip() for m in out) and not num_images(out):
        return None, "messages have no content"
    return out, None


def _user(text: str | None, err: str | None, image: bool = False) -> tuple[Chat | None, str | None]:
    """The user turn of a prompt text (with `image`: after an image part, as Gemma's examples put it)."""
    if err is None:
        text, err = _text(text)
    if err is not None:
        return None, err
    return [{"role": "user", "content": [IMAGE_PART, {"type": "text", "text": text}] if image else text}], None


def row_chats(table: pa.Table, section: InputSection) -> list[tuple[Chat | None, str | None]]:
    """(chat, None) or (None, why) for each row of `table`."""
    key, source = section.prompt_source
    col = section.image_column
    images = [v is not None for v in table.column(col).to_pylist()] if col else [False] * table.num_rows
    if key == "input.template":
        used = [c for c in sorted(template.columns(source)) if c in table.column_names]
        out = [_user(*template.render(source, row), image=im) for row, im in zip(table.select(used).to_pylist(), images)]
    elif key == "input.prompt_column":
        out = [_user(v, None, image=im) for v, im in zip(table.column(source).to_pylist(), images)]
    else:
        out = [_messages(v) for v in table.column(source).to_pylist()]
    if section.system_prompt:
        system = {"role": "system", "content": section.system_prompt}
        out = [([system, *chat] if chat and chat[0]["role"] != "system" else chat, err) for chat, err in out]
    return out
