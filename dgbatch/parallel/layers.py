"""The modules `parallelize` swaps in: each holds its rank's slice and ends in one all-reduce.

Column-wise projections need no module of their own (a smaller `nn.Linear`); these two are the
places where partial sums meet:

- `RowParallelLinear`: input features split over a group (o_proj, the dense MLP's down_proj):
  local matmul, then all-reduce; a bias is added once (on the group's first rank).
- `ParallelExperts`: this rank's experts (and its slice of each expert's intermediate dim) behind
  transformers' own experts module; routes arrive as global expert ids, are mapped to local ids
  (others to the "not here" sentinel the experts implementations skip), and one all-reduce over the
  whole replica adds every rank's contribution.

A group of one rank does no collective, so `parallelize` at world size 1 costs only the index
remapping (set `FORCE_COLLECTIVES = True` to issue them anyway, for measurement).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

FORCE_COLLECTIVES = False


def all_reduce_(x: torch.Tensor, group) -> torch.Tensor:
    """Sum x over `group` in place (no-op without processes or, unless forced, on one rank)."""
    if group is not None and (FORCE_COLLECTIVES or dist.get_world_size(group) > 1):
        dist.all_reduce(x, group=group)
    return x


class RowParallelLinear(nn.Module):
    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group, add_bias: bool):
        super().__init__()
        self.weight = weight  # [out, in / group size]
        self.bias = bias if add_bias else None
        self.group = group
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_(F.linear(x, self.weight, self.bias), self.group)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} (local), out_features={self.out_features}"


class ParallelExperts(nn.Module):
    """Experts [first, first + count) of `num_experts`, each with this rank's intermediate slice."""

    def __init__(self, experts: nn.Module, first: int, num_experts: int, group):
        super().__init__()
        self.experts = experts  # transformers' experts module, holding only the local weights
        self.first, self.count, self.num_experts = first, experts.num_experts, num_experts
        self.group = group

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        local = top_k_index - self.first  # [T, K]
        mine = (local >= 0) & (local < self.count)
        out = self.experts(hidden_states, torch.where(mine, local, self.count), top_k_weights)  # [T, hidden]
        return all_reduce_(out, self.group)

    def extra_repr(self) -> str:
        return f"experts [{self.first}, {self.first + self.count}) of {self.num_experts}"
