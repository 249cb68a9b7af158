"""A mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router scores the experts per token, the
top k run and their outputs are summed with the router's softmax weights (renormalized over
the k, or not: Qwen3-MoE's `norm_topk_prob`).

Dense experts are stacked (`w13[E, 2I, H]` gate|up, `w2[E, H, I]`), loaded expert by expert
through the parameters' weight loaders (shard `(expert, part)`), for the fused kernels
(`kernels.fused_moe`: Triton on CUDA). Under a quantized linear method each expert is a gated
MLP of that method's linears instead, with its kernels and their measured plan (one plan per
shape serves every expert), and the same grouping runs them (`kernels.grouped_experts`).
"""
import torch
from torch import nn

import kernels
from engine.layers.linear import Linear
from engine.layers.mlp import GatedMLP, gated_activation
from engine.layers.quantization import LinearMethod, get_linear_method


class MoEMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool, hidden_act: str, method: LinearMethod):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.act = gated_activation(hidden_act)
        self.intermediate_size = intermediate_size
        self.gate = Linear(hidden_size, num_experts, method=get_linear_method("none"))
        self.experts = None
        if method.name != "none":
            self.experts = nn.ModuleList(
                GatedMLP(hidden_size, intermediate_size, hidden_act, method)
                for _ in range(num_experts))
            return
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size),
                               requires_grad=False)
        self.w13.weight_loader = self.w2.weight_loader = self._load_expert

    def _load_expert(self, param: nn.Parameter, loaded: torch.Tensor,
                     shard: tuple[int, int | None]) -> None:
        """Expert `shard[0]`'s weight; `shard[1]` is 0 (gate) or 1 (up) within `w13`."""
        expert, part = shard
        rows = param.data[expert]
        if part is not None:
            rows = rows.narrow(0, part * self.intermediate_size, self.intermediate_size)
        rows.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).float().softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        if self.experts is None:
            return kernels.fused_moe(x, self.w13, self.w2, weights, experts, self.act)
        return kernels.grouped_experts(x, weights, experts, len(self.experts),
                                       lambda expert, rows: self.experts[expert](rows))
