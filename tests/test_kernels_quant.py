"""The quantized linears: each reference against weights dequantized by hand, each GPU kernel
against its reference.

Where the kernels run, as in tests/test_kernels.py: the Triton interpreter on CPU tensors (fp32)
by default; with TRITON_INTERPRET=0 and a GPU, compiled on CUDA tensors in fp32 and bf16.
"""
import contextlib

from tests.triton_mode import kernel_test_device  # first: it sets TRITON_INTERPRET

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels import reference, triton_quant  # noqa: E402
from kernels.triton_quant import DECODE_TILES, PREFILL_TILES  # noqa: E402

DEVICE = kernel_test_device()

# As tests/test_kernels.py's: the kernels and the references differ in summation order only
# (and, in bf16, by an ulp or two where their fp32 sums differ in the last bits).
TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-3),
              torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
with_dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
# Decode (the 16-row tile, split K), both sides of its edge, and prefill's 128-row tiles.
SIZES_M = [1, 7, 16, 33, 300]
# Int32 words of 4-bit codes, low nibble first: 0x76543210 holds the codes 0, 1, .., 7.
CODES_0_TO_7, CODES_8_TO_15 = 0x76543210, 0xFEDCBA98 - 2**32  # as int32


@pytest.fixture(autouse=True)
def _seed():
    """Seeded, and every tensor a test makes is on DEVICE (CPU: unchanged)."""
    torch.manual_seed(0)
    with torch.device(DEVICE) if DEVICE != "cpu" else contextlib.nullcontext():
        yield


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes `[N, K]` (0..15) as pack-quantized int32 words `[N, K / 8]`: code 8j + i in bits
    4i..4i+3 of word j."""
    words = torch.zeros(codes.shape[0], codes.shape[1] // 8, dtype=torch.int64,
                        device=codes.device)
    for i in range(8):
        words |= codes[:, i::8].long() << (4 * i)
    return torch.where(words >= 2**31, words - 2**32, words).int()


def test_reference_dequantizes_the_pack_quantized_layout():
    # K = 40: a group of 32 and a partial group of 8. Row 0 holds the codes k % 16, row 1
    # (k + 8) % 16, written as words by hand.
    qweight = torch.tensor([[CODES_0_TO_7, CODES_8_TO_15] * 2 + [CODES_0_TO_7],
                            [CODES_8_TO_15, CODES_0_TO_7] * 2 + [CODES_8_TO_15]],
                           dtype=torch.int32)
    scales = torch.tensor([[0.5, 2.0], [1.0, 0.25]])
    zeros = torch.tensor([[3, 10], [0, 15]], dtype=torch.uint8)
    k = torch.arange(40)
    codes = torch.stack([k % 16, (k + 8) % 16]).float()
    group = (k // 32).expand(2, -1)
    scale, zero = scales.gather(1, group), zeros.gather(1, group).float()
    assert torch.equal(reference.dequantize_int4(qweight, scales, zeros, 32, 40),
                       (codes - zero) * scale)
    assert torch.equal(reference.dequantize_int4(qweight, scales, None, 32, 40),
                       (codes - 8) * scale)
    x = torch.randn(3, 40)
    want = F.linear(x, (codes - zero) * scale)
    torch.testing.assert_close(reference.w4a16_linear(x, qweight, scales, zeros, 32), want)
    torch.testing.assert_close(triton_quant.w4a16_linear(x, qweight, scales, zeros, 32), want,
                               **TOLERANCES[torch.float32])


def _int4_weight(size_n: int, size_k: int, group_size: int, with_zeros: bool,
                 dtype: torch.dtype):
    groups = -(-size_k // group_size)
    qweight = _pack_nibbles(torch.randint(0, 16, (size_n, size_k)))
    scales = (torch.rand(size_n, groups) * 0.05 + 0.01).to(dtype)
    zeros = torch.randint(0, 16, (size_n, groups), dtype=torch.uint8) if with_zeros else None
    return qweight, scales, zeros


@with_dtypes
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("with_zeros", [True, False], ids=["zeros", "symmetric"])
# K tiles are groups: 200 ends in a partial group of 8, 328 in one of 72; 576 is 9 whole groups.
@pytest.mark.parametrize("size_k,group_size", [(200, 32), (328, 128), (576, 64)])
@pytest.mark.parametrize("size_m", SIZES_M)
def test_w4a16_kernel_equals_reference(size_m: int, size_k: int, group_size: int,
                                       with_zeros: bool, split_k: int, dtype: torch.dtype):
    # N = 96: a partial second 64-column tile (decode) or a partial 128-column one (prefill).
    weight = _int4_weight(96, size_k, group_size, with_zeros, dtype)
    x = torch.randn(size_m, size_k).to(dtype)
    out = triton_quant.w4a16_linear(x, *weight, group_size, split_k=split_k)
    torch.testing.assert_close(out, reference.w4a16_linear(x, *weight, group_size),
                               **TOLERANCES[dtype])


def test_int8_quantizer_rounds_half_to_even_by_hand():
    # Row 0: max |x| 254, so scale 2 exactly: -63.5, 0.5, 1.5 and 2.5 are ties. Row 1: zeros.
    x = torch.tensor([[254.0, -127.0, 1.0, 3.0, 5.0, -0.5, 100.0, 0.0],
                      [0.0] * 8])
    want_codes = torch.tensor([[127, -64, 0, 2, 2, 0, 50, 0], [0] * 8], dtype=torch.int8)
    want_scales = torch.tensor([2.0, 1e-30 / 127])
    for quantize in (reference.quantize_per_token_int8, triton_quant.quantize_per_token_int8):
        codes, scales = quantize(x)
        assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales), quantize


@with_dtypes
def test_int8_quantizer_kernel_equals_reference(dtype: torch.dtype):
    # Rows of 200 over magnitudes 1e-3 .. 1e3, read in 64-wide chunks (the last one partial).
    x = (torch.randn(9, 200) * 10 ** torch.linspace(-3, 3, 9)[:, None]).to(dtype)
    codes, scales = triton_quant.quantize_per_token_int8(x, block=64)
    want_codes, want_scales = reference.quantize_per_token_int8(x)
    assert torch.equal(codes, want_codes)
    assert torch.equal(scales, want_scales)


def _int8_weight(size_n: int, size_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randint(-127, 128, (size_n, size_k), dtype=torch.int8),
            torch.rand(size_n) * 0.01 + 1e-3)


def _cpu_reference(op, *args):
    """`op` on CPU copies of `args`, on DEVICE: torch._int_mm on CUDA refuses M <= 16."""
    out = op(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    return out.to(DEVICE)


def test_reference_w8a8_is_the_exact_integer_product():
    with torch.device("cpu"):  # the reference's torch._int_mm takes M <= 16 on CPU only
        x = torch.randn(7, 200) * 3
        weight, weight_scale = _int8_weight(80, 200)
    codes, x_scale = reference.quantize_per_token_int8(x)
    exact = codes.double() @ weight.double().T  # integers below 2^53: no rounding
    want = exact.float() * x_scale[:, None] * weight_scale
    assert torch.equal(reference.w8a8_linear(x, weight, weight_scale), want)


@with_dtypes
@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("size_m", SIZES_M)
def test_w8a8_kernel_equals_reference_exactly(size_m: int, split_k: int, dtype: torch.dtype):
    """The int32 dot products are exact, split or not, and both scales are applied in the
    reference's order: the same bits. K = 200: a whole 128-deep tile and a partial one."""
    x = (torch.randn(size_m, 200) * 3).to(dtype)
    weight, weight_scale = _int8_weight(80, 200)
    out = triton_quant.w8a8_linear(x, weight, weight_scale, split_k=split_k)
    want = _cpu_reference(reference.w8a8_linear, x, weight, weight_scale)
    torch.testing.assert_close(out, want, atol=0, rtol=0)


@with_dtypes
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_quant_int8_fuses_the_quantizer(with_residual: bool, dtype: torch.dtype):
    """Codes within one step of the reference's: the kernel's rsqrt may differ from torch's in
    the last bit, which can move a code that sits on a rounding tie, and in bf16 move the
    normalized row's largest value (so its scale) by an ulp, 2^-8."""
    x, weight = torch.randn(5, 96).to(dtype), torch.randn(96).to(dtype)
    residual = torch.randn(5, 96).to(dtype) if with_residual else None
    codes, scales, res = triton_quant.rms_norm_quant_int8(x, weight, 1e-6, residual)
    want_codes, want_scales, want_res = reference.rms_norm_quant_int8(x, weight, 1e-6, residual)
    assert (codes.int() - want_codes.int()).abs().max() <= 1
    torch.testing.assert_close(scales, want_scales, atol=0,
                               rtol=1e-6 if dtype == torch.float32 else 2**-7)
    torch.testing.assert_close(res, want_res, atol=0, rtol=0)


def test_fp8_quantizer_by_hand():
    # max |x| 896: scale 2; 0.3 / 2 = 0.15 lies between e4m3's 0.140625 and 0.15625.
    codes, scales = reference.quantize_per_token_fp8(torch.tensor([[896.0, -1.0, 0.3, 0.0]]))
    assert torch.equal(codes.float(), torch.tensor([[448.0, -0.5, 0.15625, 0.0]]))
    assert torch.equal(scales, torch.tensor([2.0]))


@with_dtypes
@pytest.mark.parametrize("size_m", [1, 7, 33])
def test_fp8_scaled_mm_equals_reference(size_m: int, dtype: torch.dtype):
    """`torch._scaled_mm` (CPU has one too) on the same fp8 codes as the reference's dequantized
    product; its output is bf16 whatever x's dtype. The reference itself stays within fp8's
    rounding of the unquantized product."""
    x = torch.randn(size_m, 64).to(dtype)
    dense = torch.randn(48, 64) / 8
    weight_scale = dense.abs().amax(-1) / reference.FP8_MAX
    weight = (dense / weight_scale[:, None]).to(torch.float8_e4m3fn)
    want = reference.fp8_linear(x, weight, weight_scale)
    torch.testing.assert_close(triton_quant.fp8_linear(x, weight, weight_scale), want,
                               **TOLERANCES[torch.bfloat16])
    torch.testing.assert_close(want.float(), F.linear(x.float(), dense), atol=0.15, rtol=0.1)


def test_split_k_fills_the_gpu_only_with_few_output_tiles():
    plan = triton_quant._split_plan
    # Llama-3-8B decode: o_proj's 64 column tiles take 6 splits of its 64 K tiles (396 CTAs),
    # gate_up's 448 tiles none; prefill's 512 tiles none.
    assert plan(1, 4096, 64, DECODE_TILES, None) == (6, 11)
    assert plan(16, 28672, 64, DECODE_TILES, None) == (1, 64)
    assert plan(2048, 4096, 64, PREFILL_TILES, None) == (1, 64)
    # Never an empty split: 7 tiles asked into 3 splits take 3, 3 and 1; 5 splits take 4 of 2.
    assert plan(1, 96, 7, DECODE_TILES, 3) == (3, 3)
    assert plan(1, 96, 7, DECODE_TILES, 5) == (4, 2)
    assert plan(1, 96, 2, DECODE_TILES, 8) == (2, 1)


def test_dispatch_sends_quantized_linears_to_the_gpu_module(monkeypatch):
    """Through `kernels` at the default tiles and splits, as the layers call them."""
    monkeypatch.setattr(kernels, "uses_triton", lambda x: True)
    calls = []
    for name in ("w4a16_linear", "w8a8_linear", "w8a8_gemm", "quantize_per_token_int8",
                 "rms_norm_quant_int8", "fp8_linear"):
        kernel = getattr(triton_quant, name)
        monkeypatch.setattr(triton_quant, name,
                            lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    x = torch.randn(7, 256)
    int4 = _int4_weight(96, 256, 128, True, torch.float32)
    torch.testing.assert_close(kernels.w4a16_linear(x, *int4, 128),
                               reference.w4a16_linear(x, *int4, 128), **TOLERANCES[torch.float32])
    int8 = _int8_weight(80, 256)
    torch.testing.assert_close(kernels.w8a8_linear(x, *int8),
                               _cpu_reference(reference.w8a8_linear, x, *int8), atol=0, rtol=0)
    assert torch.equal(kernels.quantize_per_token_int8(x)[0],
                       _cpu_reference(lambda t: reference.quantize_per_token_int8(t)[0], x))
    tokens = reference.quantize_per_token_int8(x.cpu())
    torch.testing.assert_close(
        kernels.w8a8_gemm(*(t.to(DEVICE) for t in tokens), *int8, x.dtype),
        _cpu_reference(reference.w8a8_gemm, *tokens, *int8, x.dtype), atol=0, rtol=0)
    norm_weight = torch.randn(256)
    codes, _, _ = kernels.rms_norm_quant_int8(x, norm_weight, 1e-6)
    want_codes, _, _ = reference.rms_norm_quant_int8(x, norm_weight, 1e-6)
    assert (codes.int() - want_codes.int()).abs().max() <= 1
    fp8 = (torch.randn(48, 256).to(torch.float8_e4m3fn), torch.rand(48) * 0.01)
    torch.testing.assert_close(kernels.fp8_linear(x, *fp8), reference.fp8_linear(x, *fp8),
                               **TOLERANCES[torch.bfloat16])
    assert set(calls) == {"w4a16_linear", "w8a8_linear", "w8a8_gemm",
                          "quantize_per_token_int8", "rms_norm_quant_int8", "fp8_linear"}
