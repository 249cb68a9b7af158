"""Paged attention in Triton: a FlashAttention-2 prefill and a split-KV (flash-decoding) decode.

Both read K/V token by token through the block table, so a request's context may sit on any
pages in any order, and a prefill chunk attends to pages written by earlier chunks or shared
by a prefix hit. Layouts and semantics are those of `reference.paged_attention`.

A sliding window is a runtime int (`NO_WINDOW` when there is none), so every window shares one
compiled kernel; the key loops start at the window's first tile, so a window reads fewer keys.
A soft cap (Gemma 2) is a runtime float behind a constexpr flag: uncapped scores pay nothing.

A K or V pool reaches the kernels as a tuple `(codes, scales, zeros)`: a plain pool is
`(cache, None, None)` and compiles as it always did (q cast to the cache's dtype); quantized
pages (`kernels.kv_format`) are dequantized tile by tile in registers to q's dtype, with the
same roundings as `kv_format.dequantize`, so the dots see the reference's values.
"""
import torch
import triton
import triton.language as tl

from kernels.kv_format import QuantizedPages
from kernels.reference import KVPool
from kernels.triton_ops import pool_tuples

LOG2E = 1.4426950408889634
NO_WINDOW = 2**31 - 1  # the largest int32: every key is in the window, and p - W cannot overflow


@triton.jit
def _group_params(ptr, row_off, valid, d, GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """The scale (or zero) of each channel of a tile's rows: `[BLOCK_N, 1]` for one group per
    head, else `[BLOCK_N, BLOCK_D]`, selecting each group's value over its channels (a gather
    would hold an address per channel in registers, and spilled at head dim 128)."""
    params = tl.load(ptr + row_off, mask=valid, other=0.0)[:, None]
    for g in tl.static_range(1, GROUPS):
        group_params = tl.load(ptr + row_off + g, mask=valid, other=0.0)[:, None]
        params = tl.where((d // GROUP_SIZE == g)[None, :], group_params, params)
    return params


@triton.jit
def _load_kv(pool, page, slot, kv_head, valid, d, head_dim, stride_cp, stride_cs, stride_ch,
             scale_strides, dtype: tl.constexpr, GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr,
             BLOCK_D: tl.constexpr):
    """A `[BLOCK_N, BLOCK_D]` tile of K or V, zeros past the context: a plain pool's values, or
    quantized codes dequantized to `dtype` as `kv_format.dequantize` does (`code * scale`, then
    `+ zero`, each rounded to `dtype`). Channels past the head are never stored, so an int4
    tile may leave its zero point there."""
    codes_ptr, scales_ptr, zeros_ptr = pool
    mask = valid[:, None] & (d[None, :] < head_dim)
    off = page * stride_cp + slot * stride_cs + kv_head * stride_ch
    if scales_ptr is None:
        x = tl.load(codes_ptr + off[:, None] + d[None, :], mask=mask, other=0.0)
    else:
        if codes_ptr.dtype.element_ty == tl.uint8:  # int4: the low nibble first
            j = tl.arange(0, BLOCK_D // 2)
            packed = tl.load(codes_ptr + off[:, None] + j[None, :],
                             mask=valid[:, None] & (j[None, :] < head_dim // 2), other=0)
            codes = tl.interleave(packed & 0xF, packed >> 4)
        else:
            codes = tl.load(codes_ptr + off[:, None] + d[None, :], mask=mask, other=0.0)
        row_off = page * scale_strides[0] + slot * scale_strides[1] + kv_head * scale_strides[2]
        scale = _group_params(scales_ptr, row_off, valid, d, GROUPS, GROUP_SIZE)
        x = codes.to(tl.float32) * scale.to(dtype).to(tl.float32)
        if zeros_ptr is not None:
            zero = _group_params(zeros_ptr, row_off, valid, d, GROUPS, GROUP_SIZE)
            x = x.to(dtype).to(tl.float32) + zero.to(dtype).to(tl.float32)
        x = x.to(dtype)
    return x


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k_pool, v_pool, bt_row_ptr, kv_head, start_n, kv_end, q_pos,
                 window, stride_cp, stride_cs, stride_ch, scale_strides, head_dim, qk_scale, cap,
                 MASKED: tl.constexpr, SOFTCAP: tl.constexpr, PAGE_SIZE: tl.constexpr,
                 GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Fold keys `start_n .. start_n + BLOCK_N` into the online softmax of the rows of `q`;
    row i sees keys `q_pos[i] - window < n <= q_pos[i]` below `kv_end`. Scores are in log2
    units (`_scales` gives `qk_scale` and `cap`), soft-capped before the mask when SOFTCAP.

    Unmasked tiles (all keys below `kv_end` and visible to every row) skip the mask arithmetic.
    """
    n = start_n + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    valid = n < kv_end
    page = tl.load(bt_row_ptr + n // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
    k = _load_kv(k_pool, page, n % PAGE_SIZE, kv_head, valid, d, head_dim, stride_cp, stride_cs,
                 stride_ch, scale_strides, q.dtype, GROUPS, GROUP_SIZE, BLOCK_D)
    v = _load_kv(v_pool, page, n % PAGE_SIZE, kv_head, valid, d, head_dim, stride_cp, stride_cs,
                 stride_ch, scale_strides, q.dtype, GROUPS, GROUP_SIZE, BLOCK_D)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if SOFTCAP:
        # c * tanh(x / c) with tanh(z) = 1 - 2 / (1 + e^2z), as tl has no tanh on every version:
        # e^2z overflowing to inf gives 1 and underflowing to 0 gives -1, never inf / inf.
        qk = cap * (1.0 - 2.0 / (1.0 + tl.math.exp2(qk * qk_scale)))
    else:
        qk = qk * qk_scale
    if MASKED:
        visible = (valid[None, :] & (n[None, :] <= q_pos[:, None])
                   & (n[None, :] > q_pos[:, None] - window))
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row whose window starts past the keys so far has m = -inf, and exp2(-inf + inf) is NaN;
    # a finite reference leaves it zeros. Only masked tiles can leave a row without a key.
    if MASKED:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    alpha = tl.math.exp2(m_i - m_ref)
    p = tl.math.exp2(qk - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


# The table's width changes each step; a window of 1 or of 16k would each compile anew.
@triton.jit(do_not_specialize=["stride_bt", "window"])
def _prefill_kernel(q_ptr, k_pool, v_pool, out_ptr, qsl_ptr, seq_lens_ptr, bt_ptr,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_cp, stride_cs, stride_ch,
                    scale_strides, stride_bt, qk_scale, cap, head_dim, window,
                    SOFTCAP: tl.constexpr, GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr,
                    GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    r = tl.program_id(2)
    q_start = tl.load(qsl_ptr + r)
    q_len = tl.load(qsl_ptr + r + 1) - q_start
    if m0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + r)
    ctx_len = seq_len - q_len
    rows = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q_mask = (rows < q_len)[:, None] & (d < head_dim)[None, :]
    q_rows = (q_start + rows).to(tl.int64)[:, None]
    q = tl.load(q_ptr + q_rows * stride_qt + head * stride_qh + d[None, :], mask=q_mask,
                other=0.0)
    if k_pool[1] is None:  # a plain pool: attend in its dtype
        q = q.to(k_pool[0].dtype.element_ty)
    # Bottom-right aligned causal mask: row i sees keys <= q_pos[i]. Rows past the last query
    # copy its position, so a narrow window leaves them a key to see (no 0 / 0 to discard).
    q_pos = ctx_len + tl.minimum(rows, q_len - 1)
    kv_head = head // GROUP
    bt_row = bt_ptr + r.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys from the first row's window start to the last real row's position, in three runs:
    # tiles straddling some row's window edge (masked), tiles every row sees whole (unmasked),
    # then the causal diagonal and tail (masked). Without a window the first run is empty.
    first_pos = ctx_len + m0
    kv_end = ctx_len + tl.minimum(m0 + BLOCK_M, q_len)
    lo = tl.maximum(first_pos + 1 - window, 0) // BLOCK_N * BLOCK_N
    full_lo = tl.minimum(tl.cdiv(tl.maximum(kv_end - window, 0), BLOCK_N) * BLOCK_N, kv_end)
    full_hi = tl.maximum((first_pos + 1) // BLOCK_N * BLOCK_N, full_lo)
    for start_n in range(lo, full_lo, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_pool, v_pool, bt_row, kv_head, start_n,
                                     kv_end, q_pos, window, stride_cp, stride_cs, stride_ch,
                                     scale_strides, head_dim, qk_scale, cap, True, SOFTCAP,
                                     PAGE_SIZE, GROUPS, GROUP_SIZE, BLOCK_N, BLOCK_D, PRECISION)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_pool, v_pool, bt_row, kv_head, start_n,
                                     kv_end, q_pos, window, stride_cp, stride_cs, stride_ch,
                                     scale_strides, head_dim, qk_scale, cap, False, SOFTCAP,
                                     PAGE_SIZE, GROUPS, GROUP_SIZE, BLOCK_N, BLOCK_D, PRECISION)
    for start_n in range(full_hi, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_pool, v_pool, bt_row, kv_head, start_n,
                                     kv_end, q_pos, window, stride_cp, stride_cs, stride_ch,
                                     scale_strides, head_dim, qk_scale, cap, True, SOFTCAP,
                                     PAGE_SIZE, GROUPS, GROUP_SIZE, BLOCK_N, BLOCK_D, PRECISION)
    acc = acc / l_i[:, None]
    tl.store(out_ptr + q_rows * stride_ot + head * stride_oh + d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=q_mask)


def _window(sliding_window: int | None) -> int:
    """The kernels' window argument: no window is one wider than any context, not a branch."""
    assert sliding_window is None or 1 <= sliding_window <= NO_WINDOW
    return NO_WINDOW if sliding_window is None else sliding_window


def _scales(scale: float, softcap: float | None) -> tuple[float, float]:
    """The kernels' `(qk_scale, cap)`, every constant folded in: a score in log2 units is
    `qk * qk_scale` (`cap` unused), or soft-capped, `c * tanh(qk * scale / c) * LOG2E` =
    `cap * (1 - 2 / (1 + exp2(qk * qk_scale)))`."""
    if softcap is None:
        return scale * LOG2E, 0.0
    assert softcap > 0
    return 2 * LOG2E * scale / softcap, softcap * LOG2E


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` on fp32 operands keeps full fp32 products (TF32 would drop three digits); 16-bit
    operands ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _pool_args(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool) -> tuple[tuple, tuple, dict]:
    """The kernels' pool arguments: (K, V) as `pool_tuples`, (the codes' strides of page, slot
    and head, the scales' or None), and the pools' constexprs. Quantized pages attend in q's
    dtype, a plain pool in its own."""
    pools = pool_tuples(k_cache, v_cache)
    codes, scales, _ = pools[0]
    head_dim = q.shape[-1]
    if isinstance(k_cache, QuantizedPages):
        groups, scale_strides, dtype = k_cache.format.groups(head_dim), scales.stride()[:3], q.dtype
    else:
        groups, scale_strides, dtype = 1, None, codes.dtype
    return pools, (*codes.stride()[:3], scale_strides), dict(
        PAGE_SIZE=codes.shape[1], GROUPS=groups, GROUP_SIZE=head_dim // groups,
        PRECISION=dot_precision(dtype))


def paged_prefill_attention(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                            block_table: torch.Tensor, scale: float, max_query_len: int,
                            block_m: int = 64, block_n: int = 64,
                            sliding_window: int | None = None,
                            softcap: float | None = None) -> torch.Tensor:
    """Causal attention of every request's new tokens over its paged context (any batch mix),
    each query seeing only the last `sliding_window` keys up to itself when one is given, its
    scaled scores soft-capped to `softcap * tanh(x / softcap)` when one is given.

    One program per (query tile, head, request); tiles past a request's query length exit.
    """
    num_tokens, num_heads, head_dim = q.shape
    assert q.stride(-1) == block_table.stride(-1) == 1
    pools, strides, pool_constexprs = _pool_args(q, k_cache, v_cache)
    out = torch.empty_like(q)
    grid = (triton.cdiv(max_query_len, block_m), num_heads, seq_lens.shape[0])
    _prefill_kernel[grid](
        q, *pools, out, query_start_loc, seq_lens, block_table,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *strides, block_table.stride(0),
        *_scales(scale, softcap), head_dim, _window(sliding_window), SOFTCAP=softcap is not None,
        GROUP=num_heads // pools[0][0].shape[2], BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4 if head_dim <= 64 else 8,
        **pool_constexprs)
    return out


@triton.jit(do_not_specialize=["stride_bt", "num_splits", "window"])  # change with the batch
def _decode_split_kernel(q_ptr, k_pool, v_pool, qsl_ptr, seq_lens_ptr, bt_ptr, part_out_ptr,
                         part_lse_ptr, stride_qt, stride_qh, stride_cp, stride_cs, stride_ch,
                         scale_strides, stride_bt, qk_scale, cap, head_dim, num_heads, num_splits,
                         window, SOFTCAP: tl.constexpr, GROUP: tl.constexpr,
                         PAGE_SIZE: tl.constexpr, GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                         PARTITION: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Attend all query heads of one KV head to one partition of the context.

    The GQA group is the tile's row dimension, so each K/V page is read once per group.
    Partitions past the context or wholly before the window exit, writing nothing.
    """
    r = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + r)
    first = tl.maximum(seq_len - window, 0)  # the first key in the window
    start = split * PARTITION
    if start >= seq_len or start + PARTITION <= first:
        return
    end = tl.minimum(start + PARTITION, seq_len)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    q_mask = (g < GROUP)[:, None] & (d < head_dim)[None, :]
    tok = tl.load(qsl_ptr + r).to(tl.int64)
    q = tl.load(q_ptr + tok * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=q_mask,
                other=0.0)
    if k_pool[1] is None:  # a plain pool: attend in its dtype
        q = q.to(k_pool[0].dtype.element_ty)
    q_pos = tl.full([BLOCK_G], 0, tl.int32) + seq_len - 1
    bt_row = bt_ptr + r.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # The tile holding the window's first key (when it starts mid-tile) and the ragged tail
    # are masked; every tile in between is whole. PARTITION is a multiple of BLOCK_N.
    lo = tl.maximum(start, first // BLOCK_N * BLOCK_N)
    full_lo = tl.minimum(tl.maximum(start, tl.cdiv(first, BLOCK_N) * BLOCK_N), end)
    full_hi = tl.maximum(end // BLOCK_N * BLOCK_N, full_lo)
    for start_n in range(lo, full_lo, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_pool, v_pool, bt_row, kv_head, start_n,
                                     end, q_pos, window, stride_cp, stride_cs, stride_ch,
                                     scale_strides, head_dim, qk_scale, cap, True, SOFTCAP,
                                     PAGE_SIZE, GROUPS, GROUP_SIZE, BLOCK_N, BLOCK_D, PRECISION)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_pool, v_pool, bt_row, kv_head, start_n,
                                     end, q_pos, window, stride_cp, stride_cs, stride_ch,
                                     scale_strides, head_dim, qk_scale, cap, False, SOFTCAP,
                                     PAGE_SIZE, GROUPS, GROUP_SIZE, BLOCK_N, BLOCK_D, PRECISION)
    for start_n in range(full_hi, end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_pool, v_pool, bt_row, kv_head, start_n,
                                     end, q_pos, window, stride_cp, stride_cs, stride_ch,
                                     scale_strides, head_dim, qk_scale, cap, True, SOFTCAP,
                                     PAGE_SIZE, GROUPS, GROUP_SIZE, BLOCK_N, BLOCK_D, PRECISION)
    # Partial results: the normalized output and its log2-sum-exp, merged by the reduce pass.
    part = (r.to(tl.int64) * num_heads + heads) * num_splits + split
    tl.store(part_out_ptr + part[:, None] * head_dim + d[None, :], acc / l_i[:, None],
             mask=q_mask)
    tl.store(part_lse_ptr + part, m_i + tl.math.log2(l_i), mask=g < GROUP)


@triton.jit(do_not_specialize=["num_splits", "window"])
def _decode_reduce_kernel(part_out_ptr, part_lse_ptr, out_ptr, qsl_ptr, seq_lens_ptr,
                          stride_ot, stride_oh, head_dim, num_heads, num_splits, window,
                          PARTITION: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the partitions in order, whatever the grid's size: a CUDA graph captured with
    room for `max_model_len` and an eager step sized to the batch give the same bits.

    Only partitions holding a key in the window are merged; those before it wrote nothing.
    """
    r = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + r)
    first = tl.maximum(seq_len - window, 0) // PARTITION
    num_valid = tl.cdiv(seq_len, PARTITION)
    d = tl.arange(0, BLOCK_D)
    base = (r.to(tl.int64) * num_heads + head) * num_splits
    m = tl.load(part_lse_ptr + base + first)
    acc = tl.load(part_out_ptr + (base + first) * head_dim + d, mask=d < head_dim, other=0.0)
    l_sum = tl.full([], 1.0, tl.float32)  # a tensor, so the loop carries one type
    for s in range(first + 1, num_valid):
        lse = tl.load(part_lse_ptr + base + s)
        o = tl.load(part_out_ptr + (base + s) * head_dim + d, mask=d < head_dim, other=0.0)
        m_new = tl.maximum(m, lse)
        old, new = tl.math.exp2(m - m_new), tl.math.exp2(lse - m_new)
        acc = acc * old + o * new
        l_sum = l_sum * old + new
        m = m_new
    tok = tl.load(qsl_ptr + r).to(tl.int64)
    tl.store(out_ptr + tok * stride_ot + head * stride_oh + d,
             (acc / l_sum).to(out_ptr.dtype.element_ty), mask=d < head_dim)


def paged_decode_attention(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool,
                           query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                           block_table: torch.Tensor, scale: float, max_seq_len: int,
                           partition: int = 512, block_n: int = 64,
                           sliding_window: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """Attention of one new token per request over its paged context (flash-decoding), or
    over its last `sliding_window` keys when one is given; `softcap` as in the prefill.

    Splitting each context into `partition`-token pieces gives a long single request as many
    programs as a large batch has, so both keep the GPU's memory system busy. The split count
    and the window are runtime arguments: a growing context never triggers a recompile.
    """
    num_tokens, num_heads, head_dim = q.shape
    assert q.stride(-1) == block_table.stride(-1) == 1
    assert partition % block_n == 0
    pools, strides, pool_constexprs = _pool_args(q, k_cache, v_cache)
    num_reqs, num_kv_heads = seq_lens.shape[0], pools[0][0].shape[2]
    group = num_heads // num_kv_heads
    num_splits = triton.cdiv(max_seq_len, partition)
    part_out = torch.empty(num_reqs, num_heads, num_splits, head_dim, dtype=torch.float32,
                           device=q.device)
    part_lse = torch.empty(num_reqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    block_d = triton.next_power_of_2(head_dim)
    window = _window(sliding_window)
    _decode_split_kernel[(num_reqs, num_kv_heads, num_splits)](
        q, *pools, query_start_loc, seq_lens, block_table, part_out, part_lse, q.stride(0),
        q.stride(1), *strides, block_table.stride(0), *_scales(scale, softcap), head_dim,
        num_heads, num_splits, window, SOFTCAP=softcap is not None, GROUP=group,
        PARTITION=partition, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=block_d, num_warps=4, **pool_constexprs)
    _decode_reduce_kernel[(num_reqs, num_heads)](
        part_out, part_lse, out, query_start_loc, seq_lens, out.stride(0), out.stride(1),
        head_dim, num_heads, num_splits, window, PARTITION=partition, BLOCK_D=block_d)
    return out
