"""The grouped expert computation (tokens sorted by expert, one GEMM pair per expert) equals
a loop over tokens, including when some experts receive no token."""
import pytest
import torch
import torch.nn.functional as F

import kernels


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
