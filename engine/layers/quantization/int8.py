"""int8 per output channel (`--quantization int8`), quantized at load from the checkpoint's
floats; the GGUF method builds on it.

The weight is stored Hadamard-rotated along its input dimension (`kernels.rotate`, blocks of
up to `MAX_ROTATION_BLOCK`), and each kernel rotates its input alike, so `x W^T` is unchanged:
rotation spreads the outlier channels of LLM activations (SwiGLU's output above all), which
otherwise make int8 per token cost SmolLM2 3.9% perplexity (0.66% rotated). Each row
gets one fp32 scale (`max |row| / 127`; 64 on CPUs without VNNI, see
`linear_int8_code_max` and `vocab_method`), so a shard quantizes on its own as it loads and no
float copy of the weight ever exists. Two kernels share the one int8 weight: W8A16
(`_weight_int8pack_mm`, bf16 activations, dequantized in the kernel) and W8A8 (activations
quantized per token, `torch._int_mm`'s integer dot products); which runs at which step size is
measured per machine (kernel_choice). fbgemm's int8 GEMM (activations per token too) is a
third candidate where it sums the weight codes exactly, its packed copy of the weight kept
only where a plan picks it; `kernels.i8_linear` (activations per 32-block, AVX2 and up) a
fourth, for the LM head alone (`vocab_method`). They round differently, so a request's tokens
can depend on the size of the step it runs in.
"""
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

import kernels
from engine.layers.quantization.base import LinearMethod
from engine.layers.quantization.kernel_choice import (cache_dir, fbgemm_gemm_is_exact,
                                                       int8_weight_code_max, linear_int8_code_max)

# SmolLM2 perplexity on GPL-3 (7650 tokens, prefill so w8a8 throughout) over dense 18.83:
# +1.0% with blocks of up to 256, +0.7% up to 512 (its 1536-wide down projection); the
# rotation's cost grows with the block.
MAX_ROTATION_BLOCK = 512
# A block's odd factor (SmolLM2's 576 = 9 x 64) rotates by a small Hartley matrix (kernels):
# the full 576 (not 64) and 1536 (not 512) take the perplexity cost from +0.79% to +0.66%, and
# with the +-64 weight codes of CPUs without VNNI from +1.02% to +0.47%.
MAX_ODD_FACTOR = 15
# The candidates that multiply by `layer.weight` itself.
RAW_WEIGHT_KERNELS = frozenset({"w8a16", "w8a8", "w8a8-blocks"})


def rotation_block(in_features: int) -> int:
    """The largest power of two up to `MAX_ROTATION_BLOCK` that divides `in_features`, times
    its odd factor where that is at most `MAX_ODD_FACTOR`."""
    power = min(in_features & -in_features, MAX_ROTATION_BLOCK)
    odd = in_features // (in_features & -in_features)
    return power * odd if odd <= MAX_ODD_FACTOR else power


def quantize_rotated(w: torch.Tensor, block: int, code_max: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight `[N, K]` as this format stores it: rotated along K in blocks of `block`,
    then int8 codes within `+-code_max` (what this CPU's integer GEMMs sum exactly) and an fp32
    scale `[N, 1]` per row."""
    return kernels.quantize_int8_rows(kernels.rotate(w.float(), block), code_max)


class Int8Method(LinearMethod):
    name = "int8"
    integer_kernels = True

    def __init__(self, code_max: int | None = None, block_activations: bool = False):
        """`code_max`: the weights' largest code; by default `linear_int8_code_max`, the range
        that this CPU's fastest exact int8 GEMM takes. `block_activations` offers
        `w8a8-blocks` (`vocab_method` does)."""
        self._code_max = code_max
        self.block_activations = block_activations

    @property
    def code_max(self) -> int:
        return self._code_max or linear_int8_code_max()

    def create_weights(self, layer, in_features, out_features):
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8),
                                    requires_grad=False)
        layer.weight.weight_loader = partial(self._load, layer)
        layer.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32),
                              persistent=False)
        layer.rotation_block = rotation_block(in_features)
        layer.kernel_plan = None  # set by plan_layer_kernels once every layer is loaded
        layer.fbgemm_weight = None  # packed where fbgemm's GEMM is a candidate

    def _load(self, layer, param, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        codes, scale = quantize_rotated(loaded, layer.rotation_block, self.code_max)
        layer.load_rows(param, codes, shard_id)
        layer.load_rows(layer.weight_scale, scale[:, 0], shard_id)

    def check_supported(self, device, dtype):
        if device.type != "cpu":
            raise ValueError(f"quantization={self.name!r} has CPU kernels only; got device "
                             f"{str(device)!r}")

    def dtype_note(self, dtype):
        if dtype != torch.bfloat16:
            dtype = str(dtype).removeprefix("torch.")
            return (f"the int4 and w8a16 kernels take bfloat16 activations: {dtype} inputs are "
                    f"cast to bfloat16 and back at each call")
        return None

    def candidates(self, layer):
        """Outputs in the kernel's own dtype (bf16, fp32): `apply` casts them to x's, while
        `logits` keeps W8A8's fp32 (the LM head's cast to bf16 and the sampler's back to fp32
        were most of a 32-row SmolLM2 step's 4.8 ms of copies; 1.2 ms remain)."""
        scale_bf16 = layer.weight_scale.to(torch.bfloat16)

        def w8a16(x):
            return kernels.int8_weight_linear(_rotated(layer, x), layer.weight, scale_bf16)

        def w8a8(x):
            return kernels.int8_linear(_rotated(layer, x), layer.weight, layer.weight_scale)

        found = {"w8a16": w8a16, "w8a8": w8a8}
        if (self.block_activations and layer.weight.shape[1] % 32 == 0
                and kernels.cpu_kernels_available(cache_dir())):
            def w8a8_blocks(x):
                return kernels.i8_linear(_rotated(layer, x), layer.weight, layer.weight_scale)
            found["w8a8-blocks"] = w8a8_blocks
        if fbgemm_gemm_is_exact(self.code_max):
            # Released with the int8 weight where the plan does not pick it.
            layer.fbgemm_weight = kernels.pack_int8_fbgemm(layer.weight, layer.weight_scale)

            def w8a8_fbgemm(x):
                return kernels.fbgemm_int8_linear(_rotated(layer, x), layer.fbgemm_weight)
            found["w8a8-fbgemm"] = w8a8_fbgemm
        return found

    def release_unplanned(self, layer):
        """fbgemm's packed weight goes where the plan does not pick it, and the int8 weight
        where no kernel of the plan reads it (int4 runs on its own codes, fbgemm on its own
        copy) and no token's row is looked up in it (`embed`): the GGUF method would otherwise
        hold 1.625 + 1 bytes per weight, more than bf16's 2. A meta tensor keeps its shape."""
        if "w8a8-fbgemm" not in layer.kernel_plan.names:
            layer.fbgemm_weight = None
        if hasattr(layer, "embed") or not RAW_WEIGHT_KERNELS.isdisjoint(layer.kernel_plan.names):
            return
        layer.weight = nn.Parameter(layer.weight.to("meta"), requires_grad=False)

    def held_bytes(self, layer, names):
        """The int8 weight (1 byte) where a kernel of the plan reads it or tokens are looked up
        in it, and fbgemm's copy of it (1 more) where the plan runs fbgemm."""
        raw = hasattr(layer, "embed") or not RAW_WEIGHT_KERNELS.isdisjoint(names)
        return float(raw) + float("w8a8-fbgemm" in names)

    def reference(self, layer, x):
        """fp32 `x W^T` on the dequantized weight (rotated, with x rotated alike in fp32)."""
        return F.linear(_rotated(layer, x, kernels.rotate).float(),
                        layer.weight.float() * layer.weight_scale[:, None])

    def apply(self, layer, x, bias):
        y = layer.kernel_plan(x).to(x.dtype)
        return y if bias is None else y + bias

    def logits(self, layer, x):
        return layer.kernel_plan(x).float()

    def vocab_method(self):
        """The token embedding and LM head take `torch._int_mm`'s range
        (`int8_weight_code_max`: +-127 but where `_int_mm` itself saturates), not fbgemm's:
        their logits feed sampling as they are. On AVX2, +-64 codes there cost SmolLM2 0.22%
        perplexity (18.86 -> 18.91) and moved a greedy token past tests/test_quantized.py's
        margin; the head then runs W8A16, fbgemm being inexact at +-127 there.
        It alone is offered `w8a8-blocks`: SmolLM2's head of one row takes 1.8 ms there
        rather than W8A16's 4.5, with perplexity +0.08% over dense (not +0.19%), while on
        the layer linears of a random tiny MoE (tests/test_gguf_families.py) its rounding
        moved a greedy token 1.34 nats where W8A16's moved it 0.14."""
        return Int8Method(int8_weight_code_max(), block_activations=True)

    def embed(self, layer, token_ids):
        rows = layer.weight[token_ids].float() * layer.weight_scale[token_ids, None]
        return _rotated(layer, rows).to(layer.params_dtype)  # H H = I


def _rotated(layer: nn.Module, x: torch.Tensor, rotate=kernels.rotate_activation
             ) -> torch.Tensor:
    """`x` in the layer weight's rotated basis (as it is where the block is 1: no rotation)."""
    return x if layer.rotation_block == 1 else rotate(x, layer.rotation_block)
