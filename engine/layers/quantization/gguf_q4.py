"""GGUF Q4_0/Q4_1 (`--quantization q4`): the file's 4-bit codes, packed for few-token steps.

The loader yields a `QuantizedWeight` per layer linear. Its dequantized values fill a dense
weight, and its codes are also packed for a matrix-vector kernel that moves a quarter of the
bytes, which is what one decoding request is bound by; for more tokens the dense matmul wins
(AMX/oneDNN), so both are kept and each step picks by its number of tokens. Numerics therefore
depend on a step's token count, so batch invariance holds only above `INT4_MAX_TOKENS`: a
request's tokens may differ slightly depending on what it is batched with.
"""
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

import kernels
from engine.layers.quantization.dense import DenseMethod

# Steps of at most this many tokens use the int4 weight. Measured on SmolLM2-135M's 120 layer
# matrices, 2 cores with AMX: int4 vs dense bf16 at M=1: 5.5 vs 10.8 ms, M=4: 5.7 vs 10.4,
# M=8: 10.8 vs 10.6, M=32: 42 vs 13 (the int4 kernel scales linearly with M, the dense one
# hardly at all).
INT4_MAX_TOKENS = 4


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


class GGUFQ4Method(DenseMethod):
    """The dense weight of `DenseMethod` plus `int4_weight`, packed from the loaded shards."""
    name = "q4"
    gguf_types = ("Q4_0", "Q4_1")

    def read_gguf(self, data, type_name):
        return unpack_q4(data, has_min=type_name == "Q4_1")

    def create_weights(self, layer, in_features, out_features):
        super().create_weights(layer, in_features, out_features)
        layer.weight.weight_loader = partial(self._load, layer)
        layer.q4_shards = {}  # shard id -> QuantizedWeight, until packed
        layer.group_size = 0
        layer.register_buffer("int4_weight", None, persistent=False)
        layer.register_buffer("int4_scales_and_zeros", None, persistent=False)

    def _load(self, layer, param, loaded: QuantizedWeight, shard_id: int | None = None) -> None:
        layer.q4_shards[shard_id or 0] = loaded
        layer.load_rows(param, loaded.dequantize(), shard_id)

    def check_supported(self, device, dtype):
        if device.type != "cpu" or dtype != torch.bfloat16:
            raise ValueError(f"quantization={self.name!r} runs on CPU in bfloat16 only; got "
                             f"device {str(device)!r}, dtype {dtype}")

    def process_weights_after_loading(self, layer):
        shards = layer.q4_shards
        q = QuantizedWeight.cat([shards[i] for i in sorted(shards)])
        layer.int4_weight, layer.int4_scales_and_zeros = kernels.pack_int4(q.codes, q.scales,
                                                                           q.zeros)
        layer.group_size = q.group_size
        del layer.q4_shards

    def apply(self, layer, x, bias):
        if x.shape[0] > INT4_MAX_TOKENS:
            return super().apply(layer, x, bias)
        y = kernels.int4_linear(x, layer.int4_weight, layer.int4_scales_and_zeros,
                                layer.group_size)
        return y if bias is None else y + bias
