"""4-bit weights with 16-bit activations from a quantized checkpoint (`w4a16`: compressed-
tensors pack-quantized, AWQ, GPTQ), each group's scale and zero point as the file has them.

On CPU the codes are packed for torch's int4 kernel (`kernels.int4_linear`, bf16 activations);
on CUDA they stay in compressed-tensors' int32 layout, which the Triton W4A16 GEMM
(`kernels.w4a16_linear`) dequantizes in registers. A GPTQ act-order layer permutes its input
once per call (`Int4Weight.perm`). Token embedding and LM head stay floats (`vocab_method`).
"""
from functools import partial

import torch
from torch import nn

import kernels
from engine.layers.quantization.base import LinearMethod, register_int4
from engine.layers.quantization.checkpoint import Int4Weight, pack_nibbles
from engine.layers.quantization.dense import DenseMethod


class W4A16Method(LinearMethod):
    name = "w4a16"

    def create_weights(self, layer, in_features, out_features):
        # Stands for the checkpoint's weight in the loader's accounting; the codes live in
        # `int4_shards` until every shard is in, then packed for the device's kernel.
        layer.weight = nn.Parameter(torch.empty(out_features, 0, dtype=torch.uint8),
                                    requires_grad=False)
        layer.weight.weight_loader = partial(self._load, layer)
        layer.int4_shards = {}

    def _load(self, layer, param, loaded, shard_id=None):
        if not isinstance(loaded, Int4Weight):
            raise ValueError(f"quantization={self.name!r} needs a 4-bit checkpoint; a float "
                             f"weight came for a layer of shape {tuple(param.shape)}")
        layer.int4_shards[shard_id or 0] = loaded

    def dtype_note(self, dtype):
        if dtype != torch.bfloat16:
            return (f"the CPU int4 kernel takes bfloat16 activations: "
                    f"{str(dtype).removeprefix('torch.')} inputs are cast at each call")
        return None

    def process_weights_after_loading(self, layer):
        w = Int4Weight.cat([layer.int4_shards[i] for i in sorted(layer.int4_shards)])
        del layer.int4_shards
        device = layer.weight.device
        layer.group_size, layer.input_perm = w.group_size, _to(w.perm, device)
        if kernels.uses_triton(layer.weight):
            layer.qweight = pack_nibbles(w.codes).to(device)
            layer.scales = w.scales.to(device, layer.params_dtype)
            symmetric = bool((w.zero_points == 8).all())
            layer.zero_points = None if symmetric else w.zero_points.to(device)
        else:
            register_int4(layer, w.codes, w.scales, -w.scales * w.zero_points)

    def apply(self, layer, x, bias):
        if layer.input_perm is not None:
            x = x[..., layer.input_perm]
        if kernels.uses_triton(x):
            y = kernels.w4a16_linear(x, layer.qweight, layer.scales, layer.zero_points,
                                     layer.group_size)
        else:
            y = kernels.int4_linear(x, layer.int4_packed, layer.int4_scales_and_zeros,
                                    layer.group_size)
        return y if bias is None else y + bias

    def vocab_method(self):
        return DenseMethod()


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)
