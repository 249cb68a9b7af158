"""The grouped expert computation (tokens sorted by expert, one GEMM pair per expert) equals
a loop over tokens, including when some experts receive no token."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from engine.layers import moe
from engine.layers.moe import MoEMLP
from engine.layers.quantization import get_linear_method
from engine.layers.quantization import kernel_choice
from engine.layers.quantization.kernel_choice import packed_int8_gemm_is_exact

ROOT = Path(__file__).resolve().parent.parent


def per_token_moe(x, w13, w2, topk_weights, topk_ids):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for weight, expert in zip(topk_weights[t], topk_ids[t]):
            gate, up = F.linear(x[t], w13[expert]).chunk(2)
            out[t] += weight * F.linear(F.silu(gate) * up, w2[expert])
    return out


@pytest.mark.parametrize("num_tokens,used_experts", [(1, 8), (7, 3), (40, 8)])
def test_grouped_experts_equal_a_per_token_loop(num_tokens, used_experts):
    torch.manual_seed(0)
    experts, hidden, inter, top_k = 8, 32, 48, 2
    x = torch.randn(num_tokens, hidden)
    w13, w2 = torch.randn(experts, 2 * inter, hidden), torch.randn(experts, hidden, inter)
    # Route only among the first `used_experts` experts: the others get no token at all.
    scores = torch.randn(num_tokens, used_experts).softmax(-1)
    topk_weights, topk_ids = scores.topk(top_k, dim=-1)
    out = kernels.fused_moe(x, w13, w2, topk_weights, topk_ids, kernels.silu_and_mul)
    want = per_token_moe(x, w13, w2, topk_weights, topk_ids)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("int8_activations", [True, False])
def test_quantized_experts_are_int8_and_close_to_the_dense_ones(int8_activations):
    """Under a quantized method the stacked experts load as rotated int8 per channel (no float
    copy), through the same weight loaders as dense ones, and the layer stays within int8's
    error of the dense layer, with int8 activations (W8A8) or bf16 ones (W8A16, where the
    integer GEMM is inexact)."""
    dense, quantized = loaded_moe("none"), loaded_moe("int8", int8_activations)
    assert quantized.w13.dtype == quantized.w2.dtype == torch.int8

    x = torch.randn(40, hidden)
    want, got = dense(x), quantized(x)
    assert (got - want).abs().max() <= 0.03 * want.abs().max()


def test_packed_int8_experts_give_the_stacked_ones_products(monkeypatch):
    """Where oneDNN multiplies int8 exactly and the CPU ops load (and packing pays, forced
    here), W8A8 experts are repacked for it after loading and run in `packed_expert_gemm`;
    the integer products are the same, so the layer's output is too, up to the order of two
    fp32 scale multiplies (which can move an intermediate value across a rounding boundary
    of the second quantization). Elsewhere the stacked experts stay."""
    monkeypatch.setattr(moe, "packed_if_faster", lambda weights, scales: None)
    stacked = loaded_moe("int8")
    monkeypatch.setattr(moe, "packed_if_faster",
                        lambda weights, scales: [kernels.pack_int8(w) for w in weights])
    packed = loaded_moe("int8")
    if not (stacked.int8_activations and packed_int8_gemm_is_exact()
            and kernels.cpu_kernels_available(kernel_choice.cache_dir())):
        assert packed.w13.dtype == torch.int8 and not packed.w13.is_mkldnn
        return
    assert len(packed.w13) == len(packed.w2) == experts
    assert all(w.is_mkldnn for w in (*packed.w13, *packed.w2))
    # 40 tokens over 3 of the 4 experts: one gets none.
    x = torch.randn(40, hidden)
    stacked.gate.weight[3] = packed.gate.weight[3] = -1e4
    want = stacked(x)
    torch.testing.assert_close(packed(x), want, rtol=1e-4, atol=1e-4 * want.abs().max())
    codes = torch.ones(5, hidden, dtype=torch.int8)  # counts that miss a pair are refused
    with pytest.raises(RuntimeError, match="counts sum to 4 pairs, codes have 5"):
        torch.ops.tessera.packed_expert_gemm(codes, torch.tensor([1, 3, 0, 0]),
                                             list(packed.w13), packed.w13_scale)


def check_compiled_int8_experts_match_eager() -> None:
    """A quantized layer compiles into one graph (`fullgraph`: only the expert GEMMs are
    opaque, as custom ops), for any token count (`dynamic`), and computes what it computes
    eagerly: stacked W8A8 experts, packed ones where oneDNN runs them, and W8A16."""
    for int8_activations, pack in ((True, False), (True, True), (False, False)):
        moe.packed_if_faster = lambda weights, scales, pack=pack: (
            [kernels.pack_int8(w) for w in weights] if pack else None)
        layer = loaded_moe("int8", int8_activations)
        layer.gate.weight[3] = -1e4  # one of the 4 experts gets no token
        compiled = torch.compile(layer, fullgraph=True, dynamic=True)
        for rows in (5, 9, 40):
            x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(rows))
            with torch.inference_mode():
                want = layer(x)
                torch.testing.assert_close(compiled(x), want, rtol=1e-4,
                                           atol=1e-4 * want.abs().max())


def test_compiled_int8_experts_match_eager(tmp_path):
    """In a child process with a cache of its own, as tests/test_cpu_compile.py compiles."""
    out = subprocess.run([sys.executable, "-c", "from tests.test_moe import "
                          "check_compiled_int8_experts_match_eager as check; check()"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-4000:]


experts, hidden, inter = 4, 64, 96


def loaded_moe(method: str, int8_activations: bool | None = None) -> MoEMLP:
    """A 4-expert layer of `method` holding the same random weights whatever the method,
    processed after loading as the model loader does (W8A8, or W8A16 where
    `int8_activations` says so)."""
    gen = torch.Generator().manual_seed(0)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen)
    w2 = torch.randn(experts, hidden, inter, generator=gen)
    router = torch.randn(experts, hidden, generator=gen)
    layer = MoEMLP(hidden, inter, experts, 2, True, "silu", get_linear_method(method))
    if int8_activations is not None:
        layer.int8_activations = int8_activations
    layer.gate.weight.weight_loader(layer.gate.weight, router)
    for e in range(experts):
        for part in (0, 1):
            layer.w13.weight_loader(layer.w13, w13[e, part * inter:(part + 1) * inter],
                                    (e, part))
        layer.w2.weight_loader(layer.w2, w2[e], (e, None))
    layer.process_weights_after_loading()
    return layer
