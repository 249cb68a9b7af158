"""A GGUF's own weights (`--quantization gguf`, the default for GGUF files on CPU).

Layer linears stored as Q4_0/Q4_1 arrive as their 4-bit codes (`QuantizedWeight`) and are
packed for two kernels that read a quarter of bf16's bytes, which is what bounds a step of one
or a few tokens: torch's int4 kernel (`_weight_int4pack_mm_for_cpu`, bf16 activations) and,
where it builds (AVX2 and up), W4A8 (`kernels.q4_linear`: the file's blocks against int8
activations per 32-block, llama.cpp's scheme; ~1.8x the int4 kernel's speed on one AVX2 row);
the plan keeps the one it picks. Every layer also
gets the int8 weight of `Int8Method`, requantized per output channel from the file's values,
for the integer GEMMs of larger steps (or fbgemm's packed copy of it, the int8 weight then
freed where the plan reads it through fbgemm alone); 0.625 + 1 bytes per weight in all, less
than bf16's 2.
Linears of any other GGML type (Q8_0, K-quants, floats) come dequantized and are int8 only, as
are the token embedding and the LM head (`vocab_method`).
"""
from dataclasses import dataclass

import numpy as np
import torch

import kernels
from engine.layers.quantization.base import register_int4
from engine.layers.quantization.checkpoint import narrow_grouped
from engine.layers.quantization.int8 import Int8Method
from engine.layers.quantization.kernel_choice import cache_dir


@dataclass
class QuantizedWeight:
    """A 4-bit linear weight `[N, K]`: `w[n, k] = scales[n, g] * codes[n, k] + zeros[n, g]`
    with `g = k // group_size` and codes in 0..15 (GGUF Q4_1: d, m; Q4_0: d, -8d)."""
    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # float32 [N, K / group_size]
    zeros: torch.Tensor  # float32 [N, K / group_size]
    group_size: int = 32

    def dequantize(self) -> torch.Tensor:
        w = self.codes.float().unflatten(1, (-1, self.group_size))
        w = w * self.scales[..., None] + self.zeros[..., None]
        return w.flatten(1)

    def map_rows(self, fn) -> "QuantizedWeight":
        """`fn` applied to the codes, scales and zeros alike (it reorders output rows)."""
        return QuantizedWeight(fn(self.codes), fn(self.scales), fn(self.zeros), self.group_size)

    def narrow(self, dim: int, start: int, length: int) -> "QuantizedWeight":
        """Output rows, or whole blocks of input columns (a tensor-parallel rank's share)."""
        codes, (scales, zeros) = narrow_grouped(self.codes, (self.scales, self.zeros),
                                                self.group_size, dim, start, length)
        return QuantizedWeight(codes, scales, zeros, self.group_size)

    @classmethod
    def cat(cls, parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Stack along N (the output rows), as fused q|k|v and gate|up projections need."""
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in
                     ("codes", "scales", "zeros")), parts[0].group_size)


def unpack_q4(blocks: np.ndarray, has_min: bool) -> QuantizedWeight:
    """GGUF Q4_1 (`has_min`) or Q4_0 blocks `[N, K/32 * bytes]` -> codes and scales.

    A Q4_1 block is fp16 d, fp16 m, then 16 bytes whose low nibbles are values 0..15 and
    high nibbles values 16..31 (gguf/quants.py); Q4_0 has no m and means d * (q - 8).
    """
    n = blocks.shape[0]
    blocks = blocks.reshape(n, -1, 20 if has_min else 18)
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    if has_min:
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    else:
        m = -8 * d
    qs = torch.from_numpy(blocks[..., -16:].copy())
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, -1)
    return QuantizedWeight(codes, d, m)


class GGUFMethod(Int8Method):
    name = "gguf"
    gguf_types = ("Q4_0", "Q4_1")

    def read_gguf(self, data, type_name):
        return unpack_q4(data, has_min=type_name == "Q4_1")

    def create_weights(self, layer, in_features, out_features):
        super().create_weights(layer, in_features, out_features)
        layer.q4_shards = {}  # shard id -> QuantizedWeight, until packed
        layer.int4_group_size = None  # set, with `register_int4`'s buffers, once packed

    def _load(self, layer, param, loaded, shard_id=None):
        if isinstance(loaded, QuantizedWeight):
            layer.q4_shards[shard_id or 0] = loaded
            loaded = loaded.dequantize()
        super()._load(layer, param, loaded, shard_id)

    def process_weights_after_loading(self, layer):
        shards = layer.q4_shards
        if len(shards) == len(layer.output_sizes):  # every shard 4-bit: pack them together
            q = QuantizedWeight.cat([shards[i] for i in sorted(shards)])
            register_int4(layer, q.codes, q.scales, q.zeros)
            layer.int4_group_size = q.group_size
            if q.group_size == 32 and kernels.cpu_kernels_available(cache_dir()):
                layer.register_buffer("q4_blocks", kernels.pack_q4_blocks(
                    q.codes, q.scales, q.zeros), persistent=False)
        del layer.q4_shards
        super().process_weights_after_loading(layer)

    def candidates(self, layer):
        found = super().candidates(layer)
        if layer.int4_group_size is not None:
            def int4(x):
                return kernels.int4_linear(x, layer.int4_packed, layer.int4_scales_and_zeros,
                                           layer.int4_group_size)
            found["int4"] = int4
        if getattr(layer, "q4_blocks", None) is not None:
            def w4a8(x):
                return kernels.q4_linear(x, layer.q4_blocks)
            found["w4a8"] = w4a8
        return found

    def held_bytes(self, layer, names):
        """Beside the int8 weights, the int4 kernel's pack (half a byte per weight) and W4A8's
        blocks (0.625) where the plan runs them: both and the int8 weight would outweigh
        bf16 (Zen 4's fastest plan for SmolLM2's projections had W4A8 up to 4 tokens and the
        int4 kernel up to 8)."""
        return (super().held_bytes(layer, names) + 0.5 * ("int4" in names)
                + 0.625 * ("w4a8" in names))

    def release_unplanned(self, layer):
        """The int4 kernel's and W4A8's packs go where the plan does not pick them."""
        names = layer.kernel_plan.names
        if "int4" not in names and layer.int4_group_size is not None:
            layer.int4_packed = layer.int4_scales_and_zeros = None
        if "w4a8" not in names and hasattr(layer, "q4_blocks"):
            layer.q4_blocks = None
        super().release_unplanned(layer)
