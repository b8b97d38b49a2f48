"""Per-row random numbers that do not depend on the batch a row lands in.

transformers draws from one global generator, so a row's tokens depend on its batch neighbours and on
the order of calls. Here every draw is a pure function of (row key, canvas, step, stream, position):
a counter-based hash evaluated on the device. The same row gives the same draws in any slot, batch,
shard or replica, a retried shard reproduces, and no per-row `torch.Generator` (one kernel launch per
row) or host round-trip is needed inside a denoising step.

All arithmetic is on int64 tensors holding 32-bit values, with every product kept below 2**63, so it
never relies on signed-overflow wrap-around and gives the same bits on CPU, CUDA and under compile.
"""

from __future__ import annotations

import torch

from dgbatch.generation import row_seed

MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35  # murmur3 fmix32 constants
_GOLDEN = 0x9E3779B9

# Streams: which kind of draw, so the same (canvas, step, position) gives independent numbers.
STREAM_INIT = 0  # the canvas's initial uniform tokens
STREAM_SAMPLE = 1  # the uniform that picks the denoiser's token (inverse CDF)
STREAM_RENOISE = 2  # the uniform tokens that replace rejected positions


def row_key(job_seed: int, row_id: str) -> tuple[int, int]:
    """A row's 63-bit seed split into two 32-bit halves (what the device hash consumes)."""
    s = row_seed(job_seed, row_id)
    return s & MASK32, s >> 32


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32, split in 16-bit halves so no product reaches 2**63."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def _fmix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 13)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def hash_bits(keys: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, stream: int, length: int) -> torch.Tensor:
    """32 random bits per (row, position).

    keys: [N, 2] int64 (row_key halves); canvas, step: [N] int64; returns [N, length] int64 in [0, 2**32).
    """
    pos = torch.arange(length, device=keys.device, dtype=torch.int64)  # [L]
    h = _fmix(keys[:, 0] ^ _GOLDEN)
    h = _fmix(h ^ keys[:, 1])
    h = _fmix(h ^ (canvas & MASK32))
    h = _fmix(h ^ ((step * 8 + stream) & MASK32))  # [N]
    return _fmix(h[:, None] ^ _mul32(pos[None, :] + 1, _GOLDEN))  # [N, L]


def uniform(keys: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, stream: int, length: int) -> torch.Tensor:
    """Uniforms in (0, 1), 24-bit resolution, fp32: [N, length]."""
    bits = hash_bits(keys, canvas, step, stream, length) >> 8
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def random_tokens(
    keys: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, stream: int, length: int, vocab_size: int
) -> torch.Tensor:
    """Uniform token ids in [0, vocab_size): [N, length] int64 (multiply-shift, no modulo bias to speak of)."""
    return (hash_bits(keys, canvas, step, stream, length) * vocab_size) >> 32
