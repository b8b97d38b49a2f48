"""Output filters (`output.filters`): checks on each generated text, for synthetic data.

A row that fails a check is kept and marked (`filtered`, `filter_reason`: the first failing check in
the order min_tokens, max_tokens, regex, json), never silently dropped; with `output.drop_filtered`
the shard writes those rows under OUTPUT/filtered/ instead of OUTPUT/data/. Error rows have no
output to check: they are counted as errors, not filtered.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence

from dgbatch.config import OutputSection


class OutputFilter:
    def __init__(self, output: OutputSection):
        f = output.filters
        self.min_tokens, self.max_tokens, self.json = f.min_tokens, f.max_tokens, f.json_
        self.regex = re.compile(f.regex) if f.regex is not None else None
        self.drop = output.drop_filtered

    @staticmethod
    def of(output: OutputSection) -> OutputFilter | None:
        """The job's filter, or None when output.filters sets no check."""
        return OutputFilter(output) if output.filters.active else None

    def reason(self, text: str, num_tokens: int) -> str | None:
        """The first check `text` (of `num_tokens` tokens, EOS not counted) fails, or None."""
        if self.min_tokens is not None and num_tokens < self.min_tokens:
            return "min_tokens"
        if self.max_tokens is not None and num_tokens > self.max_tokens:
            return "max_tokens"
        if self.regex is not None and not self.regex.search(text):
            return "regex"
        if self.json:
            try:
                json.loads(text)
            except ValueError:
                return "json"
        return None


def duplicate_outputs(prompt_ids: Sequence[str], texts: Sequence[str | None]) -> int:
    """Exact duplicates among each prompt's samples: for every prompt, its outputs minus its distinct
    outputs (error rows, with no output, not counted)."""
    seen: dict[str, set[str]] = defaultdict(set)
    outputs = 0
    for pid, text in zip(prompt_ids, texts):
        if text is not None:
            seen[pid].add(text)
            outputs += 1
    return outputs - sum(len(s) for s in seen.values())
