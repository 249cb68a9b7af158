"""The gated MLP (`down(act(gate) * up)`) of every family, and of each expert of a MoE layer."""
import torch
from torch import nn

import kernels
from engine.layers.linear import Linear
from engine.layers.quantization import LinearMethod
from engine.parallel import TensorParallel

# config.json's `hidden_act` -> the activation over the fused gate|up projection
GATED_ACTIVATIONS = {"silu": kernels.silu_and_mul, "gelu_pytorch_tanh": kernels.gelu_tanh_and_mul}


def gated_activation(hidden_act: str):
    if hidden_act not in GATED_ACTIVATIONS:
        raise ValueError(f"unsupported MLP activation {hidden_act!r}; Tessera runs "
                         f"{', '.join(GATED_ACTIVATIONS)}")
    return GATED_ACTIVATIONS[hidden_act]


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str,
                 method: LinearMethod, tp: TensorParallel = TensorParallel()):
        super().__init__()
        self.act = gated_activation(hidden_act)
        share = tp.split(intermediate_size, "the MLP's intermediate size")
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, method=method,
                                   output_sizes=[intermediate_size] * 2,
                                   output_shards=None if tp.size == 1 else [share] * 2)
        self.down_proj = Linear(intermediate_size, hidden_size, method=method, tp=tp,
                                input_shard=None if tp.size == 1 else share)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))
