"""User text is text: a prompt that spells a special token ('<eos>', a turn marker) gets that text's tokens.

A rendered chat is one string in which the template's own markers and the user's words sit side by
side; encoded as one string, the tokenizer turns every special-token spelling into the special token,
wherever it came from, so a row could close its turn and open another. Here the user's spans are
encoded with special-token matching off and the template's pieces with it on.

Rows whose user text spells no special token (nearly all) are encoded as one string, exactly as the
tokenizer would; only the others pay for the split. `input.allow_special_tokens=true` turns this off.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

DEFAULT_ROLES = frozenset({"system", "user", "assistant"})
_ROLE_TEST = re.compile(r"""role['"]?\]?\s*==\s*['"]([A-Za-z_][\w-]*)['"]|['"]([A-Za-z_][\w-]*)['"]\s*==\s*message""")

Span = tuple[int, int]  # [start, end) character offsets of user text in a rendered prompt


def template_roles(chat_template: str | None) -> frozenset[str]:
    """Roles a chat may use: the template's own (the names it compares a message's role with), plus
    system / user / assistant. Anything else is refused as that row's error: a role is inserted into the
    rendered prompt as text, so an arbitrary one could forge a turn."""
    named = {a or b for a, b in _ROLE_TEST.findall(chat_template or "")}
    return DEFAULT_ROLES | named


def bad_role(chat: Sequence[dict], allowed: frozenset[str]) -> str | None:
    """The row's error if a message's role is not one the template knows, else None."""
    for m in chat:
        if m["role"] not in allowed:
            return f"message role {m['role'][:40]!r} is not one of {sorted(allowed)}"
    return None


def _trie_pattern(strings: Sequence[str]) -> str:
    """One regex matching any of `strings`, as a trie: a search costs O(text), however many strings (a
    plain alternation tries every one at each '<', and checkpoints carry thousands of special tokens)."""
    trie: dict = {}
    for s in strings:
        node = trie
        for ch in s:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        alts = [re.escape(ch) + emit(node[ch]) for ch in sorted(k for k in node if k)]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return emit(trie)


class UserTextEncoder:
    """Encodes rendered prompts with the user's spans as plain text, for one tokenizer."""

    def __init__(self, tokenizer):
        self.backend = tokenizer.backend_tokenizer
        added = self.backend.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special}
        strings = [t.content for t in added.values() if t.special and t.content]
        self._spelled = re.compile(_trie_pattern(strings)) if strings else None
        self._plain = None

    @property
    def plain(self):
        """The same tokenizer with special-token matching off (built on first use: a copy of a large one costs)."""
        if self._plain is None:
            from tokenizers import Tokenizer

            self._plain = Tokenizer.from_str(self.backend.to_str())
            self._plain.encode_special_tokens = True  # special-token spellings are split like any other text
        return self._plain

    def spells_special(self, text: str) -> bool:
        """Whether `text` contains the spelling of a special token."""
        return bool(self._spelled and self._spelled.search(text))

    def encode(self, text: str, spans: Sequence[Span]) -> list[int] | None:
        """Token ids of `text` with each span encoded as plain text; None if a span still yields a special id."""
        ids: list[int] = []
        at = 0
        for start, end in sorted(spans):
            if start > at:
                ids += self.backend.encode(text[at:start], add_special_tokens=False).ids
            user = self.plain.encode(text[start:end], add_special_tokens=False).ids
            if self.special_ids.intersection(user):
                return None
            ids += user
            at = end
        if at < len(text):
            ids += self.backend.encode(text[at:], add_special_tokens=False).ids
        return ids


def user_spans(rendered: str, pieces: Sequence[str], contents: Sequence[str]) -> list[Span] | None:
    """Where `contents` sit in `rendered`, given the template's `pieces` around them (len(pieces) ==
    len(contents) + 1), if the template inserted each content verbatim or stripped of surrounding
    whitespace (as Gemma's `| trim` does); None if `rendered` is not built that way."""
    for transform in (lambda c: c, str.strip):
        spans, out, at = [], [], 0
        for piece, content in zip(pieces, contents):
            c = transform(content)
            out += [piece, c]
            at += len(piece)
            spans.append((at, at + len(c)))
            at += len(c)
        out.append(pieces[-1])
        if "".join(out) == rendered:
            return spans
    return None
