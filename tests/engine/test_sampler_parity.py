"""The engine's per-row sampler equals transformers' sampler classes on the same inputs."""

from __future__ import annotations

import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from dgbatch.engine import rng
from dgbatch.engine.sampler import (
    accept_mask,
    draft,
    renoise,
    stop_and_update_history,
    temperature,
    token_entropy,
)
from dgbatch.generation import SamplingParams

V, C = 50, 16


def _params(**kw) -> SamplingParams:
    base = {
        "max_new_tokens": 64,
        "max_denoising_steps": 24,
        "entropy_bound": 0.4,
        "t_min": 0.3,
        "t_max": 0.9,
        "stability_threshold": 2,
        "confidence_threshold": 0.3,
        "seed": 0,
    }
    return SamplingParams(**{**base, **kw})


def _logits(n: int, seed: int, scale: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # rows of very different sharpness, so entropies spread over several orders of magnitude
    sharp = torch.logspace(-1, 1.5, n)[:, None, None]
    return torch.randn(n, C, V, generator=g) * scale * sharp


class _FakeRunner:
    """Just what `draft` needs from a ModelRunner: the dtype and the self-conditioning embedding."""

    dtype = torch.float32

    def __init__(self):
        self.weight = torch.randn(V, 8, generator=torch.Generator().manual_seed(3))

    def soft_embedding(self, probs):
        return probs @ self.weight


def test_temperature_matches_linear_schedule_per_row():
    p = _params()
    logits = _logits(6, 0)
    steps = torch.tensor([0, 1, 5, 11, 22, 23])  # each row at its own step
    ours = logits / temperature(steps, p)[:, None, None]
    proc = LinearTemperatureScheduleLogitsProcessor(p.t_min, p.t_max, p.max_denoising_steps)
    for i, s in enumerate(steps.tolist()):
        cur = torch.tensor(p.max_denoising_steps - s, dtype=torch.int32)  # as `_denoising_step` passes it
        assert torch.equal(ours[i : i + 1], proc(None, logits[i : i + 1], cur_step=cur))


def test_entropy_matches_categorical():
    x = _logits(8, 1)
    ref = torch.distributions.Categorical(logits=x).entropy()
    d = draft(x.clone(), torch.ones(8), torch.full((8, C), 0.5), _FakeRunner())
    # same formula as Categorical (log-softmax by logsumexp), so the same fp32 rounding: the sums
    # only differ in order
    assert torch.allclose(d.entropy, ref, rtol=1e-5, atol=1e-7)
    assert torch.allclose(token_entropy(x), ref, rtol=1e-5, atol=1e-7)


def test_draft_argmax_and_self_conditioning():
    x, temp = _logits(5, 2), torch.linspace(0.3, 0.9, 5)
    runner = _FakeRunner()
    d = draft(x.clone(), temp, torch.full((5, C), 0.5), runner)
    processed = x / temp[:, None, None]
    assert torch.equal(d.argmax, processed.argmax(-1))
    # transformers' decoder: softmax(sc_logits, fp32) @ E
    assert torch.allclose(d.soft, runner.soft_embedding(processed.softmax(-1, dtype=torch.float32)), atol=1e-6)


@pytest.mark.parametrize("bound", [0.05, 0.4, 3.0])
def test_acceptance_and_renoising_match_entropy_bound_sampler(bound):
    n = 12
    logits = _logits(n, 3)
    g = torch.Generator().manual_seed(4)
    current = torch.randint(0, V, (n, C), generator=g)
    denoised = torch.randint(0, V, (n, C), generator=g)
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), C, V, 24)

    accepted_ref = sampler.accept_canvas(current, denoised, logits, cur_step=10)
    torch.manual_seed(123)
    renoised_ref = sampler.renoise_canvas(accepted_ref, cur_step=10)
    torch.manual_seed(123)
    noise = torch.randint(0, V, (n, C))  # the draw `renoise_canvas` makes

    entropy = draft(logits.clone(), torch.ones(n), torch.full((n, C), 0.5), _FakeRunner()).entropy
    mask = accept_mask(entropy, bound)
    assert torch.equal(mask, sampler.accepted_token_mask)
    assert torch.equal(torch.where(mask, denoised, current), accepted_ref)
    assert torch.equal(renoise(denoised, mask, noise), renoised_ref)


def test_stopping_matches_stable_and_confident_over_steps():
    n, steps = 6, 8
    p = _params(stability_threshold=2, confidence_threshold=0.3)
    g = torch.Generator().manual_seed(5)
    ref = StableAndConfidentStoppingCriteria(p.stability_threshold, p.confidence_threshold)
    history = torch.full((n, p.stability_threshold, C), -1, dtype=torch.long)
    base = torch.randint(0, V, (n, C), generator=g)
    for t in range(steps):
        # rows flip between a fixed canvas and a perturbed one, and between sharp and flat logits
        flip = torch.rand(n, 1, generator=g) < 0.3
        argmax = torch.where(flip, torch.randint(0, V, (n, C), generator=g), base)
        logits = _logits(n, 100 + t, scale=float(torch.rand(1, generator=g)) * 40)
        expected = ref(argmax, logits)
        stop, history = stop_and_update_history(history, argmax, token_entropy(logits), p)
        assert torch.equal(stop, expected), f"step {t}"


def test_stopping_is_per_row_when_rows_are_at_different_steps():
    """A row's stop decision depends only on its own history: run rows separately in transformers."""
    p = _params(stability_threshold=1, confidence_threshold=0.5)
    g = torch.Generator().manual_seed(6)
    seqs = [[torch.randint(0, 3, (C,), generator=g) for _ in range(5)] for _ in range(3)]
    ents = [[torch.rand(C, generator=g) for _ in range(5)] for _ in range(3)]
    # row r starts r steps late: at engine step t it is at its own step t - r
    history = torch.full((3, 1, C), -1, dtype=torch.long)
    refs = [StableAndConfidentStoppingCriteria(1, 0.5) for _ in range(3)]
    for t in range(7):
        live = [r for r in range(3) if 0 <= t - r < 5]
        for r in range(3):
            if t - r == 0:
                history[r] = -1  # a new canvas starts with an empty history
        if not live:
            continue
        rows = torch.tensor(live)
        argmax = torch.stack([seqs[r][t - r] for r in live])
        ent = torch.stack([ents[r][t - r] for r in live])
        stop, history[rows] = stop_and_update_history(history[rows], argmax, ent, p)
        for k, r in enumerate(live):
            # transformers takes logits; give it logits whose entropy is on the same side of the threshold
            logit = torch.zeros(1, C, V) if ent[k].mean() >= 0.5 else torch.eye(V)[:C][None] * 1e4
            assert bool(stop[k]) == bool(refs[r](argmax[k : k + 1], logit)[0])


def test_inverse_cdf_sampling_draws_from_softmax():
    """The denoiser's token has the distribution torch.multinomial would draw from."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1] + [0.0] * (V - 4))
    n = 4000 // C
    x = torch.log(probs.clamp_min(1e-30)).expand(n, C, V).clone()
    keys = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)], 1)
    u = rng.uniform(keys, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), rng.STREAM_SAMPLE, C)
    d = draft(x, torch.ones(n), u, _FakeRunner())
    counts = torch.bincount(d.denoised.flatten(), minlength=V).float()
    assert counts[4:].sum() == 0  # zero-probability tokens are never drawn
    expected = probs[:4] * counts.sum()
    chi2 = ((counts[:4] - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.3, chi2  # p = 0.001 with 3 degrees of freedom
