"""Fused mixture-of-experts in Triton: each expert's weights read once per block of its pairs.

`align` sorts the token-expert pairs by expert and pads each expert's run to a multiple of
BLOCK_M, so every block of pairs has a single expert and an expert without tokens has no block.
One gathered GEMM kernel then runs per (block of pairs, block of N): it loads its pairs' rows,
multiplies them by its expert's weight and writes one row per pair. It runs on `w13` (rows of
x, token `pair // k`), then, after the gated activation, on `w2` (the pair's own row) with the
routed weight multiplied in; last, each token's k rows are summed. This is vLLM's and SGLang's
fused_moe without their tuned tables. Layouts and semantics are those of `reference.fused_moe`.

Nothing is read back to the host, so a decode step that runs it can be captured in a CUDA
graph: the grid covers the most blocks any routing can need, and the unused ones exit at once.
"""
import torch
import triton
import triton.language as tl

from kernels.triton_attention import dot_precision

# (BLOCK_M, BLOCK_N, BLOCK_K): vLLM's untuned defaults (fused_moe.get_default_config). With no
# more tokens than experts an expert has few pairs, and 16-pair blocks waste little; larger
# batches take 64-pair blocks, which read an expert's weights up to 4x less often. Not measured
# here yet: `tessera bench kernels` times a Mixtral layer at 64 tokens beside cuBLAS.
SMALL_BATCH_TILES = (16, 32, 64)
LARGE_BATCH_TILES = (64, 64, 32)


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair ids (pair p is token p // k's choice p % k) grouped by expert, each expert's run
    padded with the id P = T * k (no pair) to a multiple of `block_m`, and each block's expert.

    Sized for the worst routing (every expert that has a pair wasting `block_m - 1` slots), so
    the sizes depend on the shapes alone; blocks past the used ones get expert `num_experts`.
    """
    flat = topk_ids.flatten()
    num_pairs, device = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(
        0, flat, torch.ones_like(flat))  # not bincount: on CUDA it reads the max back
    padded = -(-counts // block_m) * block_m
    ends = padded.cumsum(0)
    order = flat.argsort(stable=True)
    expert = flat[order]
    rank = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[expert]
    num_blocks = triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m)
    sorted_ids = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, (ends - padded)[expert] + rank, order.to(torch.int32))
    block_starts = torch.arange(num_blocks, device=device) * block_m
    return sorted_ids, torch.searchsorted(ends, block_starts, right=True, out_int32=True)


@triton.jit
def _expert_gemm_kernel(a_ptr, w_ptr, out_ptr, topk_weights_ptr, sorted_ids_ptr,
                        block_experts_ptr, num_pairs, num_experts, size_n, size_k, pairs_per_row,
                        stride_am, stride_we, stride_wn, stride_om,
                        MUL_ROUTED_WEIGHT: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """`out[p] = a[p // pairs_per_row] @ w[e].T` (times p's routed weight) for the pairs p of
    one block, whose expert is e; padding slots (p = num_pairs) are neither read nor written."""
    block = tl.program_id(0)
    expert = tl.load(block_experts_ptr + block).to(tl.int64)
    if expert >= num_experts:  # past the blocks this routing uses
        return
    pairs = tl.load(sorted_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    real = pairs < num_pairs
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pairs // pairs_per_row)[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + cols[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, size_k, BLOCK_K):
        in_k = offs_k < size_k - k0
        a = tl.load(a_ptrs + k0, mask=real[:, None] & in_k[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=in_k[:, None] & (cols[None, :] < size_n), other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if MUL_ROUTED_WEIGHT:
        acc = acc * tl.load(topk_weights_ptr + pairs, mask=real, other=0.0)[:, None]
    tl.store(out_ptr + pairs[:, None] * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=real[:, None] & (cols[None, :] < size_n))


def _expert_gemm(a: torch.Tensor, w: torch.Tensor, sorted_ids: torch.Tensor,
                 block_experts: torch.Tensor, pairs_per_row: int,
                 topk_weights: torch.Tensor | None, tiles: tuple[int, int, int]) -> torch.Tensor:
    """One row per pair: `a`'s row `pair // pairs_per_row` times the pair's expert's `w[e]`
    (`w` is `[E, N, K]`), times the pair's routed weight if `topk_weights` is given."""
    assert a.stride(-1) == w.stride(-1) == 1
    num_experts, size_n, size_k = w.shape
    block_m, block_n, block_k = tiles
    out = torch.empty(a.shape[0] * pairs_per_row, size_n, dtype=a.dtype, device=a.device)
    _expert_gemm_kernel[(block_experts.numel(), triton.cdiv(size_n, block_n))](
        a, w, out, topk_weights, sorted_ids, block_experts, out.shape[0], num_experts, size_n,
        size_k, pairs_per_row, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        MUL_ROUTED_WEIGHT=topk_weights is not None, PRECISION=dot_precision(w.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, gated_activation,
              tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Each token `x[T, H]` through its top-k experts (`w13[E, 2I, H]` gate|up, `w2[E, H, I]`),
    weighted and summed; `gated_activation` maps `[P, 2I]` to `[P, I]` (`kernels.silu_and_mul`
    dispatches CUDA tensors to its Triton kernel). `tiles` is (BLOCK_M, BLOCK_N, BLOCK_K)."""
    num_tokens, top_k = topk_ids.shape
    tiles = tiles or (SMALL_BATCH_TILES if num_tokens <= w13.shape[0] else LARGE_BATCH_TILES)
    sorted_ids, block_experts = align(topk_ids, w13.shape[0], tiles[0])
    gate_up = _expert_gemm(x, w13, sorted_ids, block_experts, top_k, None, tiles)
    down = _expert_gemm(gated_activation(gate_up), w2, sorted_ids, block_experts, 1,
                        topk_weights.reshape(-1), tiles)
    return down.view(num_tokens, top_k, -1).sum(1)
