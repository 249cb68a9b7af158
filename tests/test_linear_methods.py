"""The linear-method seam: the registry, fused-shard loading, each method's kernels against a
float reference, the integer GEMM's exactness, and the per-machine kernel choice."""
import json
import os
import platform
import subprocess
import sys
import time

import pytest
import torch
from torch.nn import functional as F

import kernels
from engine.config import QUANTIZATIONS, ModelConfig
from engine.layers.linear import Linear, VocabEmbedding
from engine.layers.quantization import (QUANTIZATION_METHODS, get_linear_method,
                                        plan_layer_kernels, resolve_quantization)
from engine.layers.quantization import kernel_choice
from engine.layers.quantization.checkpoint import ChannelWeight, Int4Weight
from engine.layers.quantization.dense import DenseMethod
from engine.layers.quantization.gguf import QuantizedWeight
from engine.layers.quantization.int8 import RAW_WEIGHT_KERNELS, rotation_block
from engine import model_runner
from engine.model_runner import default_dtype, resolve_dtype
from kernels import reference

OUTPUT_SIZES = [64, 32, 32]  # a fused q|k|v with 2:1 grouped-query heads
IN_FEATURES = 256
TOKEN_COUNTS = [1, 3, 33, 130]


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path, monkeypatch):
    """Each test measures into its own cache (and process-wide plans start empty)."""
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernel_choice, "_PLANS", {})


def _dense_shard(rows: int, cols: int, gen: torch.Generator):
    w = torch.randn(rows, cols, generator=gen) * 0.05
    return w, w


def _q4_shard(rows: int, cols: int, gen: torch.Generator):
    """Codes with per-group scales and minimums as real Q4_1 layers have them: each group's
    values spread about zero (minimum near -7.5 steps)."""
    groups = cols // 32
    scales = torch.rand(rows, groups, generator=gen) * 0.01
    minimums = -7.5 * scales * (1 + 0.2 * torch.randn(rows, groups, generator=gen))
    q = QuantizedWeight(torch.randint(0, 16, (rows, cols), generator=gen, dtype=torch.uint8),
                        scales, minimums)
    return q, q.dequantize()


def _int4_shard(rows: int, cols: int, gen: torch.Generator):
    """A checkpoint's int4 groups of 64 (compressed-tensors, AWQ, GPTQ), asymmetric."""
    q = Int4Weight(torch.randint(0, 16, (rows, cols), generator=gen, dtype=torch.uint8),
                   torch.rand(rows, cols // 64, generator=gen) * 0.01,
                   torch.randint(4, 12, (rows, cols // 64), generator=gen, dtype=torch.uint8),
                   64)
    return q, q.dequantize()


def _channel_shard(dtype: torch.dtype):
    def make(rows: int, cols: int, gen: torch.Generator):
        w = torch.randn(rows, cols, generator=gen) * 0.05
        scales = w.abs().amax(1) / (127 if dtype == torch.int8 else 448)
        codes = w / scales[:, None]
        codes = codes.round().to(dtype) if dtype == torch.int8 else codes.to(dtype)
        return ChannelWeight(codes, scales), codes.float() * scales[:, None]
    return make


# Per method: a random checkpoint shard in its format with its float values, the activation
# dtype, and the error bound relative to the output's largest magnitude. bf16 activations and
# outputs cost ~1%; int8 per-channel weights (step max|row|/127) and per-token activations add
# about as much again.
CASES = {"none": (_dense_shard, torch.float32, 1e-6),
         "int8": (_dense_shard, torch.bfloat16, 0.03),
         "gguf": (_q4_shard, torch.bfloat16, 0.03),
         "w4a16": (_int4_shard, torch.bfloat16, 0.02),
         "w8a8": (_channel_shard(torch.int8), torch.bfloat16, 0.03),
         "fp8": (_channel_shard(torch.float8_e4m3fn), torch.bfloat16, 0.02)}


def _loaded_layer(name: str, gen: torch.Generator, output_sizes=OUTPUT_SIZES,
                  in_features=IN_FEATURES, plan: bool = True):
    """A layer of method `name` loaded with random shards, its kernels planned unless `plan`
    is false (planning frees an int8 weight that the plan does not read)."""
    make_shard, dtype, _ = CASES[name]
    method = get_linear_method(name)
    with default_dtype(dtype):
        layer = Linear(in_features, sum(output_sizes), bias=True, method=method,
                       output_sizes=output_sizes)
    dense = []
    for shard, rows in enumerate(output_sizes):
        loaded, values = make_shard(rows, in_features, gen)
        layer.weight.weight_loader(layer.weight, loaded, shard)
        layer.bias.weight_loader(layer.bias, torch.zeros(rows) + shard, shard)
        dense.append(values)
    method.process_weights_after_loading(layer)
    if plan:
        plan_layer_kernels([layer])
    return layer, torch.cat(dense)


def test_registry_names_are_the_cli_choices():
    assert ("auto", *QUANTIZATION_METHODS) == QUANTIZATIONS
    assert set(CASES) == set(QUANTIZATION_METHODS)


def test_auto_is_the_gguf_codes_on_cpu_and_dense_elsewhere():
    assert resolve_quantization("auto", "gguf", "cpu") == "gguf"
    assert resolve_quantization("auto", "gguf", "cuda") == "none"
    assert resolve_quantization("auto", "hf", "cpu") == "none"
    assert resolve_quantization("none", "gguf", "cpu") == "none"
    assert type(get_linear_method("none")) is DenseMethod
    assert ModelConfig().quantization == "auto"


def test_auto_dtype_is_bf16_for_integer_kernels_on_a_cpu_without_bf16_matmuls(monkeypatch):
    monkeypatch.setattr(model_runner, "cpu_bf16_feature", lambda: None)  # an AVX2 CPU
    dtypes = {name: resolve_dtype("auto", "cpu", get_linear_method(name).integer_kernels)[0]
              for name in ("gguf", "int8", "none", "w8a8")}  # w8a8's LM head is dense
    assert dtypes == {"gguf": torch.bfloat16, "int8": torch.bfloat16, "none": torch.float32,
                      "w8a8": torch.float32}
    assert resolve_dtype("float32", "cpu", True)[0] == torch.float32


def test_unknown_quantization_is_rejected():
    with pytest.raises(ValueError, match="quantization must be one of none, int8, gguf, "
                                         "w4a16, w8a8, fp8"):
        get_linear_method("q8")
    with pytest.raises(ValueError, match="quantization must be one of auto, none, int8, gguf, "
                                         "w4a16"):
        ModelConfig(quantization="q8")


def test_fused_shards_land_at_their_rows():
    layer = Linear(4, sum(OUTPUT_SIZES), bias=True, method=DenseMethod(),
                   output_sizes=OUTPUT_SIZES)
    for shard, rows in enumerate(OUTPUT_SIZES):
        layer.weight.weight_loader(layer.weight, torch.full((rows, 4), float(shard)), shard)
        layer.bias.weight_loader(layer.bias, torch.full((rows,), float(shard)), shard)
    expected = torch.cat([torch.full((rows,), float(i)) for i, rows in enumerate(OUTPUT_SIZES)])
    assert torch.equal(layer.weight[:, 0], expected)
    assert torch.equal(layer.bias, expected)


@pytest.mark.parametrize("name", list(QUANTIZATION_METHODS))
@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
def test_apply_matches_f_linear_on_the_checkpoint_weight(name, num_tokens):
    """Through the measured plan: whatever kernel this machine picks for the step size. An
    int8 weight that no kernel of the plan reads is gone."""
    gen = torch.Generator().manual_seed(0)
    layer, dense = _loaded_layer(name, gen)
    if (plan := getattr(layer, "kernel_plan", None)) is not None:
        assert layer.weight.is_meta == RAW_WEIGHT_KERNELS.isdisjoint(plan.names)
    dtype, bound = CASES[name][1:]
    x = torch.randn(num_tokens, IN_FEATURES, generator=gen).to(dtype)
    y = layer(x).float()
    expected = F.linear(x.float(), dense, layer.bias.float())
    assert (y - expected).abs().max() <= bound * expected.abs().max()


@pytest.mark.parametrize("name", ["int8", "gguf"])
@pytest.mark.parametrize("shape", [(960, 576), (576, 1536)])  # SmolLM2's qkv and down
def test_every_kernel_matches_the_weight_it_holds(name, shape):
    """Each candidate on its own, at real shapes, against fp32 on the weight the layer really
    holds: the 4-bit codes for int4, the rotated int8 requantization for the int8 kernels."""
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(1)
    layer, dense = _loaded_layer(name, gen, [out_features], in_features, plan=False)
    # int8 of the rotated weight, rotated back: the checkpoint's values up to rounding by
    # steps of max |row| / 127: ~0.8% of the weight's norm for Gaussian rows and for real
    # SmolLM2 layers (0.74-0.81%), ~1.1% for these uniform codes; twice that with +-64 codes
    held = kernels.rotate(layer.weight.float() * layer.weight_scale[:, None],
                          layer.rotation_block)
    code_max = layer.method.code_max
    assert code_max == kernel_choice.linear_int8_code_max()
    assert layer.weight.abs().max() <= code_max
    assert (held - dense).norm() <= 0.015 * 127 / code_max * dense.norm()
    candidates = layer.method.candidates(layer)
    names = {"w8a16", "w8a8"} | ({"int4"} if name == "gguf" else set())
    if kernel_choice.fbgemm_gemm_is_exact(code_max):
        names.add("w8a8-fbgemm")
    if name == "gguf" and _int_gemv_builds():
        names.add("w4a8")
    assert set(candidates) == names
    for num_tokens in (1, 7, 64, reference.BF16_ROTATION_MIN_ROWS):
        x = torch.randn(num_tokens, in_features, generator=gen).bfloat16()
        for kernel, run in candidates.items():
            expected = (F.linear(x.float(), dense) if kernel in ("int4", "w4a8")
                        else layer.method.reference(layer, x))
            error = (run(x).float() - expected).abs().max()
            # bf16 output rounding; the w8a8s and w4a8 also round activations to int8
            bound = (0.01 if kernel in ("int4", "w8a16") else 0.02) * expected.abs().max()
            assert error <= bound, (kernel, num_tokens, error)


@pytest.mark.parametrize("block", [256, 576, 1536])  # 2^8; SmolLM2's 9 x 64 and 3 x 512
def test_rotation_is_orthonormal_spreads_each_channel_and_leaves_the_product_unchanged(block):
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(5, 2 * block, generator=gen), torch.randn(32, 2 * block, generator=gen)
    assert torch.allclose(kernels.rotate(kernels.rotate(x, block), block), x, atol=1e-5)
    assert torch.allclose(kernels.rotate(x, block) @ kernels.rotate(w, block).t(), x @ w.t(),
                          atol=1e-4)
    # one channel lands on every channel of its block, none with more than twice the share
    # of an even spread (a Hartley factor's cos + sin reaches sqrt(2))
    spread = kernels.rotate(torch.eye(block), block).abs()
    assert spread.min() > 0 and spread.max() <= (2 / block) ** 0.5 + 1e-6


@pytest.mark.parametrize("block", [512, 576, 1536])
def test_a_large_bf16_activation_rotates_in_bf16_within_its_rounding(block):
    """Prefill-sized bf16 activations rotate in bf16 where 16-bit matmuls are fast, off the
    fp32 rotation by bf16's rounding; fewer rows, or fp32 inputs, rotate in fp32."""
    gen = torch.Generator().manual_seed(5)
    rows = reference.BF16_ROTATION_MIN_ROWS
    x = torch.randn(rows, 2 * block, generator=gen).bfloat16()
    exact = kernels.rotate(x, block)
    fast = kernels.rotate_activation(x, block)
    assert fast.dtype == (torch.bfloat16 if reference.SIXTEEN_BIT_MATMULS_ARE_FAST
                          else torch.float32)
    assert (fast.float() - exact).norm() <= 0.005 * exact.norm()
    for few_or_fp32 in (x[:rows - 1], x.float()):
        assert torch.equal(kernels.rotate_activation(few_or_fp32, block),
                           kernels.rotate(few_or_fp32, block))


def test_the_rotation_block_takes_the_input_size_s_odd_factor():
    assert [rotation_block(k) for k in (576, 1536, 2048, 3072, 2304, 17 * 64)] == [
        576, 1536, 512, 1536, 2304, 64]


def _int_gemv_builds() -> bool:
    """The C++ integer GEMVs (W4A8, W8A8 per 32-block) build and load wherever torch runs AVX2
    or wider (x86 CI included): nowhere else are they offered."""
    wide = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    assert kernels.cpu_kernels_available(kernel_choice.cache_dir()) == wide
    return wide


def _int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x as the integer GEMVs take it: rounded to int8 per 32-block at max |block| / 127,
    computed in fp32 as they compute it (fp64 out)."""
    xb = x.float().unflatten(1, (-1, 32))
    step = xb.abs().amax(-1, keepdim=True) / 127
    return ((xb * (1 / step)).round().double() * step.double()).flatten(1)


# Row counts cover the kernels' tiles of 4 rows and their remainders; 37 outputs split
# unevenly over threads.
GEMV_ROWS = (1, 3, 4, 5, 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a8_is_exact_on_its_quantized_operands(dtype):
    """q4_linear against fp64 on the same operands: the weight's 4-bit codes with their fp16
    scales and minimums, x rounded to int8 per 32-block; bf16 x gets a bf16 y."""
    if not _int_gemv_builds():
        pytest.skip("the integer GEMVs need AVX2")
    gen = torch.Generator().manual_seed(3)
    q, _ = _q4_shard(37, 576, gen)
    q = QuantizedWeight(q.codes, q.scales.half().float(), q.zeros.half().float())
    blocks = kernels.pack_q4_blocks(q.codes, q.scales, q.zeros)
    w = q.dequantize().double()
    for rows in GEMV_ROWS:
        x = (torch.randn(rows, 576, generator=gen) * torch.rand(rows, 1, generator=gen)).to(dtype)
        expected = _int8_blocks(x) @ w.t()
        y = kernels.q4_linear(x, blocks)
        assert y.dtype == dtype
        bound = (1e-5 if dtype == torch.float32 else 4e-3) * expected.abs().max()
        assert (y.double() - expected).abs().max() <= bound, rows


def test_w8a8_blocks_is_exact_on_its_quantized_operands():
    """i8_linear against fp64 on int8 weights (-128 included: its magnitude is 128) with a scale
    per row and x rounded to int8 per 32-block; fp32 out whatever x's dtype."""
    if not _int_gemv_builds():
        pytest.skip("the integer GEMVs need AVX2")
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(-128, 128, (37, 576), generator=gen, dtype=torch.int8)
    scales = torch.rand(37, generator=gen) / 100
    w = codes.double() * scales.double()[:, None]
    for rows in GEMV_ROWS:
        x = (torch.randn(rows, 576, generator=gen) * 5).bfloat16()
        y = kernels.i8_linear(x, codes, scales)
        assert y.dtype == torch.float32
        expected = _int8_blocks(x) @ w.t()
        assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_row_quantizing_op_gives_torch_s_codes_and_scales(dtype):
    """`tessera::quantize_rows` (which `kernels.quantize_int8_rows` takes once the ops are
    loaded) against torch's ops on the same rows: identical codes and scales, ties rounded to
    even, all-zero rows, lengths with and without a tail past its 32-wide vectors, both code
    ranges, and leading dimensions kept."""
    if not _int_gemv_builds():
        pytest.skip("the CPU ops need AVX2")
    gen = torch.Generator().manual_seed(5)
    ties = torch.tensor([[254.0, -127.0, 1.0, 3.0, 5.0, -0.5, 100.0, 0.0] * 5])
    rows = [ties] + [torch.randn(n, k, generator=gen) * 10 ** torch.linspace(-3, 3, n)[:, None]
                     for n, k in ((9, 5), (4, 33), (7, 576), (3, 2048))]
    rows[3][2] = 0.0
    for x in rows + [torch.randn(2, 3, 40, generator=gen)]:
        x = x.to(dtype)
        for code_max in (127, 64):
            xf = x.float()
            want_scales = xf.abs().amax(-1, keepdim=True).clamp(min=1e-30) / code_max
            want_codes = (xf / want_scales).round().to(torch.int8)
            codes, scales = torch.ops.tessera.quantize_rows(x, code_max)
            assert torch.equal(scales, want_scales) and torch.equal(codes, want_codes), x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_rotation_op_equals_the_hadamard_matmuls(dtype):
    """`tessera::rotate` (which `kernels.rotate` takes once the ops are loaded), a fast
    Walsh-Hadamard transform, against the `hadamard` matrix itself: power-of-two blocks below
    and above its 8-wide vectors, odd factors (SmolLM2's 576 = 9 x 64, 1536 = 3 x 512, 20 =
    5 x 4), several blocks per row, leading dimensions kept; refused: a row that is not a
    whole number of blocks, an odd factor past 15."""
    if not _int_gemv_builds():
        pytest.skip("the CPU ops need AVX2")
    gen = torch.Generator().manual_seed(6)
    for shape, block in (((3, 2), 2), ((5, 4), 4), ((7, 40), 8), ((3, 64), 64), ((2, 20), 20),
                         ((4, 576), 576), ((2, 3072), 512), ((2, 1536), 1536),
                         ((2, 3, 128), 64)):
        x = torch.randn(*shape, generator=gen).to(dtype)
        h = torch.block_diag(*[reference.hadamard(block, torch.float64)] * (shape[-1] // block))
        want = (x.double() @ h).float()
        got = torch.ops.tessera.rotate(x, block)
        assert got.dtype == torch.float32 and got.shape == x.shape
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * want.abs().max().item())
    with pytest.raises(RuntimeError, match="multiple of block"):
        torch.ops.tessera.rotate(torch.ones(2, 100), 64)
    with pytest.raises(RuntimeError, match="odd factor is at most 15"):
        torch.ops.tessera.rotate(torch.ones(2, 68), 68)


def test_int8_gemm_is_exact_on_its_quantized_operands():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(37, 1536, generator=gen)
    codes, scales = kernels.quantize_int8_rows(torch.randn(576, 1536, generator=gen))
    xq, x_scale = kernels.quantize_int8_rows(x)
    assert torch.equal(torch._int_mm(xq, codes.t()).long(), xq.long() @ codes.long().t())
    expected = (xq.double() @ codes.double().t()) * x_scale.double() * scales[:, 0].double()
    y = kernels.int8_linear(x, codes, scales[:, 0])
    assert torch.allclose(y.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="fbgemm is x86's")
def test_fbgemm_int8_gemm_is_within_its_activation_rounding():
    """fbgemm quantizes each row, scaled to max |x| = 1, to 256 levels spanning the batch's
    range (at most [-1, 1]): an activation moves by at most 1/255 of its row's max, so an
    output by at most that times the row's sum of |W|. Saturated int16 sums would be far off."""
    assert kernel_choice._fbgemm_gemm_is_exact(64)  # every x86 CPU, AVX2's int16 pairs too
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(37, 1536, generator=gen) * torch.rand(37, 1, generator=gen) * 10
    codes, scales = kernels.quantize_int8_rows(torch.randn(576, 1536, generator=gen), 64)
    w = codes.double() * scales.double()
    y = kernels.fbgemm_int8_linear(x, kernels.pack_int8_fbgemm(codes, scales[:, 0]))
    error = (y.double() - x.double() @ w.t()).abs()
    bound = x.double().abs().amax(1, keepdim=True) / 255 * w.abs().sum(1) * 1.001
    assert (error <= bound).all()
    assert error.mean() < 0.1 * bound.mean()  # roundings of either sign mostly cancel


_PACK_TWO = """
import torch, kernels
w, s = torch.ones(8, 16, dtype=torch.int8), torch.ones(8)
first = kernels.pack_int8_fbgemm(w, s)
del first
print([kernels.pack_int8_fbgemm(w, s).key for _ in range(2)])
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="fbgemm is x86's")
def test_fbgemm_weight_keys_are_the_same_in_every_process():
    """A compiled step holds the packed weights' keys as constants: keys that follow the
    packing order, not object addresses, keep Inductor's cache valid from one start to the
    next."""
    root = os.path.dirname(os.path.dirname(__file__))
    keys = {subprocess.run([sys.executable, "-c", _PACK_TWO], capture_output=True, text=True,
                           timeout=120, cwd=root, check=True).stdout for _ in range(2)}
    assert keys == {"[1, 2]\n"}


def test_int8_embedding_rows_are_the_lm_head_rows():
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(100, 64, generator=gen)
    layer = VocabEmbedding(100, 64, method=get_linear_method("int8").vocab_method())
    layer.weight.weight_loader(layer.weight, table)
    layer.method.process_weights_after_loading(layer)
    plan_layer_kernels([layer])
    # full-range codes whatever the layer linears take; kept for the lookups whatever the plan
    assert layer.method.code_max == kernel_choice.int8_weight_code_max()
    assert not layer.weight.is_meta
    ids = torch.tensor([5, 0, 99, 5])
    rows = layer.embed(ids)
    assert (rows - table[ids]).norm() <= 0.015 * table[ids].norm()  # int8 rounding, as above
    logits = layer(torch.eye(64)[:2])  # the LM head reads the same rows: e_j . w_i = w_i[j]
    assert torch.allclose(logits.t()[ids], rows[:, :2], atol=0.02)  # bf16 in the kernels


@pytest.mark.parametrize("name", ["none", "int8"])
def test_lm_head_logits_are_fp32_before_any_rounding_to_the_model_dtype(name):
    """The sampler reads fp32 logits: an LM head hands over its kernel's output in fp32 (the
    int8 GEMM's own fp32, not a bf16 rounding of it), and the layer's bf16 forward is that
    same output rounded once."""
    gen = torch.Generator().manual_seed(5)
    with default_dtype(torch.bfloat16):
        layer = VocabEmbedding(300, 64, method=get_linear_method(name).vocab_method())
    layer.weight.weight_loader(layer.weight, torch.randn(300, 64, generator=gen))
    layer.method.process_weights_after_loading(layer)
    # the head alone is offered int8 activations per 32-block, where they build
    assert ("w8a8-blocks" in layer.method.candidates(layer)) == (
        name != "none" and _int_gemv_builds())
    plan_layer_kernels([layer])
    for rows in (1, 40):
        x = torch.randn(rows, 64, generator=gen).bfloat16()
        logits, forward = layer.logits(x), layer(x)
        assert logits.dtype == torch.float32 and forward.dtype == torch.bfloat16
        assert torch.equal(logits.bfloat16(), forward)


def test_the_plan_follows_the_measurement_and_is_cached_per_machine(tmp_path):
    calls = []

    def kernel(name):
        def run(x):
            calls.append(name)
            # "small" is fast up to 8 tokens, "big" from there on
            if (x.shape[0] > 8) == (name == "small"):
                time.sleep(0.003)
            return x
        return run

    wrong = lambda x: x + 1  # noqa: E731 - the fastest, and wrong: never chosen
    plan, = kernel_choice.plan_kernels(
        [{"small": kernel("small"), "big": kernel("big"), "wrong": wrong}], lambda x: x,
        16, 16, torch.float32)
    assert plan.names == ["small", "big"] and plan.bounds == [8, 512]
    calls.clear()
    plan(torch.zeros(8, 16))
    plan(torch.zeros(9, 16))
    plan(torch.zeros(5000, 16))
    assert calls == ["small", "big", "big"]
    table = json.loads((tmp_path / "cpu_kernels.json").read_text())
    assert list(table) == [kernel_choice.machine_key()]
    kernel_choice._PLANS.clear()  # a new process: it reads the file instead of measuring
    again, = kernel_choice.plan_kernels(
        [{"small": kernel("small"), "big": kernel("big"), "wrong": wrong}], lambda x: x,
        16, 16, torch.float32)
    assert calls == ["small", "big", "big"] and again.bounds == plan.bounds


def test_a_plan_switches_kernels_only_at_a_token_class_bound():
    """"a" wins at up to 16 tokens, but a switch at 16 would cost the compiled decode step a
    graph: the class from 9 to 64 tokens runs the kernel with the least time summed over its
    sizes."""
    def kernel(name):
        def run(x):
            m = x.shape[0]
            if name == "a" and m > 16:
                time.sleep(0.003)
            elif name == "b" and m <= 16:
                time.sleep(0.003 if m <= 8 else 0.002)
            return x
        return run

    plan, = kernel_choice.plan_kernels([{"a": kernel("a"), "b": kernel("b")}], lambda x: x,
                                       16, 16, torch.float32)
    assert plan.names == ["a", "b"] and plan.bounds == [8, 512]


def test_a_plan_holds_no_more_bytes_than_bf16():
    """W4A8 wins up to 4 tokens and the int4 kernel at 8, but each holds its own pack of the
    GGUF's codes, and with the int8 weight both would outweigh bf16: the plan is the fastest
    that fits (W4A8 up to 8 here: 1.5x int4's time at 8 tokens, where int4 takes 2x W4A8's
    below), and the GGUF method counts those bytes as the test does."""
    delays = {"w4a8": lambda m: 0.001 if m <= 4 else 0.0015 if m <= 8 else 0.004,
              "int4": lambda m: 0.002 if m <= 4 else 0.001 if m <= 8 else 0.004,
              "w8a8": lambda m: 0.004 if m <= 8 else 0.001}
    size = {"w4a8": 0.625, "int4": 0.5, "w8a8": 1.0}

    def kernel(name):
        def run(x):
            time.sleep(delays[name](x.shape[0]))
            return x
        return run

    def fits(names):
        return sum(size[name] for name in names) <= 2

    plan, = kernel_choice.plan_kernels([{name: kernel(name) for name in delays}], lambda x: x,
                                       16, 16, torch.float32, fits)
    assert plan.names == ["w4a8", "w8a8"] and plan.bounds == [8, 512]
    layer = torch.nn.Module()
    assert get_linear_method("gguf").held_bytes(layer, frozenset(delays)) == sum(size.values())
    assert get_linear_method("gguf").held_bytes(layer, frozenset(plan.names)) <= 2


_AVX2_CHECK = """
import torch
from tests.test_linear_methods import test_apply_matches_f_linear_on_the_checkpoint_weight as check
from engine.layers.quantization import kernel_choice
from engine.layers.quantization.checkpoint import ChannelWeight, Int4Weight
assert torch.backends.cpu.get_cpu_capability() == "AVX2", torch.backends.cpu.get_cpu_capability()
for num_tokens in (1, 3, 33, 130):
    check("gguf", num_tokens)
print(" | ".join(kernel_choice.chosen_plans().values()))
# a linear's weights within the range where its int8 GEMMs are exact: +-64 where oneDNN's AVX2
# kernel sums u8 x s8 pairs in int16 (an AVX-512 CPU capped at AVX2) or where fbgemm does (a
# real AVX2-only CPU, whose _int_mm takes its exact reference path), else +-127
from engine.layers.quantization.int8 import quantize_rotated
code_max = kernel_choice.linear_int8_code_max()
codes, _ = quantize_rotated(torch.randn(64, 576), 576, code_max)
a = torch.randint(-128, 128, (16, 576), dtype=torch.int8)
assert codes.abs().max() == code_max in (64, 127)
assert torch.equal(torch._int_mm(a, codes.t()), a.int() @ codes.int().t())
# torch's kernels capped at AVX2 use no AVX-512 BF16, whatever the CPU reports
from engine.model_runner import resolve_dtype
assert resolve_dtype("auto", "cpu")[0] == torch.float32
assert resolve_dtype("auto", "cpu", integer_linears=True)[0] == torch.bfloat16
"""


def test_kernels_run_with_the_cpu_capability_lowered_to_avx2(tmp_path):
    """The AVX2 path on any machine: torch's and oneDNN's dispatch capped at AVX2, every
    step size through the plan measured there."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2",
               TESSERA_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", _AVX2_CHECK], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-2000:]
    # every candidate passed the plan's check against its float reference: W8A8 too
    assert "wrong on this machine" not in done.stderr, done.stderr[-2000:]
