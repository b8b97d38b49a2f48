"""transformers' DiffusionGemma sampler, batched per row, in two fp32 [N, C, V] tensors at most.

Per denoising step and row, as in `DiffusionGemmaGenerationMixin._denoising_step`:
  1. temperature from the row's own step: t_min + (t_max - t_min) * remaining / max_steps
     (`LinearTemperatureScheduleLogitsProcessor`; `remaining` counts down from max_steps to 1);
  2. the denoiser's token ~ softmax(logits / t) (inverse CDF on a per-row uniform instead of
     `torch.multinomial` on the global generator: the same distribution);
  3. argmax canvas of logits / t, the candidate committed canvas;
  4. `EntropyBoundSampler`: accept the lowest-entropy tokens while sum - max <= entropy_bound,
     renoise the others with uniform random tokens;
  5. `StableAndConfidentStoppingCriteria`: stop when the argmax canvas equals the last
     `stability_threshold` ones and the mean token entropy is below `confidence_threshold`;
  6. logits / t are the next step's self-conditioning input, kept as soft embeddings
     softmax(logits / t) @ E [N, C, hidden] rather than as [N, C, V] logits.

Memory: the logits are scaled and normalised in place and one softmax buffer is allocated (its CDF
is computed in place); the entropy is a batched dot product, so no third [N, C, V] buffer exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dgbatch.generation import SamplingParams


def temperature(steps_done: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Per-row temperature [N] fp32 from steps done in the current canvas [N].

    Bitwise what `LinearTemperatureScheduleLogitsProcessor` computes for cur_step = max - done.
    """
    cur_step = (params.max_denoising_steps - steps_done).to(torch.int32)
    return params.t_min + (params.t_max - params.t_min) * (cur_step / params.max_denoising_steps)


@dataclass
class Draft:
    """What one step's logits give, per row and canvas position."""

    argmax: torch.Tensor  # [N, C] int64
    denoised: torch.Tensor  # [N, C] int64, sampled tokens
    entropy: torch.Tensor  # [N, C] fp32
    soft: torch.Tensor  # [N, C, hidden], next step's self-conditioning embeddings


def draft(logits: torch.Tensor, temp: torch.Tensor, u: torch.Tensor, runner) -> Draft:
    """Scale, sample, argmax, entropy and self-conditioning from raw logits [N, C, V] fp32 (consumed).

    temp: [N] fp32; u: [N, C] uniforms in (0, 1); runner gives `soft_embedding` and the model dtype.
    The entropy is computed as `torch.distributions.Categorical(logits=...)` computes it (log-softmax
    by subtracting logsumexp), so acceptance and stopping decisions agree with transformers' even
    where its fp32 rounding decides them.
    """
    x = logits.div_(temp[:, None, None])  # [N, C, V], processed logits, in place
    argmax = x.argmax(dim=-1)  # [N, C]
    soft = None
    if runner.dtype != torch.float32:
        # transformers casts the processed logits to the embedding dtype before its softmax
        soft = runner.soft_embedding(x.to(runner.dtype).softmax(-1, dtype=torch.float32))
    x.sub_(torch.logsumexp(x, dim=-1, keepdim=True))  # log-probabilities (logsumexp's temporary is freed)
    p = torch.softmax(x, dim=-1)  # [N, C, V], the second (and last) fp32 buffer
    if soft is None:
        soft = runner.soft_embedding(p)
    n, c, v = p.shape
    entropy = -torch.bmm(p.view(n * c, 1, v), x.view(n * c, v, 1)).view(n, c)  # -sum p log p, no temporary
    cdf = p.cumsum_(dim=-1)  # [N, C, V], in place
    target = (u * cdf[..., -1]).unsqueeze(-1)  # [N, C, 1]
    denoised = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=v - 1)
    return Draft(argmax=argmax, denoised=denoised, entropy=entropy, soft=soft)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, the way `draft` computes it: [..., V] -> [...]."""
    x = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return -(x.softmax(-1) * x).sum(-1)


def accept_mask(entropy: torch.Tensor, entropy_bound: float) -> torch.Tensor:
    """`EntropyBoundSampler.accept_canvas`'s mask: the k lowest-entropy tokens with sum - max <= bound.

    entropy: [N, C] -> [N, C] bool.
    """
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    selected = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= entropy_bound
    return torch.scatter(torch.zeros_like(selected), -1, order, selected)


def renoise(denoised: torch.Tensor, accepted: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Next canvas: accepted positions take the denoiser's token, the others fresh noise. All [N, C].

    (`accept_canvas` keeps the current token where not accepted, but `renoise_canvas` then replaces
    exactly those positions, so the current canvas never survives a step.)"""
    return torch.where(accepted, denoised, noise)


def stop_and_update_history(
    history: torch.Tensor, argmax: torch.Tensor, entropy: torch.Tensor, params: SamplingParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """`StableAndConfidentStoppingCriteria` per row.

    history: [N, K, C] the last K argmax canvases (-1 when fewer steps ran), K = stability_threshold;
    returns (stop [N] bool, new history [N, K, C]).
    """
    stable = (history == argmax[:, None, :]).all(dim=-1).all(dim=-1)  # [N]; True when K == 0
    history = torch.cat([history[:, 1:], argmax[:, None, :]], dim=1) if history.shape[1] else history
    confident = entropy.mean(dim=-1) < params.confidence_threshold
    return stable & confident, history
