"""A linear layer whose weight is dense, or dense plus a packed 4-bit copy for small steps.

The 4-bit copy (`quantization="q4"`) is read by a matrix-vector kernel that moves a quarter of
the bytes, which is what one decoding request is bound by; for more tokens the dense matmul
wins (AMX/oneDNN), so both are kept and each step picks by its number of tokens.
"""
import torch
from torch import nn
from torch.nn import functional as F

import kernels
from engine.loader import QuantizedWeight

# Steps of at most this many tokens use the int4 weight. Measured on SmolLM2-135M's 120 layer
# matrices, 2 cores with AMX: int4 vs dense bf16 at M=1: 5.5 vs 10.8 ms, M=4: 5.7 vs 10.4,
# M=8: 10.8 vs 10.6, M=32: 42 vs 13 (the int4 kernel scales linearly with M, the dense one
# hardly at all).
INT4_MAX_TOKENS = 4


class Linear(nn.Module):
    """`y = x W^T + b`.

    With an int4 copy, numerics depend on the step's token count (int4 for at most
    `INT4_MAX_TOKENS` tokens, dense bf16 above), so batch invariance holds only on the dense
    path: a request's tokens may differ slightly depending on what it is batched with.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.group_size = 0  # > 0 once an int4 copy is set
        self.register_buffer("int4_weight", None, persistent=False)
        self.register_buffer("int4_scales_and_zeros", None, persistent=False)

    def set_int4(self, q: QuantizedWeight) -> None:
        """Keep `q` packed for few-token steps; `weight` stays the dense (dequantized) copy."""
        self.int4_weight, self.int4_scales_and_zeros = kernels.pack_int4(q.codes, q.scales,
                                                                         q.zeros)
        self.group_size = q.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size and x.shape[0] <= INT4_MAX_TOKENS:
            y = kernels.int4_linear(x, self.int4_weight, self.int4_scales_and_zeros,
                                    self.group_size)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)
