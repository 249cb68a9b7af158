"""One dispatch point per op: CUDA tensors go to Triton, everything else to the torch reference.

Callers import the ops from here and never choose an implementation themselves. The Triton
modules are imported on the first CUDA call only, so CPU-only installs need no triton, and
tests can set TRITON_INTERPRET before anything imports it.
"""
import torch

from kernels import reference


def uses_triton(x: torch.Tensor) -> bool:
    """Whether the ops on `x` run on Triton; a quantized linear method also lays its weights
    out for the Triton kernels or the CPU's by it."""
    return x.is_cuda


def rms_norm(x, weight, eps, residual=None):
    if uses_triton(x):
        from kernels import triton_ops
        return triton_ops.rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def rotary_embedding(positions, q, k, cos_sin_cache):
    if uses_triton(q):
        from kernels import triton_ops
        triton_ops.rotary_embedding(positions, q, k, cos_sin_cache)
    else:
        reference.rotary_embedding(positions, q, k, cos_sin_cache)


def silu_and_mul(x):
    if uses_triton(x):
        from kernels import triton_ops
        return triton_ops.silu_and_mul(x)
    return reference.silu_and_mul(x)


def gelu_tanh_and_mul(x):
    if uses_triton(x):
        from kernels import triton_ops
        return triton_ops.gelu_tanh_and_mul(x)
    return reference.gelu_tanh_and_mul(x)


# Data-dependent grouping: under torch.compile (engine/cpu_compile.py) each distinct count of
# tokens per expert would be a new graph, so the compiled step calls it as it is.
@torch.compiler.disable
def fused_moe(x, w13, w2, topk_weights, topk_ids, gated_activation):
    if uses_triton(x):
        from kernels import triton_moe
        return triton_moe.fused_moe(x, w13, w2, topk_weights, topk_ids, gated_activation)
    return reference.fused_moe(x, w13, w2, topk_weights, topk_ids, gated_activation)


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    if uses_triton(k):
        from kernels import triton_ops
        triton_ops.write_kv(k, v, k_cache, v_cache, slot_mapping)
    else:
        reference.write_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_table, scale,
                    max_query_len, max_seq_len, sliding_window=None, softcap=None):
    if not uses_triton(q):
        return reference.paged_attention(q, k_cache, v_cache, query_start_loc, seq_lens,
                                         block_table, scale, max_query_len, max_seq_len,
                                         sliding_window, softcap)
    from kernels import triton_attention
    if max_query_len == 1:
        return triton_attention.paged_decode_attention(
            q, k_cache, v_cache, query_start_loc, seq_lens, block_table, scale, max_seq_len,
            sliding_window=sliding_window, softcap=softcap)
    return triton_attention.paged_prefill_attention(
        q, k_cache, v_cache, query_start_loc, seq_lens, block_table, scale, max_query_len,
        sliding_window=sliding_window, softcap=softcap)


def attention_scores(q, k_cache, pages, seq_len, first_slot, scale, softcap=None):
    # torch alone, on either device: it runs for a few queries once per prompt
    return reference.attention_scores(q, k_cache, pages, seq_len, first_slot, scale, softcap)


def _cpu_only(name: str, x: torch.Tensor) -> None:
    if uses_triton(x):
        raise NotImplementedError(f"{name} has a CPU kernel only; use dense weights on CUDA")


def pack_int4(codes, scales, zeros):
    _cpu_only("pack_int4", codes)
    return reference.pack_int4(codes, scales, zeros)


def pack_int8(weight):
    _cpu_only("pack_int8", weight)
    return reference.pack_int8(weight)


def shift_to_uint8(codes):
    _cpu_only("shift_to_uint8", codes)
    return reference.shift_to_uint8(codes)


def packed_int8_gemm(shifted, packed, w_scale):
    _cpu_only("packed_int8_gemm", shifted)
    return reference.packed_int8_gemm(shifted, packed, w_scale)


def packed_int8_linear(x, packed, w_scale):
    _cpu_only("packed_int8_linear", x)
    return reference.packed_int8_linear(x, packed, w_scale)


def fbgemm_int8_available():
    return reference.fbgemm_int8_available()


def pack_int8_fbgemm(weight, scales):
    _cpu_only("pack_int8_fbgemm", weight)
    return reference.FbgemmInt8Weight(weight, scales)


def fbgemm_int8_linear(x, packed):
    _cpu_only("fbgemm_int8_linear", x)
    return reference.fbgemm_int8_linear(x, packed)


def int4_linear(x, packed, scales_and_zeros, group_size):
    _cpu_only("int4_linear", x)
    return reference.int4_linear(x, packed, scales_and_zeros, group_size)


def pack_q4_blocks(codes, scales, zeros):
    _cpu_only("pack_q4_blocks", codes)
    return reference.pack_q4_blocks(codes, scales, zeros)


def cpu_kernels_available(cache_dir):
    """Whether this CPU runs the hand-written ops, `q4_linear`, `i8_linear` and decode
    attention's (built into `cache_dir` on first use)."""
    from kernels import cpu_extension
    return cpu_extension.available(cache_dir)


def cpu_extension_digest():
    """Names the build of the CPU ops `cpu_kernels_available` loads."""
    from kernels import cpu_extension
    return cpu_extension.source_digest()


def q4_linear(x, blocks):
    _cpu_only("q4_linear", x)
    return reference.q4_linear(x, blocks)


def i8_linear(x, weight, scales):
    _cpu_only("i8_linear", x)
    return reference.i8_linear(x, weight, scales)


def rotate(x, block):
    return reference.rotate(x, block)


def rotate_activation(x, block):
    return reference.rotate_activation(x, block)


def quantize_int8_rows(w, code_max=127):
    return reference.quantize_int8_rows(w, code_max)


def int8_weight_linear(x, weight, scales):
    _cpu_only("int8_weight_linear", x)
    return reference.int8_weight_linear(x, weight, scales)


def int8_linear(x, weight, scales):
    _cpu_only("int8_linear", x)
    return reference.int8_linear(x, weight, scales)


def int8_moe(x, w13, w2, topk_weights, topk_ids, gated_activation, blocks, int8_activations):
    _cpu_only("int8_moe", x)
    return reference.int8_moe(x, w13, w2, topk_weights, topk_ids, gated_activation, blocks,
                              int8_activations)


def int8_experts(weights, scales):
    _cpu_only("int8_experts", scales)
    return reference.Int8Experts(weights, scales)


def w4a16_linear(x, qweight, scales, zeros, group_size):
    if uses_triton(x):
        from kernels import triton_quant
        return triton_quant.w4a16_linear(x, qweight, scales, zeros, group_size)
    return reference.w4a16_linear(x, qweight, scales, zeros, group_size)


def quantize_per_token_int8(x):
    if uses_triton(x):
        from kernels import triton_quant
        return triton_quant.quantize_per_token_int8(x)
    return reference.quantize_per_token_int8(x)


def w8a8_linear(x, weight, weight_scale):
    if uses_triton(x):
        from kernels import triton_quant
        return triton_quant.w8a8_linear(x, weight, weight_scale)
    return reference.w8a8_linear(x, weight, weight_scale)


def w8a8_gemm(codes, x_scale, weight, weight_scale, out_dtype):
    if uses_triton(codes):
        from kernels import triton_quant
        return triton_quant.w8a8_gemm(codes, x_scale, weight, weight_scale, out_dtype)
    return reference.w8a8_gemm(codes, x_scale, weight, weight_scale, out_dtype)


def rms_norm_quant_int8(x, weight, eps, residual=None):
    if uses_triton(x):
        from kernels import triton_quant
        return triton_quant.rms_norm_quant_int8(x, weight, eps, residual)
    return reference.rms_norm_quant_int8(x, weight, eps, residual)


def fp8_linear(x, weight, weight_scale):
    if uses_triton(x):  # torch._scaled_mm on the fp8 tensor cores; no Triton
        from kernels import triton_quant
        return triton_quant.fp8_linear(x, weight, weight_scale)
    return reference.fp8_linear(x, weight, weight_scale)
