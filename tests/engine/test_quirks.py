"""transformers' DiffusionGemma behaviours the engine reproduces on purpose, one test each.

Each names the one place in dgbatch/engine where the behaviour is handled.
"""

from __future__ import annotations

import torch

from dgbatch.engine.attention import project_qkv
from dgbatch.engine.cache import SlotKVCache, layer_specs
from dgbatch.engine.outputs import to_generation
from dgbatch.engine.sampler import draft
from dgbatch.generation import Request, SamplingParams
from dgbatch.reference import ReferenceBackend
from tests.engine.helpers import TransformersOracle, random_model


def test_sliding_layers_keep_window_minus_one_tokens():
    """cache.py: transformers' DynamicSlidingWindowLayer keeps W - 1 tokens, so the decoder's
    sliding layers see W - 1 committed tokens plus the canvas; the slot ring has W - 1 entries."""
    model = random_model(sliding_window=12)
    oracle = TransformersOracle(model, [list(range(3, 40))])
    sliding = [i for i, s in enumerate(layer_specs(model)) if s.sliding]
    assert oracle.cache.layers[sliding[0]].keys.shape[-2] == 12 - 1
    cache = SlotKVCache(
        layer_specs(model), 1, capacity=64, sliding_window=12, canvas=16, dtype=torch.float32, device="cpu"
    )
    assert cache.ring == 12 - 1


def test_full_attention_values_are_the_key_projection():
    """attention.py: full-attention layers have no v_proj; V = v_norm(k_proj(x)) (before k_norm/RoPE)."""
    model = random_model()
    layer = next(l for l in model.model.decoder.layers if not l.self_attn.is_sliding)
    attn = layer.self_attn
    assert attn.v_proj is None
    x = torch.randn(2, 5, model.config.text_config.hidden_size)
    pos = torch.arange(5)[None].expand(2, -1)
    cos, sin = model.model.decoder.rotary_emb(x, pos, "full_attention")
    _, k, v = (t.transpose(1, 2) for t in project_qkv(attn, x, cos, sin))
    expected = attn.v_norm(attn.k_proj(x).view(2, 5, -1, attn.head_dim)).transpose(1, 2)
    assert torch.equal(v, expected) and not torch.equal(k, v)


def test_self_conditioning_softmax_runs_on_logits_cast_to_the_embedding_dtype():
    """sampler.py: `_denoising_step` casts processed logits to the embedding dtype (bf16 here)
    before the decoder's softmax; the engine's soft embeddings follow that rounding."""

    class Bf16Runner:
        dtype = torch.bfloat16
        weight = torch.randn(40, 8, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))

        def soft_embedding(self, probs):
            return probs.to(self.dtype) @ self.weight

    x = torch.randn(3, 16, 40) * 30
    d = draft(x.clone(), torch.ones(3), torch.full((3, 16), 0.5), Bf16Runner())
    expected = Bf16Runner().soft_embedding(x.to(torch.bfloat16).softmax(-1, dtype=torch.float32))
    assert torch.equal(d.soft, expected)


def test_outputs_and_tokens_per_forward_match_the_reference_definitions():
    """outputs.py: pad after the first EOS of the last canvas; tokens_per_forward = non-pad tokens of
    all canvases (even past max_new_tokens, excluding pads the model produced) / decoder forwards."""
    params = SamplingParams(40, 8, 0.1, 0.1, 0.2, 1, 0.01, 0)  # 40 tokens -> 3 canvases of 16
    pad, eos = 0, {1, 7}
    ref = ReferenceBackend.__new__(ReferenceBackend)
    ref.params, ref.pad_id, ref.eos_ids = params, pad, eos
    cases = {
        "eos in canvas 2": [[5] * 16, [4, 0, 6, 7, 9, 9] + [3] * 10],
        "eos past max_new_tokens": [[5] * 16, [6] * 16, [2] * 9 + [1] + [8] * 6],
        "no eos": [[5] * 16, [0] * 16, [9] * 16],
    }
    for name, canvases in cases.items():
        forwards = 13
        ours = to_generation(name, canvases, forwards, params, pad, eos)
        # what generate returns: the finishing canvas padded after its first EOS
        flat = [t for c in canvases for t in c]
        cut = next((i + 1 for i, t in enumerate(flat) if t in eos), len(flat))
        seq = flat[:cut] + [pad] * (len(flat) - cut)
        tpf = sum(t != pad for t in seq) / forwards
        theirs = ref._row(Request(name, [2]), seq, tpf)
        assert ours.token_ids == theirs.token_ids, name
        assert ours.finish_reason == theirs.finish_reason, name
        assert ours.num_decoder_forwards == theirs.num_decoder_forwards == forwards, name
        assert abs(ours.tokens_per_forward - theirs.tokens_per_forward) < 1e-12, name
    assert to_generation("x", cases["eos past max_new_tokens"], 13, params, pad, eos).finish_reason == "length"
