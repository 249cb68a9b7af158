"""Quantized linears on the GPU: Triton W4A16 and W8A8 GEMMs, and fp8 through `torch._scaled_mm`.

Layouts and semantics are those of the twins in `kernels.reference`. W4A16 reads the int4
codes packed eight to an int32 along K (compressed-tensors' pack-quantized layout) and
dequantizes them tile by tile in registers: a K tile lies within one quantization group, so
it takes one scale (and zero) per output channel, and W never exists in memory. W8A8 takes
int8 activations quantized per token by its own kernel and accumulates int8 x int8 dot
products in int32, both scales applied in the epilogue.

Split-K: with few output tiles (decode: 64 column tiles of a 4096-wide output, on a 132-SM
GPU) the weight read could not saturate HBM, so K is split until about `programs` CTAs run;
each split writes its partial tile (fp32, or W8A8's exact int32) to a workspace and a second
pass sums the splits in order, so results do not depend on scheduling.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.triton_attention import dot_precision
from kernels.triton_ops import _round_half_even, rms_normed_row


@dataclass(frozen=True)
class GemmTiles:
    block_m: int
    block_n: int
    block_k: int  # W4A16's K tile, at most its group (W8A8 takes W8A8_BLOCK_K)
    num_warps: int
    num_stages: int
    programs: int  # split K until about this many CTAs run


# Timing not measured yet (`tessera bench kernels` times both beside cuBLAS bf16 and the
# roofline); registers and shared memory are, compiled for sm_90 (tests/test_kernels_sm90.py,
# `pytest -s`). Decode: 16-row tiles (the smallest tl.dot); a 64-deep K tile, as a 128-deep one
# took 255 registers and spilled (the unpacked tile and each row's scale and zero), 64 takes
# 163: three 4-warp CTAs per SM, so one wave of three per SM of a 132-SM H100/H200, each with
# four stages of weight loads in flight to cover HBM latency. Prefill: 128 x 128 tiles halve
# the dequantization per multiply-add against 64-row ones (228 registers with 8 warps, 74 KB
# of shared memory); one wave of CTAs keeps every SM busy.
DECODE_TILES = GemmTiles(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=4,
                         programs=3 * 132)
PREFILL_TILES = GemmTiles(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3,
                          programs=132)
DECODE_MAX_M = 16
W8A8_BLOCK_K = 128  # two of int8 wgmma's 32-deep K steps per iteration, as many as fp16's 64
QUANTIZE_BLOCK = 1024  # a row is read in chunks: one program per token, any width


def _tiles(size_m: int) -> GemmTiles:
    return DECODE_TILES if size_m <= DECODE_MAX_M else PREFILL_TILES


@triton.jit(do_not_specialize=["size_m", "k_tiles_per_split"])  # change with the batch
def _w4a16_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, size_m, size_n, size_k,
                  stride_xm, stride_qn, stride_sn, stride_zn, stride_split, stride_om,
                  k_tiles_per_split, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """One (BLOCK_M x BLOCK_N) tile of `x @ W.T` over this split's K tiles, each within one
    group (BLOCK_K divides GROUP_SIZE). A tile's packed codes `[BLOCK_N, BLOCK_K / 8]` are read
    as whole int32s, unpacked to `[BLOCK_N, BLOCK_K]` (code k = 8j + i in bits 4i..4i+3 of
    int32 j) and dequantized `(q - zero) * scale` in fp32, then rounded to x's dtype, as the
    reference does. The scales' and zeros' offsets are int32s added to a per-group base: 64-bit
    pointers per row held through the loop took 65 more registers."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_K // 8)
    shifts = 4 * tl.arange(0, 8)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    q_ptrs = qweight_ptr + cols[:, None] * stride_qn + offs_j[None, :]
    in_m, in_n = rows < size_m, cols < size_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    s_off, z_off = cols * stride_sn, cols * stride_zn
    first = split * k_tiles_per_split
    for kt in range(first, tl.minimum(first + k_tiles_per_split, tl.cdiv(size_k, BLOCK_K))):
        k0 = kt * BLOCK_K
        g = k0 // GROUP_SIZE
        x = tl.load(x_ptrs + k0, mask=in_m[:, None] & (offs_k < size_k - k0)[None, :], other=0.0)
        in_j = offs_j < (size_k - k0) // 8
        packed = tl.load(q_ptrs + k0 // 8, mask=in_n[:, None] & in_j[None, :], other=0)
        codes = tl.reshape((packed[:, :, None] >> shifts[None, None, :]) & 0xF,
                           (BLOCK_N, BLOCK_K))
        scale = tl.load((scales_ptr + g) + s_off, mask=in_n, other=0.0).to(tl.float32)
        if zeros_ptr is None:  # symmetric: a signed value v is stored as v + 8
            zero = 8.0
        else:
            zero = tl.load((zeros_ptr + g) + z_off, mask=in_n, other=0).to(tl.float32)
            zero = zero[:, None]
        w = ((codes.to(tl.float32) - zero) * scale[:, None]).to(x_ptr.dtype.element_ty)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    tl.store(out_ptr + split * stride_split + rows[:, None] * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


@triton.jit(do_not_specialize=["size_m", "k_tiles_per_split"])
def _w8a8_kernel(codes_ptr, x_scale_ptr, weight_ptr, w_scale_ptr, out_ptr, size_m, size_n,
                 size_k, stride_cm, stride_wn, stride_split, stride_om, k_tiles_per_split,
                 SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """One tile of int8 `codes @ weight.T` in int32 over this split's K tiles: scaled per token
    and per channel into the output (`SCALED`), else stored as the exact int32 partial."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = codes_ptr + rows[:, None] * stride_cm + offs_k[None, :]
    w_ptrs = weight_ptr + cols[:, None] * stride_wn + offs_k[None, :]
    in_m, in_n = rows < size_m, cols < size_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    first = split * k_tiles_per_split
    for kt in range(first, tl.minimum(first + k_tiles_per_split, tl.cdiv(size_k, BLOCK_K))):
        in_k = offs_k < size_k - kt * BLOCK_K
        a = tl.load(a_ptrs + kt * BLOCK_K, mask=in_m[:, None] & in_k[None, :], other=0)
        w = tl.load(w_ptrs + kt * BLOCK_K, mask=in_n[:, None] & in_k[None, :], other=0)
        acc = tl.dot(a, tl.trans(w), acc)
    out_ptrs = out_ptr + split * stride_split + rows[:, None] * stride_om + cols[None, :]
    mask = in_m[:, None] & in_n[None, :]
    if SCALED:
        x_scale = tl.load(x_scale_ptr + rows, mask=in_m, other=0.0)
        w_scale = tl.load(w_scale_ptr + cols, mask=in_n, other=0.0)
        out = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptrs, acc, mask=mask)


@triton.jit
def _split_k_reduce_kernel(partials_ptr, out_ptr, x_scale_ptr, w_scale_ptr, size_n, numel,
                           num_splits, BLOCK: tl.constexpr):
    """`out = sum of the splits' partials` in split order (`[S, M, N]` -> `[M, N]`), then, given
    W8A8's scales, times the token's and the channel's scale, as an unsplit tile would."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.load(partials_ptr + offs, mask=mask, other=0)
    for s in range(1, num_splits):
        acc += tl.load(partials_ptr + s * numel + offs, mask=mask, other=0)
    if x_scale_ptr is not None:
        x_scale = tl.load(x_scale_ptr + offs // size_n, mask=mask, other=0.0)
        w_scale = tl.load(w_scale_ptr + offs % size_n, mask=mask, other=0.0)
        acc = acc.to(tl.float32) * x_scale * w_scale
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int8_scale(amax):
    """The per-token scale of `reference.quantize_int8_rows`, max |row| / 127 (div_rn: torch's
    correctly rounded division, not the approximate one `/` compiles to)."""
    return tl.math.div_rn(tl.maximum(amax, 1e-30), 127.0)


@triton.jit
def _int8_codes(x, scale):
    """x / scale rounded half to even; never past ±127, as |x| <= max |row| = 127 * scale to
    within an ulp."""
    return _round_half_even(tl.math.div_rn(x, scale)).to(tl.int8)


@triton.jit
def _quantize_int8_kernel(x_ptr, codes_ptr, scales_ptr, stride_x, size_k, BLOCK: tl.constexpr):
    """One token's row: its max |x| over chunks of BLOCK, then its codes chunk by chunk."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    row = x_ptr + t * stride_x
    amax = tl.zeros((BLOCK,), tl.float32)
    for k0 in range(0, size_k, BLOCK):
        x = tl.load(row + k0 + cols, mask=cols < size_k - k0, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = _int8_scale(tl.max(amax, 0))
    for k0 in range(0, size_k, BLOCK):
        x = tl.load(row + k0 + cols, mask=cols < size_k - k0, other=0.0).to(tl.float32)
        tl.store(codes_ptr + t * size_k + k0 + cols, _int8_codes(x, scale),
                 mask=cols < size_k - k0)
    tl.store(scales_ptr + t, scale)


@triton.jit
def _rms_norm_quant_int8_kernel(x_ptr, res_ptr, w_ptr, codes_ptr, scales_ptr, res_out_ptr,
                                stride_x, stride_r, hidden, eps, HAS_RESIDUAL: tl.constexpr,
                                BLOCK: tl.constexpr):
    """`rms_norm`'s row (in the dtype it returns), then quantized to int8 per token without
    leaving registers."""
    y = rms_normed_row(x_ptr, res_ptr, w_ptr, res_out_ptr, stride_x, stride_r, hidden, eps,
                       HAS_RESIDUAL, BLOCK).to(tl.float32)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    scale = _int8_scale(tl.max(tl.abs(y), 0))
    tl.store(codes_ptr + t * hidden + cols, _int8_codes(y, scale), mask=mask)
    tl.store(scales_ptr + t, scale)


def _split_plan(size_m: int, size_n: int, k_tiles: int, tiles: GemmTiles,
                split_k: int | None) -> tuple[int, int]:
    """(splits, K tiles per split): `split_k`, or as many splits as bring the grid to about
    `tiles.programs` CTAs; none left empty."""
    output_tiles = triton.cdiv(size_m, tiles.block_m) * triton.cdiv(size_n, tiles.block_n)
    splits = max(1, min(split_k or tiles.programs // output_tiles, k_tiles))
    per_split = triton.cdiv(k_tiles, splits)
    return triton.cdiv(k_tiles, per_split), per_split


def _reduce(partials: torch.Tensor, out: torch.Tensor, x_scale: torch.Tensor | None = None,
            w_scale: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    numel = out.numel()
    _split_k_reduce_kernel[(triton.cdiv(numel, block),)](
        partials, out, x_scale, w_scale, out.shape[-1], numel, partials.shape[0], BLOCK=block)
    return out


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, group_size: int, tiles: GemmTiles | None = None,
                 split_k: int | None = None) -> torch.Tensor:
    """`x[..., K] @ W.T` in x's dtype for `W[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G]`:
    `qweight[N, K / 8]` int32 (8 codes each, low nibble first), `scales[N, ceil(K / G)]`,
    `zeros` codes of the same shape or None (8: symmetric). K a multiple of 8, G of 16.
    `tiles` and `split_k` override the choice by M and the split plan (tests)."""
    size_k, size_n = x.shape[-1], qweight.shape[0]
    x2 = x.reshape(-1, size_k)
    assert x2.stride(-1) == qweight.stride(-1) == scales.stride(-1) == 1
    assert zeros is None or zeros.stride(-1) == 1
    assert size_k % 8 == 0 and group_size % 16 == 0
    size_m = x2.shape[0]
    tiles = tiles or _tiles(size_m)
    block_k = min(tiles.block_k, group_size)
    splits, per_split = _split_plan(size_m, size_n, triton.cdiv(size_k, block_k), tiles,
                                    split_k)
    out = torch.empty(size_m, size_n, dtype=x.dtype, device=x.device)
    target = out if splits == 1 else torch.empty(splits, size_m, size_n, dtype=torch.float32,
                                                 device=x.device)
    _w4a16_kernel[(triton.cdiv(size_m, tiles.block_m), triton.cdiv(size_n, tiles.block_n),
                   splits)](
        x2, qweight, scales, zeros, target, size_m, size_n, size_k, x2.stride(0),
        qweight.stride(0), scales.stride(0), 0 if zeros is None else zeros.stride(0),
        size_m * size_n, size_n, per_split, PRECISION=dot_precision(x.dtype),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=block_k, GROUP_SIZE=group_size,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    if splits > 1:
        _reduce(target, out)
    return out.view(*x.shape[:-1], size_n)


def quantize_per_token_int8(x: torch.Tensor, block: int = QUANTIZE_BLOCK
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes `[M, K]` and fp32 scales `[M]` of `x[M, K]` (`reference.quantize_int8_rows`)."""
    assert x.stride(-1) == 1
    size_m, size_k = x.shape
    codes = torch.empty(size_m, size_k, dtype=torch.int8, device=x.device)
    scales = torch.empty(size_m, dtype=torch.float32, device=x.device)
    _quantize_int8_kernel[(size_m,)](x, codes, scales, x.stride(0), size_k,
                                     BLOCK=min(block, triton.next_power_of_2(size_k)))
    return codes, scales


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                tiles: GemmTiles | None = None, split_k: int | None = None) -> torch.Tensor:
    """`x[..., K]` quantized to int8 per token, times int8 `weight[N, K]` (fp32
    `weight_scale[N]` per channel) in int32, both scales applied after; x's dtype."""
    codes, x_scale = quantize_per_token_int8(x.reshape(-1, x.shape[-1]))
    out = w8a8_gemm(codes, x_scale, weight, weight_scale, x.dtype, tiles, split_k)
    return out.view(*x.shape[:-1], weight.shape[0])


def w8a8_gemm(codes: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
              weight_scale: torch.Tensor, out_dtype: torch.dtype,
              tiles: GemmTiles | None = None, split_k: int | None = None) -> torch.Tensor:
    """`w8a8_linear` of activations already int8 per token (`codes [M, K]`, fp32
    `x_scale [M]`: `quantize_per_token_int8`'s or `rms_norm_quant_int8`'s), `[M, N]` in
    `out_dtype`."""
    (size_m, size_k), size_n = codes.shape, weight.shape[0]
    assert weight.stride(-1) == 1
    tiles = tiles or _tiles(size_m)
    splits, per_split = _split_plan(size_m, size_n, triton.cdiv(size_k, W8A8_BLOCK_K), tiles,
                                    split_k)
    out = torch.empty(size_m, size_n, dtype=out_dtype, device=codes.device)
    target = out if splits == 1 else torch.empty(splits, size_m, size_n, dtype=torch.int32,
                                                 device=codes.device)
    _w8a8_kernel[(triton.cdiv(size_m, tiles.block_m), triton.cdiv(size_n, tiles.block_n),
                  splits)](
        codes, x_scale, weight, weight_scale, target, size_m, size_n, size_k, codes.stride(0),
        weight.stride(0), size_m * size_n, size_n, per_split, SCALED=splits == 1,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=W8A8_BLOCK_K,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    if splits > 1:
        _reduce(target, out, x_scale, weight_scale)
    return out


def rms_norm_quant_int8(x: torch.Tensor, weight: torch.Tensor, eps: float,
                        residual: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`triton_ops.rms_norm` with its output quantized per token in the same pass: (codes
    `[T, H]` int8, scales `[T]` fp32, x + residual)."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    assert x2.stride(-1) == 1
    codes = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    res_out = x if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res2 = x2 if residual is None else residual.reshape(-1, hidden)
    _rms_norm_quant_int8_kernel[(x2.shape[0],)](
        x2, res2, weight, codes, scales, res_out, x2.stride(0), res2.stride(0), hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden))
    return codes, scales, res_out


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor
               ) -> torch.Tensor:
    """`x[..., K]` quantized to fp8 e4m3 per token, times fp8 `weight[N, K]` (fp32
    `weight_scale[N]`) on the fp8 tensor cores: `torch._scaled_mm` with row-wise scales, which
    takes A row-major and B column-major (`weight.t()`), contiguous fp32 scales `[M, 1]` and
    `[1, N]`, K and N multiples of 16, and writes bf16 only (its sm_90 CUTLASS kernel is
    f8f8bf16_rowwise): other dtypes are cast after."""
    size_k = x.shape[-1]
    codes, scale = reference.quantize_per_token_fp8(x.reshape(-1, size_k))
    out = torch._scaled_mm(codes, weight.t(), scale[:, None], weight_scale[None, :],
                           out_dtype=torch.bfloat16)
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
