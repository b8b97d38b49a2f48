"""`parallelize(model, mesh)`: split a loaded DiffusionGemma in place into this rank's part.

The model code is transformers' and stays unaware of distribution; this step replaces weights and
modules, torchtitan-style, one small function per part:

    apply_tp_attention  q/k/v column-wise by heads (KV heads split when there are at least as many
                        as tp ranks, else each rank keeps the one its q heads read), o_proj row-wise
    apply_tp_mlp        dense MLP gate/up column-wise, down row-wise
    apply_ep_experts    experts by ep group, each expert's intermediate dim by tp rank, router
                        replicated, one all-reduce over the replica combines

Replicated: embeddings, lm_head (tied), final norm, every RMSNorm, router, self-conditioning MLP, vision
tower. The logits are therefore full on every rank and every rank runs the same sampler.

Encoder and decoder layers are distinct modules sharing their weights; each weight is sliced once
and the new modules share the slice, so the tie (and the memory) survives. Slices are copies
(`clone`), so the full weights are freed once the last module referencing them is replaced.

On a model built on the meta device the same step only computes shapes, and the `Cuts` it returns
say which slice of which source weight each new parameter is: `dgbatch.parallel.load` then reads just
those slices from the checkpoint (per-rank loading).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from dgbatch.parallel.dims import kv_head_range
from dgbatch.parallel.layers import ParallelExperts, RowParallelLinear
from dgbatch.parallel.mesh import Mesh

Cut = tuple[tuple[int, int, int], ...]  # (dim, start, length) narrowings; same-dim ones are concatenated in order
Cuts = dict[int, tuple[int, Cut]]  # id(new parameter) -> (id(source parameter), cut)


class _Slicer:
    """Cuts each source tensor once per cut: shared (tied) weights get one shared slice.

    Keyed by the source's id with a weak reference to check it (every source is alive from the start,
    so an id is never taken by another source); the slice is a copy, so the source can be freed.
    `cuts` records, for every slice made, its source's id and the cut."""

    def __init__(self):
        self.memo: dict[tuple, tuple[weakref.ref, nn.Parameter]] = {}
        self.cuts: Cuts = {}

    def __call__(self, t: torch.Tensor | None, *cut: tuple[int, int, int]) -> nn.Parameter | None:
        """t narrowed to (dim, start, length) for each cut; cuts on the same dim are concatenated
        (in order), cuts on different dims compose."""
        if t is None:
            return None
        key = (id(t), cut)
        hit = self.memo.get(key)
        if hit is None or hit[0]() is not t:
            x = t.detach()
            for dim in dict.fromkeys(d for d, _, _ in cut):
                parts = [x.narrow(d, s, n) for d, s, n in cut if d == dim]
                x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
            hit = (weakref.ref(t), nn.Parameter(x.clone(), requires_grad=False))
            self.memo[key] = hit
            self.cuts[id(hit[1])] = (id(t), cut)
        return hit[1]


def _column(linear: nn.Linear, start: int, length: int, slicer: _Slicer) -> nn.Linear:
    """Output features [start, start + length) of `linear`, as a new Linear sharing sliced weights."""
    new = nn.Linear(linear.in_features, length, bias=linear.bias is not None, device="meta")
    new.weight = slicer(linear.weight, (0, start, length))
    if linear.bias is not None:
        new.bias = slicer(linear.bias, (0, start, length))
    return new


def _row(linear: nn.Linear, start: int, length: int, group, first_rank: bool, slicer: _Slicer) -> RowParallelLinear:
    bias = None if linear.bias is None else slicer(linear.bias, (0, 0, linear.bias.shape[0]))
    return RowParallelLinear(slicer(linear.weight, (1, start, length)), bias, group, add_bias=first_rank)


def apply_tp_attention(attn: nn.Module, mesh: Mesh, slicer: _Slicer) -> None:
    """Heads [r * Hq/tp, (r+1) * Hq/tp) and the KV heads they read; o_proj row-wise over the tp group."""
    tp, r, d = mesh.dims.tp, mesh.tp_rank, attn.head_dim
    q_heads = attn.q_proj.out_features // d
    kv_heads = attn.k_proj.out_features // d
    q_local = q_heads // tp
    kv_first, kv_end = kv_head_range(q_heads, kv_heads, tp, r)
    attn.q_proj = _column(attn.q_proj, r * q_local * d, q_local * d, slicer)
    attn.k_proj = _column(attn.k_proj, kv_first * d, (kv_end - kv_first) * d, slicer)
    if attn.v_proj is not None:  # full-attention layers have none: V is K's projection
        attn.v_proj = _column(attn.v_proj, kv_first * d, (kv_end - kv_first) * d, slicer)
    attn.o_proj = _row(attn.o_proj, r * q_local * d, q_local * d, mesh.tp_group, r == 0, slicer)
    attn.num_key_value_groups = q_local // (kv_end - kv_first)  # what transformers' own forward reads


def apply_tp_mlp(mlp: nn.Module, mesh: Mesh, slicer: _Slicer) -> None:
    tp, r = mesh.dims.tp, mesh.tp_rank
    n = mlp.gate_proj.out_features // tp
    mlp.gate_proj = _column(mlp.gate_proj, r * n, n, slicer)
    mlp.up_proj = _column(mlp.up_proj, r * n, n, slicer)
    mlp.down_proj = _row(mlp.down_proj, r * n, n, mesh.tp_group, r == 0, slicer)
    mlp.intermediate_size = n


def apply_ep_experts(layer: nn.Module, mesh: Mesh, slicer: _Slicer) -> None:
    """Experts of this rank's ep group, each cut to this tp rank's slice of its intermediate dim."""
    experts = layer.experts
    dims, e, r = mesh.dims, mesh.ep_rank, mesh.tp_rank
    total, inter = experts.num_experts, experts.intermediate_dim
    count, n = total // dims.ep, inter // dims.tp
    first = e * count
    # gate_up_proj [E, 2I, hidden] holds [gate; up] along dim 1 -> [E/ep, 2I/tp, hidden]
    experts.gate_up_proj = slicer(experts.gate_up_proj, (0, first, count), (1, r * n, n), (1, inter + r * n, n))
    experts.down_proj = slicer(experts.down_proj, (0, first, count), (2, r * n, n))  # [E, hidden, I] -> [E/ep, hidden, I/tp]
    experts.num_experts, experts.intermediate_dim = count, n
    experts._is_expert_parallel = True  # transformers' implementations then skip the sentinel id
    layer.experts = ParallelExperts(experts, first, total, mesh.world_group)


def _text_layers(model) -> list[nn.Module]:
    """Encoder layer i, then decoder layer i (they share weights): a source weight is freed as soon as
    both are split, so the peak is the full model plus one layer's slices."""
    enc, dec = model.model.encoder.language_model.layers, model.model.decoder.layers
    return [layer for pair in zip(enc, dec) for layer in pair]


def parallelize(model, mesh: Mesh) -> Cuts:
    """Split `model` (a `DiffusionGemmaForBlockDiffusion`) in place into `mesh.rank`'s part; returns what was cut.

    Checks the degrees against the model first (`ParallelDims.check_model`). Idempotence is not
    supported: call it once, on the full model (loaded, or on the meta device)."""
    text = model.config.get_text_config()
    mesh.dims.check_model(text)
    slicer = _Slicer()
    for layer in _text_layers(model):
        apply_tp_attention(layer.self_attn, mesh, slicer)
        apply_tp_mlp(layer.mlp, mesh, slicer)
        if getattr(layer, "experts", None) is not None:
            apply_ep_experts(layer, mesh, slicer)
    slicer.memo.clear()
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.empty_cache()
    model._dgbatch_mesh = mesh
    return slicer.cuts


def mesh_of(model) -> Mesh | None:
    return getattr(model, "_dgbatch_mesh", None)

