"""A mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router scores the experts per token, the
top k run and their outputs are summed with the router's softmax weights (renormalized over
the k, or not: Qwen3-MoE's `norm_topk_prob`).

The experts' weights are stacked (`w13[E, 2I, H]` gate|up, `w2[E, H, I]`) and load expert by
expert through the parameters' weight loaders (shard `(expert, part)`). Dense, they run in the
fused kernels (`kernels.fused_moe`: Triton on CUDA). Under a quantized linear method (`int8`,
or `gguf`, whose expert tensors are requantized from the file's values) they are stored as
`Int8Method` stores a linear, Hadamard-rotated int8 per output channel, and run in
`kernels.int8_moe`, which rotates and quantizes each input once for all its experts; once
loaded, W8A8 experts are repacked for oneDNN where it runs them exactly and faster. Only the
expert GEMMs are opaque to torch.compile, so a compiled decode step holds the whole layer.
"""
import torch
from torch import nn

import kernels
from engine.layers.linear import Linear
from engine.layers.mlp import gated_activation
from engine.layers.quantization import LinearMethod, get_linear_method
from engine.layers.quantization.int8 import quantize_rotated, rotation_block
from engine.layers.quantization.kernel_choice import (cache_dir, int8_weight_code_max,
                                                       integer_gemm_is_exact,
                                                       packed_if_faster,
                                                       packed_int8_gemm_is_exact)


class MoEMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool, hidden_act: str, method: LinearMethod):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.act = gated_activation(hidden_act)
        self.intermediate_size = intermediate_size
        self.gate = Linear(hidden_size, num_experts, method=get_linear_method("none"))
        self.quantized = method.name != "none"
        dtype = torch.int8 if self.quantized else None
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size,
                                            dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size,
                                           dtype=dtype), requires_grad=False)
        self.w13.weight_loader = self.w2.weight_loader = self._load_expert
        if self.quantized:
            self.register_buffer("w13_scale", torch.empty(num_experts, 2 * intermediate_size,
                                                          dtype=torch.float32), persistent=False)
            self.register_buffer("w2_scale", torch.empty(num_experts, hidden_size,
                                                         dtype=torch.float32), persistent=False)
            self.blocks = (rotation_block(hidden_size), rotation_block(intermediate_size))
            self.int8_activations = integer_gemm_is_exact()

    def _load_expert(self, param: nn.Parameter, loaded: torch.Tensor,
                     shard: tuple[int, int | None]) -> None:
        """Expert `shard[0]`'s weight; `shard[1]` is 0 (gate) or 1 (up) within `w13`."""
        if self.quantized:
            down = param is self.w2
            loaded, scale = quantize_rotated(loaded, self.blocks[down], int8_weight_code_max())
            self._rows(self.w2_scale if down else self.w13_scale, shard).copy_(scale[:, 0])
        self._rows(param.data, shard).copy_(loaded)

    def _rows(self, stacked: torch.Tensor, shard: tuple[int, int | None]) -> torch.Tensor:
        """The rows of `stacked` (a weight or its scales) that shard `(expert, part)` fills."""
        expert, part = shard
        rows = stacked[expert]
        if part is None:
            return rows
        return rows.narrow(0, part * self.intermediate_size, self.intermediate_size)

    def process_weights_after_loading(self) -> None:
        """Hand the int8 experts to `kernels.int8_experts`. Where oneDNN multiplies int8
        exactly, the CPU ops load (`packed_expert_gemm` runs packed experts) and oneDNN's
        matmul on packed weights is the faster at decode sizes (measured once per machine),
        each W8A8 expert is repacked into its blocked layout first
        (`kernels.pack_int8`, as many bytes); the stacked weights go, so `w13` or `w2` becomes
        a list of experts."""
        if not self.quantized:
            return
        for name, scales in (("w13", self.w13_scale), ("w2", self.w2_scale)):
            packed = None
            if (self.int8_activations and packed_int8_gemm_is_exact()
                    and kernels.cpu_kernels_available(cache_dir())):
                packed = packed_if_faster(getattr(self, name), scales)
            if packed is not None:
                delattr(self, name)
                setattr(self, name, nn.ParameterList(
                    nn.Parameter(w, requires_grad=False) for w in packed))
            weights = getattr(self, name)
            setattr(self, f"{name}_experts", kernels.int8_experts(
                weights if packed is None else list(weights), scales))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).float().softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        if self.quantized:
            return kernels.int8_moe(x, self.w13_experts, self.w2_experts, weights, experts,
                                    self.act, self.blocks, self.int8_activations)
        return kernels.fused_moe(x, self.w13, self.w2, weights, experts, self.act)
