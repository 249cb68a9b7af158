"""The CPU's decode attention op (kernels/decode_attention_cpu.cpp) equals torch's gathered path
(kernels.reference), which the engine takes where the op is not loaded."""
import pytest
import torch

import kernels
from engine.layers.quantization import kernel_choice
from kernels import kv_format, reference

pytestmark = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="the CPU ops need AVX2")

TOLERANCES = {torch.float32: dict(atol=2e-5, rtol=1e-4),
              # bf16 out: both round the same fp32 result, which may differ in its last bits
              torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
              torch.float16: dict(atol=2e-3, rtol=2e-3)}


@pytest.fixture(scope="module", autouse=True)
def _ops():
    assert kernels.cpu_kernels_available(kernel_choice.cache_dir())


def _batch(heads, kv_heads, dim, dtype, lens, page_size=16, num_pages=64, seed=0):
    """Queries of `len(lens)` rows and pools whose pages each row holds scattered over the
    pool, as a server's are."""
    g = torch.Generator().manual_seed(seed)
    k_pool, v_pool = (torch.randn(num_pages, page_size, kv_heads, dim, generator=g).to(dtype)
                      for _ in range(2))
    width = max(-(-n // page_size) for n in lens) + 1  # a spare column, as tables have
    table = torch.randperm(num_pages, generator=g)[: len(lens) * width].view(len(lens), width)
    q = torch.randn(len(lens), heads, dim, generator=g).to(dtype)
    return q, k_pool, v_pool, table, torch.tensor(lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 128), (16, 2, 256), (5, 1, 16)])
@pytest.mark.parametrize("window,softcap", [(None, None), (20, None), (None, 30.0), (7, 5.0)])
def test_decode_attention_op_matches_the_gathered_path(dtype, heads, kv_heads, dim, window,
                                                       softcap):
    """Rows of 1 key, a page's worth, a page and a bit, and longer than any window; scores
    with and without Gemma 2's soft cap (a small cap bends them). The gathered path runs in
    fp32 on the same values: in bf16 it rounds its operands and products, the op does not."""
    lens = [1, 16, 17, 45, 100, 3]
    q, k_pool, v_pool, table, seq_lens = _batch(heads, kv_heads, dim, dtype, lens)
    ours = torch.ops.tessera.decode_attention(q, k_pool, v_pool, table, seq_lens, 0.125,
                                              window or 0, softcap or 0.0)
    expected = reference._gathered_decode_attention(q.float(), k_pool.float(), v_pool.float(),
                                                    seq_lens, table, 0.125, max(lens), window,
                                                    softcap)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.float(), expected.to(dtype).float(), **TOLERANCES[dtype])


def _quantized(pool, fmt, keys=False):
    return kv_format.QuantizedPages(*kv_format.quantize(pool, kv_format.FORMATS[fmt], keys))


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (16, 2, 256), (5, 1, 16)])
@pytest.mark.parametrize("window,softcap", [(None, None), (7, 5.0)])
def test_quantized_pages_are_read_in_place_as_the_gathered_path_reads_them(
        fmt, dtype, heads, kv_heads, dim, window, softcap):
    """Codes times their token-head's scale (int4: its group's, plus the zero point; 4 groups of
    64 channels at head dim 256, one at 16), as `kv_format.dequantize` gives them to the gathered
    path, here in fp32 (in bf16 it rounds each value twice: the op does not round them)."""
    lens = [1, 16, 17, 45, 100, 3]
    q, k_pool, v_pool, table, seq_lens = _batch(heads, kv_heads, dim, dtype, lens)
    k, v = _quantized(k_pool, fmt, keys=True), _quantized(v_pool, fmt)
    ours = torch.ops.tessera.decode_attention(q, k.codes, v.codes, table, seq_lens, 0.125,
                                              window or 0, softcap or 0.0, k.scales, v.scales,
                                              k.zeros, v.zeros)
    expected = reference._gathered_decode_attention(q.float(), k, v, seq_lens, table, 0.125,
                                                    max(lens), window, softcap)
    torch.testing.assert_close(ours.float(), expected.to(dtype).float(), **TOLERANCES[dtype])


def test_every_fp8_code_reads_as_its_value():
    """The op converts e4m3 by its bits (AVX2 has no instruction for it): every non-NaN code,
    subnormals and both zeros included, read back as a row's only value."""
    bits = torch.arange(256, dtype=torch.uint8)
    bits = torch.cat([bits[(bits & 0x7F) != 0x7F], bits.new_zeros(2)])  # 254 codes, 2 zeros
    pool = bits.view(torch.float8_e4m3fn).view(16, 1, 1, 16)  # 16 pages of one slot
    ones = torch.ones(16, 1, 1, 1, dtype=torch.bfloat16)
    out = torch.ops.tessera.decode_attention(torch.zeros(16, 1, 16), pool, pool,
                                             torch.arange(16).view(16, 1),
                                             torch.ones(16, dtype=torch.long), 1.0, 0, 0.0,
                                             ones, ones)
    assert torch.equal(out.view(-1), pool.float().view(-1))


@pytest.mark.parametrize("fmt", [None, "int8", "int4"])
def test_the_engine_s_decode_attention_takes_the_op(fmt):
    """kernels.paged_attention's decode step on a plain or quantized pool returns the op's own
    result."""
    q, k_pool, v_pool, table, seq_lens = _batch(9, 3, 64, torch.bfloat16, [5, 40])
    pools, quant = (k_pool, v_pool), ()
    if fmt:
        k_pool, v_pool = _quantized(k_pool, fmt), _quantized(v_pool, fmt)
        pools, quant = (k_pool.codes, v_pool.codes), (k_pool.scales, v_pool.scales,
                                                      k_pool.zeros, v_pool.zeros)
    starts = torch.tensor([0, 1, 2])
    out = kernels.paged_attention(q, k_pool, v_pool, starts, seq_lens, table, 0.125, 1, 40)
    assert torch.equal(out, torch.ops.tessera.decode_attention(q, *pools, table, seq_lens,
                                                               0.125, 0, 0.0, *quant))


@pytest.mark.parametrize("bad", ["page", "length"])
def test_a_table_pointing_outside_the_pool_is_refused(bad):
    q, k_pool, v_pool, table, seq_lens = _batch(9, 3, 64, torch.float32, [5, 40])
    if bad == "page":
        table[1, 2] = k_pool.shape[0]
    else:
        seq_lens[0] = table.shape[1] * k_pool.shape[1] + 1
    with pytest.raises(RuntimeError, match="block table|not in the pool"):
        torch.ops.tessera.decode_attention(q, k_pool, v_pool, table, seq_lens, 0.125, 0, 0.0)
