"""What every generation backend takes and gives: token ids in, token ids plus per-row stats out.

The pipeline only talks to `Backend`; transformers' `generate` (the reference) and dgbatch's own
engine both implement it, so replicas and sharded multi-device groups plug in the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

FinishReason = Literal["eos", "length", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """Fully resolved sampling settings (no unset fields)."""

    max_new_tokens: int
    max_denoising_steps: int
    entropy_bound: float
    t_min: float
    t_max: float
    stability_threshold: int
    confidence_threshold: float
    seed: int


@dataclass(frozen=True)
class VisionInputs:
    """A row's images as the vision tower takes them (the checkpoint's image processor made them, see
    `dgbatch.vision`). The row's `prompt_ids` already hold each image's boi, soft tokens and eoi; the
    i-th image's soft tokens are the i-th run of image tokens."""

    pixel_values: Any  # torch.Tensor [N, max_patches, 3 * patch_size**2], float32 in [0, 1]
    position_ids: Any  # torch.LongTensor [N, max_patches, 2]: patch (x, y); (-1, -1) pads
    soft_tokens: tuple[int, ...]  # [N] soft tokens per image

    @property
    def num_images(self) -> int:
        return len(self.soft_tokens)


@dataclass(frozen=True)
class Request:
    row_id: str
    prompt_ids: list[int]
    max_new_tokens: int | None = None  # this row's own budget, capped at SamplingParams.max_new_tokens; None: that
    vision: VisionInputs | None = None  # None: a text-only row


def max_new_tokens(request: Request, params: SamplingParams) -> int:
    """The row's output budget: its own when it asks for fewer tokens than the job's, never more."""
    own = request.max_new_tokens
    return params.max_new_tokens if own is None else max(1, min(own, params.max_new_tokens))


def first_eos_end(new: list[int], eos_ids: set[int]) -> int | None:
    """Length of `new` up to and including its first EOS; None without one."""
    return next((i + 1 for i, t in enumerate(new) if t in eos_ids), None)


def cut_output(new: list[int], limit: int, pad_id: int, eos_ids: set[int]) -> tuple[list[int], FinishReason]:
    """A row's generated tokens (padded after its first EOS, as `generate` returns them) -> its output and
    finish reason: cut after the first EOS when that is within `limit` tokens, else at `limit`; pads dropped.
    The engine and the reference backend both cut here, so their outputs are cut alike."""
    cut = first_eos_end(new, eos_ids)
    if cut is not None and cut <= limit:
        toks, reason = new[:cut], "eos"
    else:
        toks, reason = new[:limit], "length"
    return [t for t in toks if t != pad_id], reason


@dataclass
class Generation:
    row_id: str
    token_ids: list[int]  # generated tokens, EOS included when produced, no padding
    finish_reason: FinishReason
    num_decoder_forwards: int
    tokens_per_forward: float


class Backend(Protocol):
    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        """One Generation per request, in request order."""
        ...


def row_seed(job_seed: int, row_id: str, *salt: int) -> int:
    """A 63-bit seed from the job seed and a row id (and e.g. canvas, step): stable across runs."""
    h = hashlib.blake2b(f"{job_seed}\x1f{row_id}\x1f{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)
