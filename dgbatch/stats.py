"""Job statistics that merge shard by shard in O(1) memory, percentiles from a fixed histogram."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

TPF_BIN = 0.01  # tokens_per_forward histogram resolution


@dataclass
class ShardStats:
    rows: int = 0
    error_rows: int = 0
    output_tokens: int = 0
    prompt_tokens: int = 0
    tpf_sum: float = 0.0
    tpf_count: int = 0
    tpf_hist: dict[str, int] = field(default_factory=dict)  # bin index (as str, JSON-friendly) -> rows
    finish_reasons: dict[str, int] = field(default_factory=dict)
    filtered: dict[str, int] = field(default_factory=dict)  # output.filters: filter_reason -> rows
    duplicate_outputs: int = 0  # exact duplicates among a prompt's samples (sampling.num_samples > 1)

    def add_row(self, finish_reason: str, output_tokens: int, prompt_tokens: int, tpf: float | None,
                filter_reason: str | None = None) -> None:
        self.rows += 1
        if filter_reason is not None:
            self.filtered[filter_reason] = self.filtered.get(filter_reason, 0) + 1
        self.error_rows += finish_reason == "error"
        self.output_tokens += output_tokens
        self.prompt_tokens += prompt_tokens
        self.finish_reasons[finish_reason] = self.finish_reasons.get(finish_reason, 0) + 1
        if tpf is not None:
            self.tpf_sum += tpf
            self.tpf_count += 1
            b = str(int(tpf / TPF_BIN))
            self.tpf_hist[b] = self.tpf_hist.get(b, 0) + 1

    def merge(self, other: ShardStats) -> None:
        for k in ("rows", "error_rows", "output_tokens", "prompt_tokens", "tpf_sum", "tpf_count", "duplicate_outputs"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for mine, theirs in ((self.tpf_hist, other.tpf_hist), (self.finish_reasons, other.finish_reasons),
                             (self.filtered, other.filtered)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v

    def tpf_quantile(self, q: float) -> float | None:
        if not self.tpf_count:
            return None
        target, seen = q * self.tpf_count, 0
        for b in sorted(self.tpf_hist, key=int):
            seen += self.tpf_hist[b]
            if seen >= target:
                return round((int(b) + 0.5) * TPF_BIN, 4)
        return None

    @property
    def kept_rows(self) -> int:
        """Rows with an output that passed every output filter."""
        return self.rows - self.error_rows - sum(self.filtered.values())

    @property
    def tpf_mean(self) -> float | None:
        return self.tpf_sum / self.tpf_count if self.tpf_count else None

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> ShardStats:
        return ShardStats(**d)
