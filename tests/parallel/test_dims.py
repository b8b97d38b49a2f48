"""Degree validation (from configs alone) and the sharding math at world sizes the CPU tests cannot
spawn (4 and 8 ranks): each rank's partial sums, added over the ranks, give the whole module's output."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig

from dgbatch.config import ConfigError, load_config
from dgbatch.engine.attention import project_qkv, sdpa
from dgbatch.parallel import Mesh, ParallelConfigError, ParallelDims, parallelize
from dgbatch.parallel.dims import kv_head_range
from dgbatch.toy.model import toy_config

REPO = Path(__file__).resolve().parents[2]


def _text(**kw) -> DiffusionGemmaTextConfig:
    """8 q heads, 4 KV heads on sliding layers, 2 (and no v_proj) on full ones, 8 experts top-2."""
    base = {
        "vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 8,
        "num_key_value_heads": 4, "num_global_key_value_heads": 2, "head_dim": 8, "global_head_dim": 16,
        "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8, "num_experts": 8, "top_k_experts": 2,
        "moe_intermediate_size": 48, "max_position_embeddings": 256,
    }  # fmt: skip
    return DiffusionGemmaTextConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "dims, message",
    [
        (ParallelDims(tp=3), "parallel.tp_size=3 does not divide num_attention_heads=8"),
        (ParallelDims(ep=3), "parallel.ep_size=3 does not divide num_experts=8"),
        (ParallelDims(tp=16), "parallel.tp_size=16 does not divide num_attention_heads=8"),
        (ParallelDims(tp=32, ep=1), "does not divide moe_intermediate_size=48"),
    ],
)
def test_degree_errors_name_the_numbers(dims, message):
    with pytest.raises(ParallelConfigError, match=message):
        dims.check_model(_text())


def test_kv_heads_that_can_be_neither_split_nor_replicated():
    text = _text(num_attention_heads=12, num_key_value_heads=4, intermediate_size=96)
    with pytest.raises(ParallelConfigError, match="tp_size=6 can neither split nor replicate the 4 KV heads of the sliding"):
        ParallelDims(tp=6).check_model(text)


def test_ep_without_experts():
    with pytest.raises(ParallelConfigError, match="ep_size=2 but the model has no experts"):
        ParallelDims(ep=2).check_model(_text(num_experts=None, top_k_experts=None, moe_intermediate_size=None))


def test_valid_degrees_pass():
    for dims in (ParallelDims(), ParallelDims(tp=2), ParallelDims(tp=4, ep=2), ParallelDims(tp=8, ep=8)):
        dims.check_model(_text())
    ParallelDims(tp=4).check_model(toy_config(102).get_text_config())  # toy: 4 heads, 2 / 1 KV heads


def test_kv_head_ranges():
    assert [kv_head_range(8, 4, 2, r) for r in range(2)] == [(0, 2), (2, 4)]  # split
    assert [kv_head_range(8, 2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]  # replicated by pairs
    assert [kv_head_range(4, 1, 2, r) for r in range(2)] == [(0, 1), (0, 1)]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.tp_size=2", "engine.backend=reference"], "need engine.backend=engine"),
        (["parallel.tp_size=2", "replicas.num_gpus=0.5"], "replicas.num_gpus=0.5 is per rank"),
        (["parallel.ep_size=2", "engine.compile=true"], "engine.compile is not supported"),
        (["parallel.tp_size=2", "parallel.backend=nccl"], "parallel.backend=nccl needs GPUs"),
        (["parallel.tp_size=0"], "parallel.tp_size: Input should be greater than 0"),
    ],
)
def test_job_config_checks_what_a_parallel_replica_needs(overrides, message):
    base = {"model": {"path": "m"}, "input": {"path": "i"}, "output": {"path": "o"}}
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides, base=base)


# ---- sharding math, no processes: Mesh.local's collectives are no-ops, so modules return partials ----


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    vision = {"model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8}
    return DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(text_config=_text(), vision_config=vision)).eval()


def _module_outputs(m, stack: str, i: int, x, cos, sin, route) -> dict[str, torch.Tensor]:
    """Layer i's attention, dense MLP and experts outputs (a rank's partial sums under Mesh.local)."""
    layer = (m.model.encoder.language_model.layers if stack == "encoder" else m.model.decoder.layers)[i]
    mask = torch.ones(x.shape[0], 1, x.shape[1], x.shape[1], dtype=torch.bool)
    flat = x.reshape(-1, x.shape[-1])
    attn = layer.self_attn
    q, k, v = (t.transpose(1, 2) for t in project_qkv(attn, x, cos, sin))  # heads first
    return {
        "attention": attn.o_proj(sdpa(attn, q, k, v, mask).transpose(1, 2).reshape(*x.shape[:2], -1)),
        "mlp": layer.mlp(x),
        "experts": layer.experts(flat, route[1], route[0]),
    }


@pytest.mark.parametrize("dims", [ParallelDims(2, 2), ParallelDims(4, 1), ParallelDims(1, 4), ParallelDims(4, 2)],
                         ids=str)
@torch.no_grad()
def test_partial_sums_over_ranks_equal_the_whole_module(model, dims):
    ranks = []
    for r in range(dims.world):
        m = copy.deepcopy(model)
        parallelize(m, Mesh.local(dims, r))
        ranks.append(m)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(5)[None].expand(3, -1)
    text = model.config.get_text_config()
    tp_groups = [range(e * dims.tp, (e + 1) * dims.tp) for e in range(dims.ep)]  # each holds the same attention
    sum_over = {"attention": tp_groups, "mlp": tp_groups, "experts": [range(dims.world)]}
    for stack in ("encoder", "decoder"):
        for i in range(text.num_hidden_layers):
            cos, sin = model.model.decoder.rotary_emb(x, positions, text.layer_types[i])
            _, weights, index = model.model.decoder.layers[i].router(x.reshape(-1, 64))
            args = (stack, i, x, cos, sin, (weights, index))
            whole = _module_outputs(model, *args)
            parts = [_module_outputs(m, *args) for m in ranks]
            for name, groups in sum_over.items():
                for group in groups:
                    diff = (sum(parts[r][name] for r in group) - whole[name]).abs().max().item()
                    assert diff < 1e-5, f"{stack} layer {i} {name}: partial sums differ by {diff:.2e}"


def test_parallelize_keeps_the_encoder_decoder_ties_and_splits_the_weights(model):
    dims = ParallelDims(2, 2)
    m = copy.deepcopy(model)
    parallelize(m, Mesh.local(dims, 3))
    enc, dec = m.model.encoder.language_model.layers[1], m.model.decoder.layers[1]
    assert enc.self_attn.q_proj.weight is dec.self_attn.q_proj.weight
    assert enc.experts.experts.gate_up_proj is dec.experts.experts.gate_up_proj
    assert dec.self_attn.q_proj.out_features == 4 * 16  # 8 heads / tp 2, global head_dim 16
    assert dec.self_attn.k_proj.out_features == 1 * 16  # 2 KV heads / tp 2
    assert dec.self_attn.v_proj is None
    assert tuple(dec.experts.experts.gate_up_proj.shape) == (4, 2 * 24, 64)  # experts 8/ep 2, [gate; up] 48/tp 2
    assert (dec.experts.first, dec.experts.count) == (4, 4)  # rank 3 = (ep 1, tp 1)
    whole = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in m.parameters()) < whole


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("diffusiongemma-26b-a4b-*.yaml")), ids=lambda p: p.name)
def test_the_real_checkpoint_configs_fit_its_shape(path):
    """The shipped 26B-A4B configs load, and their degrees can shard the real shape."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import shapes

    cfg = load_config(path)
    ParallelDims(cfg.parallel.tp_size, cfg.parallel.ep_size).check_model(shapes.config().get_text_config())
    assert cfg.model.dtype == "bfloat16" and cfg.replicas.num_gpus == 1
