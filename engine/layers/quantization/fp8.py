"""fp8 (e4m3) weights with a scale per output channel or tensor, from a quantized checkpoint
(`fp8`: compressed-tensors float-quantized).

On CUDA activations are quantized to fp8 per token at each call and multiplied by
`torch._scaled_mm` (Hopper's fp8 tensor cores, `kernels.fp8_linear`). A CPU has no fp8
arithmetic: there the weight is dequantized once at load into the activations' dtype and
served dense (fp8's memory saving is lost; the weights' values are the checkpoint's).
"""
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

import kernels
from engine.layers.quantization.base import LinearMethod
from engine.layers.quantization.checkpoint import load_channel_weight
from engine.layers.quantization.dense import DenseMethod


class Fp8Method(LinearMethod):
    name = "fp8"

    def create_weights(self, layer, in_features, out_features):
        layer.weight = nn.Parameter(torch.empty(out_features, in_features,
                                                dtype=torch.float8_e4m3fn), requires_grad=False)
        layer.weight.weight_loader = partial(self._load, layer)
        layer.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32),
                              persistent=False)

    def _load(self, layer, param, loaded, shard_id=None):
        load_channel_weight(self.name, torch.float8_e4m3fn, layer, param, loaded, shard_id)

    def process_weights_after_loading(self, layer):
        if not kernels.uses_triton(layer.weight):
            dense = layer.weight.float() * layer.weight_scale[:, None]
            layer.weight = nn.Parameter(dense.to(layer.params_dtype), requires_grad=False)

    def apply(self, layer, x, bias):
        if layer.weight.dtype == torch.float8_e4m3fn:
            y = kernels.fp8_linear(x, layer.weight, layer.weight_scale)
            return y if bias is None else y + bias
        return F.linear(x, layer.weight, bias)

    def vocab_method(self):
        return DenseMethod()
