"""Each Triton kernel equals its torch reference.

TRITON_INTERPRET must be set before `triton.jit` decorates the kernels; `kernels` imports its
Triton modules lazily, so setting it here, first, is enough. Where the kernels run:

* TRITON_INTERPRET=1 (the default here): the Triton interpreter on CPU tensors, fp32.
* TRITON_INTERPRET=0 with a GPU: compiled kernels on CUDA tensors, fp32 and bf16, plus long
  contexts at the engine's own tile sizes. Without a GPU the module skips: compiled Triton
  cannot run on CPU tensors.
"""
import contextlib

from tests.triton_mode import interpreting, kernel_test_device  # first: it sets TRITON_INTERPRET

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

import kernels  # noqa: E402
from kernels import kv_format, reference, triton_attention, triton_moe, triton_ops  # noqa: E402
from kernels.kv_format import QuantizedPages  # noqa: E402


DEVICE = kernel_test_device()

ATOL, RTOL = 1e-4, 1e-3
# The interpreter gets bf16 wrong (numpy has no bf16: NaNs), so bf16 runs on the GPU only.
# A bf16 kernel and its bf16 reference round at the same points but may each be an ulp or
# two (2^-8 relative) off where their fp32 intermediates differ in the last bits; atol covers
# results near zero.
TOLERANCES = {torch.float32: dict(atol=ATOL, rtol=RTOL),
              torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
with_dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))

# (num_heads, num_kv_heads, head_dim, page_size): GQA ratios 1, 3, 8; pages smaller than,
# equal to and larger than the 16-key tile.
ATTENTION_SHAPES = [(4, 4, 64, 8), (6, 2, 128, 16), (8, 1, 64, 32)]
GEMMA2_2B_SHAPE = (8, 4, 256, 16)  # Gemma's head dim, 256: the widest tile the kernels take


def _qkv_views(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
               dtype: torch.dtype = torch.float32):
    """q, k, v as strided views of one fused projection, as the model produces them."""
    sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    qkv = torch.randn(num_tokens, sum(sizes)).to(dtype)
    q, k, v = qkv.split(sizes, dim=-1)
    return (q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
            v.view(num_tokens, num_kv_heads, head_dim))


def _paged_batch(query_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int,
                 head_dim: int, page_size: int, dtype: torch.dtype = torch.float32):
    """A flat batch whose contexts sit on shuffled pages; unused table entries name real pages,
    so a kernel reading past a request's context would be caught."""
    pages_per_req = [-(-s // page_size) for s in seq_lens]
    num_pages = sum(pages_per_req) + 3
    max_pages = max(pages_per_req) + 2
    shuffled = torch.randperm(num_pages)
    block_table = torch.randint(0, num_pages, (len(seq_lens), max_pages), dtype=torch.int32)
    used = 0
    for i, n in enumerate(pages_per_req):
        block_table[i, :n] = shuffled[used:used + n]
        used += n
    k_cache = torch.randn(num_pages, page_size, num_kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(num_pages, page_size, num_kv_heads, head_dim).to(dtype)
    query_start_loc = torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0).int()
    q, _, _ = _qkv_views(sum(query_lens), num_heads, num_kv_heads, head_dim, dtype)
    return (q, k_cache, v_cache, query_start_loc, torch.tensor(seq_lens, dtype=torch.int32),
            block_table)


@pytest.fixture(autouse=True)
def _seed():
    """Seeded, and every tensor a test makes is on DEVICE (CPU: unchanged)."""
    torch.manual_seed(0)
    with torch.device(DEVICE) if DEVICE != "cpu" else contextlib.nullcontext():
        yield


@with_dtypes
def test_write_kv_stores_at_slots_and_skips_padding(dtype: torch.dtype):
    _, k, v = _qkv_views(6, 2, 3, 64, dtype)
    k_cache, v_cache = (torch.zeros(2, 4, 3, 64, dtype=dtype) for _ in range(2))
    slots = torch.tensor([5, -1, 0, 6, 2, -1])  # slot -1 must not wrap to the last slot, 7
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.write_kv(k, v, want_k, want_v, slots)
    triton_ops.write_kv(k, v, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, want_k, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, want_v, atol=0, rtol=0)
    assert k_cache.view(-1, 3, 64)[[1, 3, 4, 7]].abs().sum() == 0


@pytest.fixture
def round_to_nearest_even(monkeypatch):
    """The interpreter narrows fp32 to bf16 by truncation and to fp8 rounding half up (with a
    carry bug); a GPU rounds both to nearest even, as torch does. Under the interpreter, this
    gives the kernels torch's conversions, so quantizing kernels can be held to the bit."""
    if not interpreting():
        return
    from triton.runtime import interpreter

    convert = interpreter._convert_float
    torch_types = {tl.bfloat16: (torch.bfloat16, torch.int16),
                   tl.float8e4nv: (torch.float8_e4m3fn, torch.uint8)}

    def rounded(data, src, dst, rounding_mode):
        if src != tl.float32 or dst not in torch_types:
            return convert(data, src, dst, rounding_mode)
        dtype, bits = torch_types[dst]
        return torch.from_numpy(np.ascontiguousarray(data, np.float32)).to(dtype).view(bits).numpy()

    monkeypatch.setattr(interpreter, "_convert_float", rounded)


KV_FORMATS = list(kv_format.FORMATS)


@with_dtypes
@pytest.mark.parametrize("name", KV_FORMATS)
def test_write_kv_quantizes_as_kv_format(name: str, dtype: torch.dtype, round_to_nearest_even):
    """Codes, scales and zeros to the bit of `kv_format.quantize` (reference.write_kv)."""
    fmt = kv_format.FORMATS[name]
    # Three requests of 5, 1 and 8 tokens on 16-slot pages, padding between (slot -1 must not
    # wrap to the last slot, 63): the first crosses from page 0 into page 1, the last from
    # page 3 into page 2. Head dim 128: int4's two groups.
    slots = torch.tensor([12, 13, 14, 15, 16, -1, 40, -1, -1, 57, 58, 59, 60, 61, 62, 32, 33])
    _, k, v = _qkv_views(len(slots), 2, 3, 128, dtype)
    # A token-head of rounding ties at scale 1 (zero 0: its minimum is 0) and an all-zero group.
    k[0, 1] = 0
    k[0, 1, :6] = torch.tensor([fmt.qmax, 0.0, 0.5, 1.5, 2.5, 1.0625])
    got, want = ([kv_format.allocate(fmt, (4, 16, 3), 128, k.device) for _ in range(2)]
                 for _ in range(2))
    triton_ops.write_kv(k, v, *got, slots)
    reference.write_kv(k, v, *want, slots)
    for got_pool, want_pool in zip(got, want):
        for got_part, want_part in zip(got_pool, want_pool):
            if want_part is not None:  # as bits: fp8 has no equality op
                assert torch.equal(got_part.view(torch.uint8), want_part.view(torch.uint8))


@with_dtypes
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_fuses_the_residual_add(with_residual: bool, dtype: torch.dtype):
    x, weight = torch.randn(5, 96).to(dtype), torch.randn(96).to(dtype)
    residual = torch.randn(5, 96).to(dtype) if with_residual else None
    out, res = triton_ops.rms_norm(x, weight, 1e-6, residual)
    want_out, want_res = reference.rms_norm(x, weight, 1e-6, residual)
    torch.testing.assert_close(out, want_out, **TOLERANCES[dtype])
    torch.testing.assert_close(res, want_res, atol=0, rtol=0)


@with_dtypes
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_embedding_rotates_q_and_k_in_place(head_dim: int, dtype: torch.dtype):
    q, k, _ = _qkv_views(7, 6, 2, head_dim, dtype)
    positions = torch.tensor([0, 1, 2, 30, 31, 5, 17])
    cos_sin_cache = torch.randn(32, head_dim)  # fp32 whatever the activations, as the model's
    want_q, want_k = q.clone(), k.clone()
    reference.rotary_embedding(positions, want_q, want_k, cos_sin_cache)
    triton_ops.rotary_embedding(positions, q, k, cos_sin_cache)
    torch.testing.assert_close(q, want_q, **TOLERANCES[dtype])
    torch.testing.assert_close(k, want_k, **TOLERANCES[dtype])


@with_dtypes
def test_silu_and_mul_over_several_column_blocks(dtype: torch.dtype):
    x = (torch.randn(4, 2 * 100) * 4).to(dtype)
    out = triton_ops.silu_and_mul(x, block=32)
    torch.testing.assert_close(out, reference.silu_and_mul(x), **TOLERANCES[dtype])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's
@with_dtypes
def test_gelu_tanh_and_mul_over_several_column_blocks(dtype: torch.dtype):
    # Gates up to ~±15: exp(-2 * inner) overflows to inf for the most negative (tanh -> -1).
    x = (torch.randn(4, 2 * 100) * 4).to(dtype)
    out = triton_ops.gelu_tanh_and_mul(x, block=32)
    torch.testing.assert_close(out, reference.gelu_tanh_and_mul(x), **TOLERANCES[dtype])


def test_moe_align_gives_each_expert_whole_blocks_and_idle_experts_none():
    topk_ids = torch.tensor([[2, 0], [2, 5], [0, 2]])  # pair p is token p // 2's choice p % 2
    sorted_ids, block_experts = triton_moe.align(topk_ids, num_experts=6, block_m=4)
    # Expert 0's pairs 1 and 4, expert 2's 0, 2 and 5, expert 5's 3, each run padded with id 6;
    # experts 1, 3 and 4 have no pair and no block.
    assert sorted_ids[:12].tolist() == [1, 4, 6, 6, 0, 2, 5, 6, 3, 6, 6, 6]
    assert block_experts[:3].tolist() == [0, 2, 5]
    # Sized for the worst routing (six experts, three padding slots each); the rest is unused.
    assert sorted_ids.shape == (24,) and sorted_ids[12:].eq(6).all()
    assert block_experts[3:].tolist() == [6, 6, 6]


# The kernel rounds where the bf16 reference does not (fp32 through each GEMM, the routed weight
# and the sum over k): emulating both roundings on CPU over 20 seeds of these shapes needed
# atol 7e-3 beside this rtol.
MOE_TOLERANCES = {torch.float32: TOLERANCES[torch.float32],
                  torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}


@with_dtypes
@pytest.mark.parametrize("tiles", [None, (16, 32, 32)], ids=["default-tiles", "small-tiles"])
@pytest.mark.parametrize("activation", ["silu_and_mul", "gelu_tanh_and_mul"])
@pytest.mark.parametrize("num_tokens,used_experts", [(1, 6), (7, 3), (40, 4)])
def test_fused_moe_gathers_each_experts_tokens(num_tokens: int, used_experts: int,
                                               activation: str,
                                               tiles: tuple[int, int, int] | None,
                                               dtype: torch.dtype):
    # Hidden 72 and intermediate 40 leave masked tails in every tile size; small tiles split
    # the 40-token batch's experts over several blocks of pairs.
    experts, hidden, inter, top_k = 6, 72, 40, 2
    x = torch.randn(num_tokens, hidden).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter) / inter**0.5).to(dtype)
    # Routed among the first `used_experts` only: the others receive no token.
    topk_weights, topk_ids = torch.randn(num_tokens, used_experts).softmax(-1).topk(top_k)
    out = triton_moe.fused_moe(x, w13, w2, topk_weights, topk_ids,
                               getattr(triton_ops, activation), tiles)
    want = reference.fused_moe(x, w13, w2, topk_weights, topk_ids, getattr(reference, activation))
    torch.testing.assert_close(out, want, **MOE_TOLERANCES[dtype])


@with_dtypes
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size", ATTENTION_SHAPES)
def test_prefill_attention_over_mixed_batch(num_heads: int, num_kv_heads: int, head_dim: int,
                                            page_size: int, dtype: torch.dtype):
    # A decode row, a chunk attending to earlier pages, a fresh prompt longer than two query
    # tiles, and a short chunk deep into its context.
    batch = _paged_batch([1, 17, 35, 5], [40, 30, 35, 61], num_heads, num_kv_heads, head_dim,
                         page_size, dtype)
    out = triton_attention.paged_prefill_attention(*batch, 0.125, max_query_len=35,
                                                   block_m=16, block_n=16)
    want = reference.paged_attention(*batch, 0.125, max_query_len=35, max_seq_len=61)
    torch.testing.assert_close(out, want, **TOLERANCES[dtype])


@with_dtypes
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size", ATTENTION_SHAPES)
def test_decode_attention_merges_context_partitions(num_heads: int, num_kv_heads: int,
                                                    head_dim: int, page_size: int,
                                                    dtype: torch.dtype):
    # Contexts of one token, a ragged tail tile, exactly one partition, and several partitions.
    seq_lens = [1, 23, 32, 100]
    batch = _paged_batch([1] * 4, seq_lens, num_heads, num_kv_heads, head_dim, page_size,
                         dtype)
    out = triton_attention.paged_decode_attention(*batch, 0.125, max_seq_len=100,
                                                  partition=32, block_n=16)
    want = reference.paged_attention(*batch, 0.125, max_query_len=1, max_seq_len=100)
    torch.testing.assert_close(out, want, **TOLERANCES[dtype])


# Sliding windows: one key, one narrower than every context below (its edge mid-tile for some
# queries, on a tile edge for others), and one wider than some contexts but not the longest.
WINDOWS = [1, 20, 45]


@with_dtypes
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size", ATTENTION_SHAPES)
def test_prefill_attention_with_sliding_window(num_heads: int, num_kv_heads: int, head_dim: int,
                                               page_size: int, window: int, dtype: torch.dtype):
    # The mixed batch above: a 16-row query tile spans 16 positions, so a narrow window's edge
    # straddles several key tiles and cuts rows' windows differently within one tile.
    batch = _paged_batch([1, 17, 35, 5], [40, 30, 35, 61], num_heads, num_kv_heads, head_dim,
                         page_size, dtype)
    out = triton_attention.paged_prefill_attention(*batch, 0.125, max_query_len=35, block_m=16,
                                                   block_n=16, sliding_window=window)
    want = reference.paged_attention(*batch, 0.125, max_query_len=35, max_seq_len=61,
                                     sliding_window=window)
    torch.testing.assert_close(out, want, **TOLERANCES[dtype])


@with_dtypes
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size", ATTENTION_SHAPES)
def test_decode_attention_with_sliding_window(num_heads: int, num_kv_heads: int, head_dim: int,
                                              page_size: int, window: int, dtype: torch.dtype):
    # The contexts above; the 100-token one loses one, two or three whole 32-key partitions.
    seq_lens = [1, 23, 32, 100]
    batch = _paged_batch([1] * 4, seq_lens, num_heads, num_kv_heads, head_dim, page_size,
                         dtype)
    out = triton_attention.paged_decode_attention(*batch, 0.125, max_seq_len=100,
                                                  partition=32, block_n=16,
                                                  sliding_window=window)
    want = reference.paged_attention(*batch, 0.125, max_query_len=1, max_seq_len=100,
                                     sliding_window=window)
    torch.testing.assert_close(out, want, **TOLERANCES[dtype])


# Gemma 2 caps at 50, which scores of unit-variance q and k at scale 1/8 never near; 5 moves them.
SOFTCAP = 5.0


def _assert_cap_matters(batch, max_query_len: int, max_seq_len: int, **window) -> torch.Tensor:
    """The soft-capped reference, checked to differ from the uncapped one (else a kernel that
    ignored the cap would pass)."""
    want = reference.paged_attention(*batch, 0.125, max_query_len, max_seq_len, softcap=SOFTCAP,
                                     **window)
    uncapped = reference.paged_attention(*batch, 0.125, max_query_len, max_seq_len, **window)
    assert not torch.allclose(want, uncapped, atol=1e-2, rtol=1e-2)
    return want


@with_dtypes
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size", ATTENTION_SHAPES)
def test_prefill_attention_with_softcap(num_heads: int, num_kv_heads: int, head_dim: int,
                                        page_size: int, window: int | None, dtype: torch.dtype):
    batch = _paged_batch([1, 17, 35, 5], [40, 30, 35, 61], num_heads, num_kv_heads, head_dim,
                         page_size, dtype)
    want = _assert_cap_matters(batch, 35, 61, sliding_window=window)
    out = triton_attention.paged_prefill_attention(*batch, 0.125, max_query_len=35, block_m=16,
                                                   block_n=16, sliding_window=window,
                                                   softcap=SOFTCAP)
    torch.testing.assert_close(out, want, **TOLERANCES[dtype])


@with_dtypes
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size", ATTENTION_SHAPES)
def test_decode_attention_with_softcap(num_heads: int, num_kv_heads: int, head_dim: int,
                                       page_size: int, window: int | None, dtype: torch.dtype):
    batch = _paged_batch([1] * 4, [1, 23, 32, 100], num_heads, num_kv_heads, head_dim,
                         page_size, dtype)
    want = _assert_cap_matters(batch, 1, 100, sliding_window=window)
    out = triton_attention.paged_decode_attention(*batch, 0.125, max_seq_len=100, partition=32,
                                                  block_n=16, sliding_window=window,
                                                  softcap=SOFTCAP)
    torch.testing.assert_close(out, want, **TOLERANCES[dtype])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's
def test_softcap_saturates_huge_scores_without_nan():
    """Scores in the thousands: the kernels' exp2 inside tanh overflows to inf or underflows
    to 0, which must give tanh = ±1 exactly (no inf / inf), as torch's tanh does."""
    for query_lens, seq_lens in (([1] * 3, [1, 23, 40]), ([1, 17, 5], [40, 30, 37])):
        batch = _paged_batch(query_lens, seq_lens, 4, 2, 64, 16)
        args = (100.0, max(query_lens), max(seq_lens))
        want = reference.paged_attention(*batch, *args, softcap=1.0)
        if max(query_lens) == 1:
            out = triton_attention.paged_decode_attention(*batch, 100.0, max(seq_lens),
                                                          partition=32, block_n=16, softcap=1.0)
        else:
            out = triton_attention.paged_prefill_attention(*batch, 100.0, max(query_lens),
                                                           block_m=16, block_n=16, softcap=1.0)
        assert not out.isnan().any()
        torch.testing.assert_close(out, want, atol=ATOL, rtol=RTOL)


@with_dtypes
@pytest.mark.parametrize("window,softcap", [(None, None), (20, SOFTCAP)])
def test_attention_at_head_dim_256(window: int | None, softcap: float | None,
                                   dtype: torch.dtype):
    # Gemma's 256-wide head tile over short contexts. Prefill: a decode row, a chunk after
    # earlier pages, a fresh prompt; decode: one, two and three partitions.
    kw = dict(sliding_window=window, softcap=softcap)
    batch = _paged_batch([1, 9, 21], [30, 25, 21], *GEMMA2_2B_SHAPE, dtype)
    out = triton_attention.paged_prefill_attention(*batch, 0.0625, max_query_len=21, block_m=16,
                                                   block_n=16, **kw)
    want = reference.paged_attention(*batch, 0.0625, max_query_len=21, max_seq_len=30, **kw)
    torch.testing.assert_close(out, want, **TOLERANCES[dtype])
    batch = _paged_batch([1] * 3, [7, 40, 70], *GEMMA2_2B_SHAPE, dtype)
    out = triton_attention.paged_decode_attention(*batch, 0.0625, max_seq_len=70, partition=32,
                                                  block_n=16, **kw)
    want = reference.paged_attention(*batch, 0.0625, max_query_len=1, max_seq_len=70, **kw)
    torch.testing.assert_close(out, want, **TOLERANCES[dtype])


def _quantized_pages(batch, name: str):
    """`batch` with its K and V pools quantized to the format `name`."""
    q, k_cache, v_cache, *rest = batch
    fmt = kv_format.FORMATS[name]
    return (q, *(QuantizedPages(*kv_format.quantize(c, fmt)) for c in (k_cache, v_cache)),
            *rest)


# GQA 3 at head dim 64 on 16-slot pages (int4: one group per head), GQA 2 at head dim 128 on
# 8-slot pages (int4: two groups).
QUANTIZED_SHAPES = [(6, 2, 64, 16), (4, 2, 128, 8)]


@with_dtypes
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size", QUANTIZED_SHAPES)
@pytest.mark.parametrize("name", KV_FORMATS)
def test_attention_over_quantized_pages(name: str, num_heads: int, num_kv_heads: int,
                                        head_dim: int, page_size: int, dtype: torch.dtype):
    """Both kernels dequantize to q's dtype as the reference does, so they differ from it in
    summation order only. The batches of the prefill and decode tests above."""
    shape = (num_heads, num_kv_heads, head_dim, page_size)
    batch = _quantized_pages(_paged_batch([1, 17, 35, 5], [40, 30, 35, 61], *shape, dtype), name)
    out = triton_attention.paged_prefill_attention(*batch, 0.125, max_query_len=35, block_m=16,
                                                   block_n=16)
    want = reference.paged_attention(*batch, 0.125, max_query_len=35, max_seq_len=61)
    torch.testing.assert_close(out, want, **TOLERANCES[dtype])
    batch = _quantized_pages(_paged_batch([1] * 4, [1, 23, 32, 100], *shape, dtype), name)
    out = triton_attention.paged_decode_attention(*batch, 0.125, max_seq_len=100, partition=32,
                                                  block_n=16)
    want = reference.paged_attention(*batch, 0.125, max_query_len=1, max_seq_len=100)
    torch.testing.assert_close(out, want, **TOLERANCES[dtype])


@with_dtypes
def test_quantized_attention_with_sliding_window_and_softcap(dtype: torch.dtype):
    """int4 pages (scales and zeros) under a window and a soft cap, as Gemma 2's local layers."""
    kw = dict(sliding_window=20, softcap=SOFTCAP)
    batch = _quantized_pages(_paged_batch([1, 17, 35, 5], [40, 30, 35, 61], 6, 2, 64, 16, dtype),
                             "int4")
    want = _assert_cap_matters(batch, 35, 61, sliding_window=20)
    out = triton_attention.paged_prefill_attention(*batch, 0.125, max_query_len=35, block_m=16,
                                                   block_n=16, **kw)
    torch.testing.assert_close(out, want, **TOLERANCES[dtype])
    batch = _quantized_pages(_paged_batch([1] * 4, [1, 23, 32, 100], 6, 2, 64, 16, dtype), "int4")
    want = _assert_cap_matters(batch, 1, 100, sliding_window=20)
    out = triton_attention.paged_decode_attention(*batch, 0.125, max_seq_len=100, partition=32,
                                                  block_n=16, **kw)
    torch.testing.assert_close(out, want, **TOLERANCES[dtype])


@pytest.mark.parametrize("query_lens,seq_lens", [([1] * 4, [1, 23, 32, 100]),
                                                 ([1, 17, 35, 5], [40, 30, 35, 61])],
                         ids=["decode", "prefill"])
def test_sliding_window_reads_no_key_before_its_first_tile(query_lens: list[int],
                                                           seq_lens: list[int]):
    """Keys before the tile holding a request's first query's window start are NaN: a kernel
    that read them, masked or not, or a decode that merged a partition wholly before the
    window (it writes nothing), would return NaN."""
    window, block_n, page_size = 20, 16, 8
    batch = _paged_batch(query_lens, seq_lens, 6, 2, 64, page_size)
    _, k_cache, v_cache, _, _, table = batch
    want = reference.paged_attention(*batch, 0.125, max(query_lens), max(seq_lens),
                                     sliding_window=window)
    for r, (n, s) in enumerate(zip(query_lens, seq_lens)):
        unread = torch.arange(max(s - n + 1 - window, 0) // block_n * block_n)
        pages, offsets = table[r, unread // page_size].long(), unread % page_size
        k_cache[pages, offsets] = v_cache[pages, offsets] = float("nan")
    if max(query_lens) == 1:
        out = triton_attention.paged_decode_attention(*batch, 0.125, max(seq_lens),
                                                      partition=32, block_n=block_n,
                                                      sliding_window=window)
        # A grid sized for a longer context, as a CUDA graph's, merges the same partitions.
        wide = triton_attention.paged_decode_attention(*batch, 0.125, 256,
                                                       partition=32, block_n=block_n,
                                                       sliding_window=window)
        torch.testing.assert_close(wide, out, atol=0, rtol=0)
    else:
        out = triton_attention.paged_prefill_attention(*batch, 0.125, max(query_lens),
                                                       block_m=16, block_n=block_n,
                                                       sliding_window=window)
    assert not out.isnan().any()
    torch.testing.assert_close(out, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("sixteen_bit_matmuls_are_fast", [True, False])
def test_reference_decode_paths_agree_with_fp32(monkeypatch, sixteen_bit_matmuls_are_fast):
    """The reference decodes a few rows with SDPA and more with batched matmuls, in the
    cache's bf16 where the CPU runs 16-bit matmuls fast and in fp32 elsewhere (AVX2): each
    within bf16 rounding of fp32 SDPA over the same values."""
    monkeypatch.setattr(reference, "SIXTEEN_BIT_MATMULS_ARE_FAST", sixteen_bit_matmuls_are_fast)
    seq_lens = [1, 23, 32, 100, 7, 64, 65, 40]
    q, k_cache, v_cache, starts, lens, table = _paged_batch([1] * 8, seq_lens, 6, 2, 64, 16,
                                                            torch.bfloat16)
    want = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), starts, lens,
                                     table, 0.125, max_query_len=1, max_seq_len=100)
    for rows in (2, 8):  # SDPA, then the matmuls
        got = reference.paged_attention(q[:rows], k_cache, v_cache, starts[:rows + 1],
                                        lens[:rows], table[:rows], 0.125, max_query_len=1,
                                        max_seq_len=max(seq_lens[:rows]))
        torch.testing.assert_close(got.float(), want[:rows], **TOLERANCES[torch.bfloat16])


@pytest.mark.skipif(DEVICE != "cuda", reason="thousands of keys at the engine's 64-key tiles "
                    "take ~25 s in the interpreter; runs compiled on a GPU (TRITON_INTERPRET=0)")
@with_dtypes
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size,softcap",
                         [(*shape, None) for shape in ATTENTION_SHAPES]
                         + [(*GEMMA2_2B_SHAPE, 50.0)])  # Gemma 2's cap
def test_attention_at_engine_tile_sizes_over_long_contexts(num_heads: int, num_kv_heads: int,
                                                           head_dim: int, page_size: int,
                                                           softcap: float | None,
                                                           dtype: torch.dtype):
    # The wrappers' default tiles, as the engine launches them. Prefill: a decode row deep in
    # a context, a 300-token chunk after 1200 earlier tokens, a fresh 700-token prompt (11
    # query tiles), and a 65-token chunk one past a tile edge.
    batch = _paged_batch([1, 300, 700, 65], [1537, 1500, 700, 2113], num_heads, num_kv_heads,
                         head_dim, page_size, dtype)
    out = triton_attention.paged_prefill_attention(*batch, 0.125, max_query_len=700,
                                                   softcap=softcap)
    want = reference.paged_attention(*batch, 0.125, max_query_len=700, max_seq_len=2113,
                                     softcap=softcap)
    torch.testing.assert_close(out, want, **TOLERANCES[dtype])
    # Decode: contexts on both sides of the 512-key partition edges, up to five partitions.
    seq_lens = [1, 511, 512, 513, 1025, 2113]
    batch = _paged_batch([1] * 6, seq_lens, num_heads, num_kv_heads, head_dim, page_size, dtype)
    out = triton_attention.paged_decode_attention(*batch, 0.125, max_seq_len=2113, softcap=softcap)
    want = reference.paged_attention(*batch, 0.125, max_query_len=1, max_seq_len=2113,
                                     softcap=softcap)
    torch.testing.assert_close(out, want, **TOLERANCES[dtype])
    # A grid sized for a longer context than any row has, as a CUDA graph captured for
    # max_model_len launches it, gives the same bits as the eager step's grid.
    wide = triton_attention.paged_decode_attention(*batch, 0.125, max_seq_len=4096, softcap=softcap)
    torch.testing.assert_close(wide, out, atol=0, rtol=0)


@pytest.mark.parametrize("window,softcap", [(None, None), (3, SOFTCAP)])
def test_dispatch_sends_decode_and_prefill_batches_to_their_kernels(monkeypatch,
                                                                   window: int | None,
                                                                   softcap: float | None):
    monkeypatch.setattr(kernels, "uses_triton", lambda x: True)
    calls = []
    for name in ("paged_decode_attention", "paged_prefill_attention"):
        kernel = getattr(triton_attention, name)
        monkeypatch.setattr(triton_attention, name,
                            lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    for query_lens, seq_lens in (([1, 1], [20, 3]), ([1, 4], [20, 6])):
        batch = _paged_batch(query_lens, seq_lens, 4, 2, 64, 16)
        args = (0.125, max(query_lens), max(seq_lens), window, softcap)
        torch.testing.assert_close(kernels.paged_attention(*batch, *args),
                                   reference.paged_attention(*batch, *args),
                                   atol=ATOL, rtol=RTOL)
    assert calls == ["paged_decode_attention", "paged_prefill_attention"]
