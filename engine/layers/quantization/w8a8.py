"""int8 weights per output channel with dynamic per-token int8 activations, as a quantized
checkpoint has them (`w8a8`: compressed-tensors int-quantized, SmoothQuant-style).

The checkpoint's codes and scales are loaded as they are, unrotated (`Int8Method` with a
rotation block of 1), so both of its CPU kernels serve them; which runs at which step size is
measured per machine as for `--quantization int8`. On CUDA one kernel runs, the Triton int8
GEMM (`kernels.w8a8_linear`), and q|k|v and gate|up take their input already quantized by the
RMSNorm before them (`kernels.rms_norm_quant_int8`, `kernels.w8a8_gemm`). Token embedding and
LM head stay floats.
"""
import torch

import kernels
from engine.layers.quantization.base import QuantizedTokens
from engine.layers.quantization.checkpoint import load_channel_weight
from engine.layers.quantization.dense import DenseMethod
from engine.layers.quantization.int8 import Int8Method


class W8A8Method(Int8Method):
    name = "w8a8"
    takes_int8_tokens = True
    integer_kernels = False  # its LM head is a dense GEMM

    def __init__(self):
        super().__init__(code_max=127)  # a checkpoint's codes span the whole int8 range

    def create_weights(self, layer, in_features, out_features):
        super().create_weights(layer, in_features, out_features)
        layer.rotation_block = 1

    def _load(self, layer, param, loaded, shard_id=None):
        load_channel_weight(self.name, torch.int8, layer, param, loaded, shard_id)

    def check_supported(self, device, dtype):
        pass  # CPU kernels and a Triton one

    def candidates(self, layer):
        return {} if kernels.uses_triton(layer.weight) else super().candidates(layer)

    def apply(self, layer, x, bias):
        if layer.kernel_plan is not None:  # the CPU kernels'
            return super().apply(layer, x, bias)
        if isinstance(x, QuantizedTokens):  # quantized by the RMSNorm before the layer
            y = kernels.w8a8_gemm(x.codes, x.scales, layer.weight, layer.weight_scale, x.dtype)
        else:
            y = kernels.w8a8_linear(x, layer.weight, layer.weight_scale)
        return y if bias is None else y + bias

    def vocab_method(self):
        return DenseMethod()
