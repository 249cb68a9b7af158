"""The grouped expert computation (tokens sorted by expert, one GEMM pair per expert) equals
a loop over tokens, including when some experts receive no token."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from engine.layers.linear import Linear
from engine.layers.moe import MoEMLP
from engine.layers.quantization import get_linear_method, plan_layer_kernels


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


def test_quantized_experts_are_int8_linears_close_to_the_dense_experts():
    """Under a quantized method each expert is a gated MLP of its linears (int8, no float
    copy), loaded through the same weight loaders, and the layer stays within int8's error of
    the dense, stacked one."""
    torch.manual_seed(0)
    experts, hidden, inter = 4, 64, 96
    w13, w2 = torch.randn(experts, 2 * inter, hidden), torch.randn(experts, hidden, inter)
    router = torch.randn(experts, hidden)
    layers = {name: MoEMLP(hidden, inter, experts, 2, True, "silu", get_linear_method(name))
              for name in ("none", "int8")}
    for layer in layers.values():
        layer.gate.weight.weight_loader(layer.gate.weight, router)
    dense, quantized = layers["none"], layers["int8"]
    for e in range(experts):
        for part in (0, 1):
            gate_up = w13[e, part * inter:(part + 1) * inter]
            dense.w13.weight_loader(dense.w13, gate_up, (e, part))
            linear = quantized.experts[e].gate_up_proj
            linear.weight.weight_loader(linear.weight, gate_up, part)
        dense.w2.weight_loader(dense.w2, w2[e], (e, None))
        linear = quantized.experts[e].down_proj
        linear.weight.weight_loader(linear.weight, w2[e])
    linears = [m for m in quantized.modules() if isinstance(m, Linear)]
    for linear in linears:
        linear.method.process_weights_after_loading(linear)
    plan_layer_kernels(linears)
    assert all(p.dtype == torch.int8 for n, p in quantized.experts.named_parameters())

    x = torch.randn(40, hidden)
    want, got = dense(x), quantized(x)
    assert (got - want).abs().max() <= 0.03 * want.abs().max()
