"""Triton twins of the small per-token ops in `kernels.reference`: one program per token row.

These ops are memory bound, so each program reads its row once and writes it once; fusing the
residual add into RMSNorm and rotating q and k in one launch save whole passes over HBM.
"""
import torch
import triton
import triton.language as tl

from kernels.kv_format import RANGE_STEP, QuantizedPages
from kernels.reference import KVPool


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cp, stride_cs, stride_ch, num_kv_heads, head_dim,
                     PAGE_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token: owns no slot
        return
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < num_kv_heads) & (d < head_dim)
    dst = (slot // PAGE_SIZE) * stride_cp + (slot % PAGE_SIZE) * stride_cs + h * stride_ch + d
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round_half_even(x):
    """fp32 `|x| < 2^22` to the nearest integer, ties to even (torch.round): past 1.5 * 2^23 an
    fp32 has no fraction bits, and its addition rounds to nearest even. (libdevice's rint is not
    in the interpreter.)"""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _asymmetric_codes(x, zero, scale, QMAX: tl.constexpr):
    return tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x - zero, scale)), 0), QMAX)


@triton.jit
def _min_max_range(even, odd, mask, QMAX: tl.constexpr):
    """bf16 zero and scale per row of a group held as its even and odd channels (`[H, G/2]`),
    spanning its min-max range as `kv_format._min_max` does."""
    lo = tl.minimum(tl.min(tl.where(mask, even, float("inf")), 1),
                    tl.min(tl.where(mask, odd, float("inf")), 1))
    hi = tl.maximum(tl.max(tl.where(mask, even, float("-inf")), 1),
                    tl.max(tl.where(mask, odd, float("-inf")), 1))
    zero = lo.to(tl.bfloat16)
    scale = tl.maximum(tl.math.div_rn(hi - zero.to(tl.float32), QMAX), 1e-30)
    return zero, scale.to(tl.bfloat16)


@triton.jit
def _centred_codes(x, scale, QMAX: tl.constexpr):
    half = QMAX * 0.5
    return tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x, scale) + half), 0), QMAX)


@triton.jit
def _mean_exact_scale(even, odd, mask, QMAX: tl.constexpr, RANGE_STEPS: tl.constexpr,
                      RANGE_STEP: tl.constexpr):
    """bf16 scale per row of a key group minus its mean, held as its even and odd channels
    (`[H, G/2]`), as `kv_format._mean_exact` picks it (its first range on a tie)."""
    amax = tl.maximum(tl.max(tl.where(mask, tl.abs(even), 0.0), 1),
                      tl.max(tl.where(mask, tl.abs(odd), 0.0), 1))
    best_scale = tl.maximum(tl.math.div_rn(amax, QMAX * 0.5), 1e-30).to(tl.bfloat16)
    if RANGE_STEPS > 1:
        best_error = _centred_error(even, odd, mask, best_scale, QMAX)
        for step in tl.static_range(1, RANGE_STEPS):
            scale = tl.math.div_rn(amax * (1.0 - RANGE_STEP * step), QMAX * 0.5)
            scale = tl.maximum(scale, 1e-30).to(tl.bfloat16)
            error = _centred_error(even, odd, mask, scale, QMAX)
            better = error < best_error
            best_error = tl.where(better, error, best_error)
            best_scale = tl.where(better, scale, best_scale)
    return best_scale


@triton.jit
def _centred_error(even, odd, mask, scale, QMAX: tl.constexpr):
    """Per row, the squared rounding error of a centred group at this scale, less its mean
    (which the zero point takes up)."""
    s = scale.to(tl.float32)[:, None]
    d_even = tl.where(mask, (_centred_codes(even, s, QMAX) - QMAX * 0.5) * s - even, 0.0)
    d_odd = tl.where(mask, (_centred_codes(odd, s, QMAX) - QMAX * 0.5) * s - odd, 0.0)
    count = tl.sum(mask.to(tl.float32), 1) * 2
    mean = ((tl.sum(d_even, 1) + tl.sum(d_odd, 1)) / count)[:, None]
    d_even, d_odd = tl.where(mask, d_even - mean, 0.0), tl.where(mask, d_odd - mean, 0.0)
    return tl.sum(d_even * d_even, 1) + tl.sum(d_odd * d_odd, 1)


@triton.jit
def _quantize_store(x_ptr, stride_h, pool, code_row, scale_row, code_strides, scale_strides,
                    num_kv_heads, QMAX: tl.constexpr, GROUPS: tl.constexpr,
                    GROUP_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr,
                    KEYS: tl.constexpr, RANGE_STEPS: tl.constexpr, RANGE_STEP: tl.constexpr):
    """Quantize one token's `[KvH, D]` K or V into `pool` (codes, scales, zeros) as
    `kv_format.quantize` does: the scale rounded to bf16 first, the codes computed from the
    rounded value. A pool with zeros is int4 (asymmetric, two codes per byte): a key group
    keeps its mean, at the least-error one of `RANGE_STEPS` ranges, a value group spans its
    min-max range. fp8 codes are cast, int8 codes rounded."""
    codes_ptr, scales_ptr, zeros_ptr = pool
    heads = tl.arange(0, BLOCK_H)
    h = heads[:, None]
    codes_ptr += code_row + h * code_strides[2]
    group_off = scale_row + heads * scale_strides[2]
    for g in tl.static_range(GROUPS):
        if zeros_ptr is not None:  # int4: channel 2j in the low nibble of byte j, 2j + 1 high
            j = tl.arange(0, BLOCK_G // 2)[None, :]
            mask = (h < num_kv_heads) & (j < GROUP_SIZE // 2)
            src = x_ptr + h * stride_h + g * GROUP_SIZE + 2 * j
            lo = tl.load(src, mask=mask, other=0.0).to(tl.float32)
            hi = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
            if KEYS:
                mean = (tl.sum(lo, 1) + tl.sum(hi, 1)) / GROUP_SIZE
                lo = tl.where(mask, lo - mean[:, None], 0.0)
                hi = tl.where(mask, hi - mean[:, None], 0.0)
                scale = _mean_exact_scale(lo, hi, mask, QMAX, RANGE_STEPS, RANGE_STEP)
                s = scale.to(tl.float32)[:, None]
                lo, hi = _centred_codes(lo, s, QMAX), _centred_codes(hi, s, QMAX)
                code_mean = tl.sum(tl.where(mask, lo + hi, 0.0), 1) / GROUP_SIZE
                zero = (mean - scale.to(tl.float32) * code_mean).to(tl.bfloat16)
            else:
                zero, scale = _min_max_range(lo, hi, mask, QMAX)
                z, s = zero.to(tl.float32)[:, None], scale.to(tl.float32)[:, None]
                lo, hi = _asymmetric_codes(lo, z, s, QMAX), _asymmetric_codes(hi, z, s, QMAX)
            tl.store(codes_ptr + g * GROUP_SIZE // 2 + j,
                     lo.to(tl.uint8) | (hi.to(tl.uint8) << 4), mask=mask)
            tl.store(zeros_ptr + group_off + g, zero, mask=heads < num_kv_heads)
        else:
            c = tl.arange(0, BLOCK_G)[None, :]
            mask = (h < num_kv_heads) & (c < GROUP_SIZE)
            x = tl.load(x_ptr + h * stride_h + g * GROUP_SIZE + c, mask=mask,
                        other=0.0).to(tl.float32)
            scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), 1), QMAX), 1e-30)
            scale = scale.to(tl.bfloat16)
            q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale.to(tl.float32)[:, None]), -QMAX),
                           QMAX)
            if not codes_ptr.dtype.element_ty.is_fp8():
                q = _round_half_even(q)
            tl.store(codes_ptr + g * GROUP_SIZE + c, q.to(codes_ptr.dtype.element_ty), mask=mask)
        tl.store(scales_ptr + group_off + g, scale, mask=heads < num_kv_heads)


@triton.jit
def _write_kv_quantized_kernel(k_ptr, v_ptr, k_pool, v_pool, slot_ptr, stride_kt, stride_kh,
                               stride_vt, stride_vh, code_strides, scale_strides, num_kv_heads,
                               QMAX: tl.constexpr, GROUPS: tl.constexpr,
                               GROUP_SIZE: tl.constexpr, PAGE_SIZE: tl.constexpr,
                               BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr,
                               KEY_RANGE_STEPS: tl.constexpr, RANGE_STEP: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token: owns no slot
        return
    page, offset = slot // PAGE_SIZE, slot % PAGE_SIZE
    code_row = page * code_strides[0] + offset * code_strides[1]
    scale_row = page * scale_strides[0] + offset * scale_strides[1]
    _quantize_store(k_ptr + t * stride_kt, stride_kh, k_pool, code_row, scale_row, code_strides,
                    scale_strides, num_kv_heads, QMAX, GROUPS, GROUP_SIZE, BLOCK_H, BLOCK_G,
                    True, KEY_RANGE_STEPS, RANGE_STEP)
    _quantize_store(v_ptr + t * stride_vt, stride_vh, v_pool, code_row, scale_row, code_strides,
                    scale_strides, num_kv_heads, QMAX, GROUPS, GROUP_SIZE, BLOCK_H, BLOCK_G,
                    False, 1, RANGE_STEP)


def pool_tuples(k_cache: KVPool, v_cache: KVPool) -> tuple[tuple, tuple]:
    """K and V as the kernels take them, `(codes, scales, zeros)`, a plain pool as `(cache,
    None, None)`. The kernels take one set of strides for K and V, and the scales' for the
    zeros."""
    k, v = (tuple(c) if isinstance(c, QuantizedPages) else (c, None, None)
            for c in (k_cache, v_cache))
    assert all(a is None or (a.stride() == b.stride() and a.stride(-1) == 1)
               for a, b in zip(k, v))
    assert k[2] is None or k[2].stride() == k[1].stride()
    return k, v


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: KVPool, v_cache: KVPool,
             slot_mapping: torch.Tensor) -> None:
    """Store new K/V `[T, KvH, D]` at flat slots, quantized on the way in when the pools are
    `QuantizedPages`; slots < 0 (padding) are skipped."""
    assert k.stride(-1) == v.stride(-1) == 1
    num_tokens, num_kv_heads, head_dim = k.shape
    k_pool, v_pool = pool_tuples(k_cache, v_cache)
    if isinstance(k_cache, QuantizedPages):
        fmt = k_cache.format
        groups = fmt.groups(head_dim)
        _write_kv_quantized_kernel[(num_tokens,)](
            k, v, k_pool, v_pool, slot_mapping, k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), k_cache.codes.stride()[:3], k_cache.scales.stride()[:3], num_kv_heads,
            QMAX=fmt.qmax, GROUPS=groups, GROUP_SIZE=head_dim // groups,
            PAGE_SIZE=k_cache.codes.shape[1], BLOCK_H=triton.next_power_of_2(num_kv_heads),
            BLOCK_G=triton.next_power_of_2(head_dim // groups),
            KEY_RANGE_STEPS=fmt.key_range_steps, RANGE_STEP=RANGE_STEP)
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), num_kv_heads, head_dim,
        PAGE_SIZE=k_cache.shape[1], BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim))


@triton.jit
def rms_normed_row(x_ptr, res_ptr, w_ptr, res_out_ptr, stride_x, stride_r, hidden, eps,
                   HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """Row `program_id(0)` of `rms_norm`, `w * normalized(x [+ residual])` (`[BLOCK]`, masked
    past `hidden`); stores `x + residual` where there is one."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Rounded to the activation dtype first, as the reference's `x + residual` is.
        x = x + tl.load(res_ptr + t * stride_r + cols, mask=mask, other=0.0)
        tl.store(res_out_ptr + t * hidden + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    y = (xf * rstd).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    return w * y


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r,
                     hidden, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    y = rms_normed_row(x_ptr, res_ptr, w_ptr, res_out_ptr, stride_x, stride_r, hidden, eps,
                       HAS_RESIDUAL, BLOCK)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    tl.store(out_ptr + t * hidden + cols, y.to(out_ptr.dtype.element_ty), mask=cols < hidden)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (norm(x + residual) * weight, x + residual), the add fused into the norm's pass."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    assert x2.stride(-1) == 1
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    res_out = x if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res2 = x2 if residual is None else residual.reshape(-1, hidden)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, res2, weight, out, res_out, x2.stride(0), res2.stride(0), hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden))
    return out, res_out


@triton.jit
def _rotate(ptr, t, stride_t, stride_h, num_heads, cos, sin, half,
            BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < num_heads) & (d < half)
    p1 = ptr + t * stride_t + h * stride_h + d
    x1 = tl.load(p1, mask=mask).to(tl.float32)
    x2 = tl.load(p1 + half, mask=mask).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + half, (x2 * cos + x1 * sin).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_cache, num_heads, num_kv_heads, half,
                   BLOCK_H: tl.constexpr, BLOCK_KV_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cache_ptr + pos * stride_cache + d, mask=d < half).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cache + half + d, mask=d < half).to(tl.float32)
    _rotate(q_ptr, t, stride_qt, stride_qh, num_heads, cos, sin, half, BLOCK_H, BLOCK_HALF)
    _rotate(k_ptr, t, stride_kt, stride_kh, num_kv_heads, cos, sin, half, BLOCK_KV_H, BLOCK_HALF)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> None:
    """Rotate q `[T, H, D]` and k `[T, KvH, D]` in place (NeoX halves), both in one launch."""
    assert q.stride(-1) == k.stride(-1) == cos_sin_cache.stride(-1) == 1
    num_tokens, num_heads, head_dim = q.shape
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos_sin_cache.stride(0), num_heads, k.shape[1], head_dim // 2,
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_KV_H=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2))


@triton.jit
def _gated_activation_kernel(x_ptr, out_ptr, stride_x, inter, GELU_TANH: tl.constexpr,
                             BLOCK: tl.constexpr):
    """`act(gate) * up` per column: SiLU, or GELU's tanh approximation (Gemma)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + t * stride_x + cols, mask=mask).to(tl.float32)
    up = tl.load(x_ptr + t * stride_x + inter + cols, mask=mask)
    if GELU_TANH:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)  # sqrt(2 / pi)
        act = 0.5 * gate * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * inner)))  # 1 + tanh(inner)
    else:
        act = gate / (1.0 + tl.exp(-gate))
    tl.store(out_ptr + t * inter + cols, act.to(x_ptr.dtype.element_ty) * up, mask=mask)


def _gated_activation(x: torch.Tensor, block: int, gelu_tanh: bool) -> torch.Tensor:
    """Launch the gated activation over the fused gate|up projection `[T, 2I]`."""
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * inter)
    assert x2.stride(-1) == 1
    out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype, device=x.device)
    block = min(block, triton.next_power_of_2(inter))
    _gated_activation_kernel[(x2.shape[0], triton.cdiv(inter, block))](
        x2, out, x2.stride(0), inter, GELU_TANH=gelu_tanh, BLOCK=block)
    return out


def silu_and_mul(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """SwiGLU over the fused gate|up projection `[T, 2I]` -> `[T, I]`."""
    return _gated_activation(x, block, gelu_tanh=False)


def gelu_tanh_and_mul(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """GeGLU (tanh GELU, Gemma) over the fused gate|up projection `[T, 2I]` -> `[T, I]`."""
    return _gated_activation(x, block, gelu_tanh=True)
