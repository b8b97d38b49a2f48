"""Eval metrics, as lm-evaluation-harness reports them: each metric with its standard error.

Rows are fed one prompt at a time (a prompt's samples share a shard), so memory is O(groups), not
O(rows). Conventions:
- `accuracy` is the mean score over the scored rows; rows whose generation failed (`error_rows`) or
  that could not be scored (`scoring_errors`) are counted apart, and `accuracy_all_rows` counts both
  as 0.
- A standard error is lm-eval's `mean_stderr`: the sample standard deviation (n - 1) over sqrt(n),
  taken over prompts (with several samples per prompt, over each prompt's mean score: samples of one
  prompt are not independent).
- pass@k is the unbiased estimator of Chen et al. (2021), 1 - C(n - c, k) / C(n, k) for a prompt with
  n scored samples of which c pass (score >= 0.5); prompts with fewer than k scored samples are left
  out. maj@n is the score of the majority answer (the most common `extracted`, else output text; ties
  go to the lowest sample_index) over a prompt's scored samples.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

PASS_SCORE = 0.5  # a sample passes (pass@k) when its score is at least this


@dataclass
class Mean:
    """Streaming mean and variance (Welford), for a metric and its standard error."""

    n: int = 0
    total: float = 0.0  # the value is total / n: exact for 0/1 scores, as a recomputation gets it
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        self.total += x
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    @property
    def value(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def stderr(self) -> float | None:
        return math.sqrt(self.m2 / (self.n - 1) / self.n) if self.n > 1 else None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for n samples of which c pass (Chen et al. 2021, numerically stable form)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority(answers: Sequence[str | None], scores: Sequence[float]) -> float:
    """The score of the most common answer (None answers vote only if there is nothing else);
    ties go to the answer seen first."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return scores[0]
    best = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == best)
    return scores[answers.index(winner)]


@dataclass
class Sample:
    """One output row as the metrics see it: a score (None: not scored), its answer, its stats."""

    score: float | None
    answer: str | None
    error: bool  # the generation failed
    tokens_per_forward: float | None
    decoder_forwards: int


@dataclass
class Metrics:
    """The metrics of one group of prompts (or all of them)."""

    num_samples: int
    pass_k: Sequence[int]
    rows: int = 0
    error_rows: int = 0
    scoring_errors: int = 0
    scored: Mean = field(default_factory=Mean)  # over scored rows
    per_prompt: Mean = field(default_factory=Mean)  # over prompts' mean scores
    passes: dict[int, Mean] = field(default_factory=dict)
    vote: Mean = field(default_factory=Mean)
    tpf: Mean = field(default_factory=Mean)
    forwards: Mean = field(default_factory=Mean)
    forwards_total: int = 0

    def add_prompt(self, samples: Sequence[Sample]) -> None:
        scores = [s.score for s in samples if s.score is not None]
        for s in samples:
            self.rows += 1
            self.error_rows += s.error
            self.scoring_errors += s.score is None and not s.error
            if not s.error:
                if s.tokens_per_forward is not None:
                    self.tpf.add(s.tokens_per_forward)
                self.forwards.add(s.decoder_forwards)
                self.forwards_total += s.decoder_forwards
        if not scores:
            return
        for x in scores:
            self.scored.add(x)
        self.per_prompt.add(sum(scores) / len(scores))
        if self.num_samples > 1:
            passed = sum(x >= PASS_SCORE for x in scores)
            for k in self.pass_k:
                if len(scores) >= k:
                    self.passes.setdefault(k, Mean()).add(pass_at_k(len(scores), passed, k))
            scored = [s for s in samples if s.score is not None]
            self.vote.add(majority([s.answer for s in scored], [s.score for s in scored]))

    def to_dict(self) -> dict:
        spread = self.per_prompt if self.num_samples > 1 else self.scored
        out: dict = {
            "accuracy": self.scored.value,
            "accuracy_stderr": spread.stderr,
            "accuracy_all_rows": self.scored.total / self.rows if self.rows else None,
            "n": self.scored.n,
            "n_prompts": self.per_prompt.n,
            "rows": self.rows,
            "error_rows": self.error_rows,
            "scoring_errors": self.scoring_errors,
        }
        if self.num_samples > 1:
            for k in self.pass_k:
                m = self.passes.get(k, Mean())
                out[f"pass@{k}"], out[f"pass@{k}_stderr"] = m.value, m.stderr
            out[f"maj@{self.num_samples}"], out[f"maj@{self.num_samples}_stderr"] = self.vote.value, self.vote.stderr
        out["tokens_per_forward"] = {"mean": self.tpf.value}
        out["decoder_forwards"] = {"mean": self.forwards.value, "total": self.forwards_total}
        return out

    def metric_names(self) -> list[str]:
        names = ["accuracy"]
        if self.num_samples > 1:
            names += [f"pass@{k}" for k in self.pass_k] + [f"maj@{self.num_samples}"]
        return names
