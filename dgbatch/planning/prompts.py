"""Prompt rows to token ids: chat template, tokenize, and a row-level error for anything unusable.

Which chat each row makes (prompt column, messages, template, system prompt) is `chats.py`'s job.

A bad row never raises here: it comes back with an error string, and becomes that row's error
record in the output, so one bad prompt never fails its shard or the job.

Planning runs over millions of rows, so the common case is made cheap: for a single user turn the
chat template is rendered once with a placeholder and each prompt is spliced in, which is exact
whenever the template inserts the content verbatim (checked on probes first; otherwise every row
is rendered by the template itself), and tokenization is one batched call into the Rust tokenizer.

User text stays text: a row whose text spells a special token ('<eos>', a turn marker) has its user
spans encoded with special-token matching off (`usertext.py`), unless input.allow_special_tokens;
a role the chat template does not know is a row error.

Images (`input.image_column`, or image parts in messages) are not read here: each becomes one image
placeholder token in the rendered prompt, which the replica expands to the image's soft tokens once
it has read the image (`dgbatch.planning.images`, `dgbatch.vision`). For bucketing a prompt counts
each image at the most tokens the checkpoint's processor gives one (`planned_length`).
"""

from __future__ import annotations

import pyarrow as pa

from dgbatch.config import InputSection
from dgbatch.planning.chats import num_images, row_chats, text_of
from dgbatch.planning.images import check_refs, row_refs
from dgbatch.planning.usertext import Span, UserTextEncoder, bad_role, template_roles, user_spans

_PLACEHOLDER = "\x00dgbatch-prompt\x00"
_PROBES = ("a", "  spaced text\n with lines  ", "{{ not jinja }} <b>", "x" * 300)


class PromptEncoder:
    """Chat-templates and tokenizes prompt columns for one tokenizer, one system prompt (the turns every
    chat starts with, which the fast path renders once) and the checkpoint's image tokens
    (`dgbatch.vision.ImageTokens`; None for a text-only checkpoint)."""

    def __init__(self, tokenizer, max_prompt_tokens: int, *, system_prompt: str | None = None, image_tokens=None):
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.image_tokens = image_tokens
        self._head = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self._splice = self._find_splice()
        self.user_text = UserTextEncoder(tokenizer)
        self.roles = template_roles(getattr(tokenizer, "chat_template", None))

    def planned_length(self, ids: list[int]) -> int:
        """Prompt tokens once its images are expanded, each image counted at its most (an upper bound)."""
        if self.image_tokens is None:
            return len(ids)
        return len(ids) + ids.count(self.image_tokens.image_id) * (self.image_tokens.max_tokens_per_image - 1)

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
            return None
        return None

    def _spliced(self, chat: list[dict]) -> bool:
        """The fast path applies: the system head, then one user turn."""
        head = self._head
        return (bool(self._splice) and len(chat) == len(head) + 1 and chat[-1]["role"] == "user"
                and isinstance(chat[-1]["content"], str) and chat[:-1] == head)

    def render(self, chat: list[dict]) -> str:
        if self._spliced(chat):
            return self._splice[0] + chat[-1]["content"] + self._splice[1]
        return self._render(chat)

    def spans(self, chat: list[dict], rendered: str) -> list[Span] | None:
        """Where each message's content sits in `rendered` (None if the template does not insert it plainly)."""
        if self._spliced(chat):
            start = len(self._splice[0])
            return [(start, start + len(chat[-1]["content"]))]
        marks = [f"\x00dgbatch-{i}\x00" for i in range(len(chat))]
        try:
            skeleton = self._render([{**m, "content": mark} for m, mark in zip(chat, marks)])
        except Exception:  # noqa: BLE001 - the template rejects placeholders: no spans
            return None
        pieces = []
        for mark in marks:
            piece, sep, skeleton = skeleton.partition(mark)
            if not sep or mark in skeleton:
                return None
            pieces.append(piece)
        return user_spans(rendered, [*pieces, skeleton], [m["content"] for m in chat])

    def _guarded(self, chat: list[dict], rendered: str, section: InputSection) -> tuple[list[Span] | None, str | None]:
        """(user spans to encode as plain text, or None: the row needs no care; error or None)."""
        if section.allow_special_tokens or not any(self.user_text.spells_special(text_of(m["content"])) for m in chat):
            return None, None
        spans = self.spans(chat, rendered)
        if spans is None:
            return None, ("the prompt spells special tokens and the chat template does not insert message text "
                          "verbatim, so it cannot be kept plain text; remove them or set input.allow_special_tokens")
        return spans, None

    def encode_column(self, table: pa.Table, section: InputSection) -> tuple[list, list[str | None]]:
        """(token ids or None, error or None) for each row of the table (`chats.row_chats` makes its chat)."""
        errors: list[str | None] = []
        texts: list[str] = []
        rows: list[int] = []
        guarded: dict[int, tuple[str, list[Span]]] = {}  # rows whose user text spells special tokens
        refs = row_refs(table, section)
        images = [0] * table.num_rows
        for i, (chat, err) in enumerate(row_chats(table, section)):
            err = err or bad_role(chat, self.roles)
            if err is None:
                images[i] = num_images(chat)
                if images[i]:
                    err = self._check_images(refs[i], section)
            if err is None:
                try:
                    rendered = self.render(chat)
                except Exception as e:  # noqa: BLE001 - a template that rejects this row
                    err = f"chat template failed: {e}"
                else:
                    spans, err = self._guarded(chat, rendered, section)
                    if spans is not None:
                        guarded[i] = (rendered, spans)
                    elif err is None:
                        texts.append(rendered)
                        rows.append(i)
            errors.append(err)
        ids: list[list[int] | None] = [None] * len(errors)
        # The rendered template already holds the special tokens (bos, turn markers).
        encodings = self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
        encoded = {i: enc.ids for i, enc in zip(rows, encodings)}
        for i, (rendered, spans) in guarded.items():
            encoded[i] = self.user_text.encode(rendered, spans)
            if encoded[i] is None:
                errors[i] = "the prompt's text still encodes to special tokens; set input.allow_special_tokens"
        image_id = self.image_tokens.image_id if self.image_tokens is not None else None
        for i in sorted(encoded):
            if encoded[i] is None:
                continue
            n = self.planned_length(encoded[i])
            placeholders = encoded[i].count(image_id) if image_id is not None else 0
            if placeholders != images[i]:
                errors[i] = (f"prompt holds {placeholders} image tokens for {images[i]} images: its text contains "
                             f"the image placeholder {self.tokenizer.convert_ids_to_tokens(image_id)!r}")
            elif n > self.max_prompt_tokens:
                how = " (images counted at their most)" if images[i] else ""
                errors[i] = f"prompt has {n} tokens{how}; the model accepts at most {self.max_prompt_tokens}"
            else:
                ids[i] = encoded[i]
        return ids, errors

    def _check_images(self, refs: list, section: InputSection) -> str | None:
        if self.image_tokens is None:
            return "the row has images, but the checkpoint has no image processor (processor_config.json)"
        return check_refs(refs, section)
