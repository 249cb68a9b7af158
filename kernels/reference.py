"""Torch reference twins of every kernel: the CPU path and the oracle for the Triton kernels.

Shapes follow the flat, unpadded batch (see DESIGN.md): T tokens from R requests,
`query_start_loc[R+1]` delimits each request's new tokens, `seq_lens[R]` counts each request's
whole context (earlier tokens plus the new ones), and `block_table[R, max_pages]` names the
pages holding that context. KV caches are `[num_pages, page_size, num_kv_heads, head_dim]`.
"""
import itertools
import math
import warnings

import torch
import torch.nn.functional as F

from kernels import cpu_extension, kv_format
from kernels.kv_format import QuantizedPages

KVPool = torch.Tensor | QuantizedPages  # one layer's K or V pages, plain or quantized


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (norm(x + residual) * weight, x + residual); the sum is the next residual."""
    if residual is not None:
        x = x + residual
    residual = x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), residual


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> None:
    """Rotate q `[T, H, D]` and k `[T, KvH, D]` in place, NeoX/HF layout (halves, not pairs).

    `cos_sin_cache[max_pos, D]` holds cos in its first half and sin in its second.
    """
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    for x in (q, k):
        x1, x2 = x.float().chunk(2, dim=-1)
        x.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation over the fused gate|up projection `[T, 2I]` -> `[T, I]`."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """GeGLU (Gemma), GELU's tanh approximation on the gate: `[T, 2I]` -> `[T, I]`."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


class HeldByKey:
    """Holds `value` in a table under this handle's key as long as the handle lives, so that a
    compiled step reaches it through a custom op that takes the plain int (torch.compile's
    stand-ins for packed weights, opaque objects or oneDNN's blocked tensors, break the graph
    or give the wrong output shape). Keys count handles in the order they are made: the
    compiled graph holds them as constants, so a key from the object's id made every start
    miss Inductor's cache and compile again (9.5 minutes on two Zen 2 cores)."""

    def __init__(self, value: object):
        self.key = next(_HELD_KEYS)
        _HELD[self.key] = value

    def __del__(self):
        _HELD.pop(self.key, None)


_HELD: dict[int, object] = {}
_HELD_KEYS = itertools.count()


def _pairs_by_expert(topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The token-expert pairs sorted by expert (stably): each pair's token and routed weight,
    and how many pairs each expert has. Shapes depend on the token count alone, so a compiled
    step traces it."""
    experts, order = topk_ids.flatten().sort(stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64).index_add_(
        0, experts, torch.ones_like(experts))
    return order // topk_ids.shape[1], topk_weights.flatten()[order], counts


def _runs(counts: torch.Tensor) -> list[tuple[int, slice]]:
    """Each expert that has pairs, ascending, with the run of its pairs in the sorted order."""
    runs, start = [], 0
    for expert, count in enumerate(counts.tolist()):
        if count:
            runs.append((expert, slice(start, start + count)))
        start += count
    return runs


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, gated_activation) -> torch.Tensor:
    """Each token `x[T, H]` through its top-k experts, weighted and summed.

    Experts are stacked: `w13[E, 2I, H]` (gate|up), `w2[E, H, I]`. The token-expert pairs are
    sorted by expert, so each expert that has tokens runs one GEMM pair over all of them (a
    loop over experts, never over tokens); contributions are added expert by expert in
    ascending order, as transformers adds them.
    """
    tokens, weights, counts = _pairs_by_expert(topk_weights, topk_ids, w13.shape[0])
    out = torch.zeros_like(x)
    for expert, pairs in _runs(counts):
        rows = tokens[pairs]
        h = gated_activation(F.linear(x[rows], w13[expert]))
        h = F.linear(h, w2[expert]) * weights[pairs, None]
        out.index_add_(0, rows, h.to(out.dtype))
    return out


class Int8Experts(HeldByKey):
    """Int8 experts stored as `Int8Method` stores a linear (rows Hadamard-rotated along the
    input, fp32 `scales[E, N]` per output channel), for `int8_moe`: stacked `weights[E, N, K]`,
    or a list of `pack_int8` weights (oneDNN's layout) for W8A8 alone, where the CPU ops are
    loaded (`tessera::packed_expert_gemm`)."""

    def __init__(self, weights: torch.Tensor | list[torch.Tensor], scales: torch.Tensor):
        super().__init__((weights, scales))
        self.num_experts, self.out_features = scales.shape


def expert_gemm(a: torch.Tensor, counts: torch.Tensor, experts: Int8Experts) -> torch.Tensor:
    """fp32 `a[P] @ W_e^T * scales[e]` for the pairs `a[P, K]` sorted by expert, `counts[E]`
    of them each: W8A8 where `a` holds int8 codes (the caller scales by theirs), else W8A16
    (bf16 activations). A custom op: each expert's run is data-dependent."""
    return _expert_gemm(a, counts, experts.key, experts.out_features)


@torch.library.custom_op("tessera::expert_gemm", mutates_args=())
def _expert_gemm(a: torch.Tensor, counts: torch.Tensor, key: int, out_features: int
                 ) -> torch.Tensor:
    """The products land in one buffer and are scaled in one pass after the GEMMs: per expert,
    a few small ops would cost as much as its GEMM at decode sizes."""
    weights, scales = _HELD[key]
    if isinstance(weights, list):  # the loop in C++: kernels/expert_gemm_cpu.cpp
        return torch.ops.tessera.packed_expert_gemm(a, counts, weights, scales)
    runs = _runs(counts)
    if a.dtype != torch.int8:
        out = torch.empty(len(a), out_features)
        for expert, pairs in runs:
            out[pairs] = int8_weight_linear(a[pairs], weights[expert], scales[expert].bfloat16())
        return out
    products = torch.empty(len(a), out_features, dtype=torch.int32)
    for expert, pairs in runs:
        torch._int_mm(a[pairs], weights[expert].t(), out=products[pairs])
    return products.float().mul_(scales.repeat_interleave(counts, 0))


@_expert_gemm.register_fake
def _(a: torch.Tensor, counts: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return a.new_empty(a.shape[0], out_features, dtype=torch.float32)


def int8_moe(x: torch.Tensor, w13: Int8Experts, w2: Int8Experts, topk_weights: torch.Tensor,
             topk_ids: torch.Tensor, gated_activation, blocks: tuple[int, int],
             int8_activations: bool) -> torch.Tensor:
    """`fused_moe` over `Int8Experts` rotated in blocks of `blocks[0]` (`w13`) and
    `blocks[1]` (`w2`).

    What does not depend on the expert runs once over all pairs: the input's rotation (and,
    with `int8_activations`, its per-token quantization: W8A8), the gated activation, its
    rotation and quantization; per expert only its two GEMMs run (`expert_gemm`), so a
    compiled decode step holds the whole layer, its elementwise work fused. Without
    `int8_activations` (where the integer GEMM is inexact) the GEMMs are W8A16. The pairs'
    sum is added in fp32.
    """
    tokens, weights, counts = _pairs_by_expert(topk_weights, topk_ids, w13.num_experts)

    def grouped_gemm(a: torch.Tensor, experts: Int8Experts,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
        """Each expert's pairs' rows of `a` (or of `a[rows]`) times its weight, in fp32."""
        if not int8_activations:
            return expert_gemm(a if rows is None else a[rows], counts, experts)
        codes, a_scale = quantize_int8_rows(a)
        if rows is not None:
            codes, a_scale = codes[rows], a_scale[rows]
        return expert_gemm(codes, counts, experts).mul_(a_scale)

    gate_up = grouped_gemm(rotate_activation(x, blocks[0]), w13, rows=tokens)
    h = rotate_activation(gated_activation(gate_up.to(x.dtype)), blocks[1])
    down = grouped_gemm(h, w2).mul_(weights[:, None])
    return torch.zeros(x.shape, dtype=down.dtype).index_add_(0, tokens, down).to(x.dtype)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: KVPool, v_cache: KVPool,
             slot_mapping: torch.Tensor) -> None:
    """Store new K/V `[T, KvH, D]` at flat slots `page * page_size + offset`, quantized on the
    way in when the pool is (`kernels.kv_format`).

    Slots < 0 mark padding tokens that own no slot; indexing with -1 would overwrite the last
    slot of the last page. Only CUDA graphs pad; torch.compile'd CPU steps never do, and the
    check would split their graph at every layer.
    """
    if not torch.compiler.is_compiling() and (slot_mapping < 0).any():
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    for x, cache, keys in ((k, k_cache, True), (v, v_cache, False)):
        if isinstance(cache, QuantizedPages):
            for part, pool in zip(kv_format.quantize(x, cache.format, keys), cache):
                if pool is not None:
                    pool.view(-1, *pool.shape[2:])[slot_mapping] = part
        else:
            cache.view(-1, *x.shape[1:])[slot_mapping] = x.to(cache.dtype)


def _context_by_head(cache: KVPool, pages: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`pages[..., P]` -> that context's tokens by KV head, `[..., KvH, P * page_size, D]`: a
    plain pool's as a transposed view, a quantized pool's dequantized to `dtype` straight into
    that layout (contiguous: one pass from the codes to the matmuls' operand).

    `index_select` on the flattened ids is a plain row copy, several times faster on CPU than
    advanced indexing with a 2-D index.
    """
    def gather(pool: torch.Tensor) -> torch.Tensor:
        gathered = pool.index_select(0, pages.flatten())
        return gathered.view(*pages.shape[:-1], -1, *pool.shape[2:]).transpose(-3, -2)

    if isinstance(cache, QuantizedPages):
        return kv_format.dequantize(*(None if p is None else gather(p) for p in cache), dtype)
    return gather(cache)


SDPA_MAX_ROWS = 4
# Whether oneDNN runs 16-bit matmuls here (AVX-512 and up). Where it does not (AVX2, or oneDNN
# capped below AVX-512) torch's own bf16 batched matmul is ~20x slower than fp32's: `[32, 3,
# 3, 64] @ [32, 3, 64, 256]` 2.5 ms vs 0.13. Read once, at import: a compiled step reads a
# constant.
SIXTEEN_BIT_MATMULS_ARE_FAST = torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _decode_attention(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool,
                      seq_lens: torch.Tensor, block_table: torch.Tensor, scale: float,
                      max_seq_len: int, sliding_window: int | None = None,
                      softcap: float | None = None) -> torch.Tensor:
    """One new token per row (`q` is `[B, H, D]`) over its context's pages, read in place by
    `tessera::decode_attention` (kernels/decode_attention_cpu.cpp) where the process loaded the
    CPU ops: plain pools, and quantized ones as codes with their scales (and int4's zero points).
    Served SmolLM2 on two AVX2 cores, a one-request step went from 20.2 to 19.2 ms, 64 requests'
    output from 76 to 86 tok/s. Head dims that are not a multiple of 16 and CPUs without the
    ops take `_gathered_decode_attention`.
    """
    if cpu_extension.loaded() and not q.is_cuda and q.shape[-1] % 16 == 0:
        pools, quant = (k_cache, v_cache), ()
        if isinstance(k_cache, QuantizedPages):
            pools = k_cache.codes, v_cache.codes
            quant = k_cache.scales, v_cache.scales, k_cache.zeros, v_cache.zeros
        return torch.ops.tessera.decode_attention(q, *pools, block_table, seq_lens, scale,
                                                  sliding_window or 0, softcap or 0.0, *quant)
    return _gathered_decode_attention(q, k_cache, v_cache, seq_lens, block_table, scale,
                                      max_seq_len, sliding_window, softcap)


def _gathered_decode_attention(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool,
                               seq_lens: torch.Tensor, block_table: torch.Tensor, scale: float,
                               max_seq_len: int, sliding_window: int | None = None,
                               softcap: float | None = None) -> torch.Tensor:
    """Decode attention over the rows' gathered pages, as many as the longest row needs, the
    tokens past each row's context masked. The shapes follow the page count alone, so a
    torch.compile'd step (engine/cpu_compile.py) needs no new graph as a context grows within
    its last page.

    Up to `SDPA_MAX_ROWS` rows, or in fp32, torch's SDPA in fp32 (half-precision contexts
    converted). Beyond, two batched matmuls in the cache's dtype (fp32 where 16-bit ones are
    slow), each KV head's group of query heads at once. SmolLM2's heads, 200-token contexts on
    pages scattered over a 64k-token cache (as a server's are), 2 Zen 4 cores, per layer: 1
    row, SDPA 0.11 ms vs matmuls 0.16; 4 rows, 0.18 vs 0.20; 8 rows, 1.1 vs 0.36; 16 rows, 2.3
    vs 0.39 (issue 14's profile had SDPA at 47% of a batch-32 decode step). Soft-capped scores
    (SDPA has no soft cap) always take the matmuls.
    """
    pages = block_table[:, : -(-max_seq_len // kv_format.page_size(k_cache))]
    k = _context_by_head(k_cache, pages, q.dtype)  # [B, KvH, pages * page_size, D]
    v = _context_by_head(v_cache, pages, q.dtype)
    keys = torch.arange(k.shape[2], device=q.device)
    beyond = keys >= seq_lens[:, None]
    if sliding_window is not None:
        beyond |= keys < (seq_lens - sliding_window)[:, None]
    if softcap is None and (k.dtype == torch.float32 or q.shape[0] <= SDPA_MAX_ROWS):
        o = F.scaled_dot_product_attention(q.unsqueeze(2).float(), k.float(), v.float(),
                                           attn_mask=~beyond[:, None, None], scale=scale,
                                           enable_gqa=True)
        return o.squeeze(2).to(q.dtype)
    (rows, heads, dim), dtype, kv_heads = q.shape, q.dtype, k.shape[1]
    if not SIXTEEN_BIT_MATMULS_ARE_FAST:
        k, v = k.float(), v.float()
    q = q.view(rows, kv_heads, heads // kv_heads, dim).to(k.dtype)
    # contiguous copies first: batched matmuls on the transposed views run ~3x slower
    scores = torch.matmul(q, k.contiguous().transpose(2, 3)).float().mul_(scale)
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    scores.masked_fill_(beyond[:, None, None], float("-inf"))  # [B, KvH, G, N]
    probs = scores.softmax(-1).to(v.dtype)
    return torch.matmul(probs, v.contiguous()).view(rows, heads, dim).to(dtype)


def _softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                          scale: float, softcap: float) -> torch.Tensor:
    """Attention of `q[H, n, D]` over `k, v[KvH, s, D]` under a `[n, s]` mask, with scaled
    scores soft-capped (in transformers' order: scale, cap, mask, fp32 softmax)."""
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores = torch.matmul(q, k.transpose(1, 2)).float() * scale
    scores = (scores / softcap).tanh() * softcap
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype)
    return torch.matmul(probs, v)


def paged_attention(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    block_table: torch.Tensor, scale: float, max_query_len: int,
                    max_seq_len: int, sliding_window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Causal attention of each request's new queries over its whole paged context.

    Query i of a request with `n` new tokens and context `s` sits at position `p = s - n + i`
    and sees keys `0 .. p` (bottom-right aligned causal mask), or with a `sliding_window` W
    only the last W of them, `p - W + 1 .. p` (Mistral's and Gemma's local layers, as
    transformers masks them). A `softcap` c maps each scaled score x to c * tanh(x / c)
    before the mask (Gemma 2). Decode rows (one new token) run as one padded batch; each
    prefill chunk runs on its own.
    """
    if max_query_len == 1:  # a decode-only step: rows are requests, in order
        return _decode_attention(q, k_cache, v_cache, seq_lens, block_table, scale,
                                 max_seq_len, sliding_window, softcap)
    page_size = kv_format.page_size(k_cache)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    out = torch.empty_like(q)
    decode = [i for i in range(len(lens)) if starts[i + 1] - starts[i] == 1]
    if decode:
        rows = torch.tensor([starts[i] for i in decode], device=q.device)
        idx = torch.tensor(decode, device=q.device)
        out[rows] = _decode_attention(q[rows], k_cache, v_cache, seq_lens[idx],
                                      block_table[idx], scale, max(lens[i] for i in decode),
                                      sliding_window, softcap)
    for i in range(len(lens)):
        n, s = starts[i + 1] - starts[i], lens[i]
        if n == 1:
            continue
        pages = block_table[i, : -(-s // page_size)]
        k = _context_by_head(k_cache, pages, q.dtype)[:, :s]  # [KvH, s, D]
        v = _context_by_head(v_cache, pages, q.dtype)[:, :s]
        qi = q[starts[i]:starts[i + 1]].transpose(0, 1).to(k.dtype)  # [H, n, D]
        if n == s and sliding_window is None and softcap is None:
            # A whole prompt's mask is plain causal: the kernel then skips the blocks above the
            # diagonal (2048 tokens, SmolLM2's heads, Zen 4: 40 ms against 68 per layer, the
            # same output). 4-D: CPU's flash kernel (3-D inputs take the ~4x slower math one).
            o = F.scaled_dot_product_attention(qi[None], k[None], v[None], is_causal=True,
                                               scale=scale, enable_gqa=True)[0]
        else:
            mask = torch.ones(n, s, dtype=torch.bool, device=q.device).tril(diagonal=s - n)
            if sliding_window is not None:
                mask &= ~mask.tril(diagonal=s - n - sliding_window)
            if softcap is None:
                o = F.scaled_dot_product_attention(qi[None], k[None], v[None], attn_mask=mask,
                                                   scale=scale, enable_gqa=True)[0]
            else:
                o = _softcapped_attention(qi, k, v, mask, scale, softcap)
        out[starts[i]:starts[i + 1]] = o.transpose(0, 1).to(out.dtype)
    return out


def attention_scores(q: torch.Tensor, k_cache: KVPool, pages: torch.Tensor, seq_len: int,
                     first_slot: int, scale: float, softcap: float | None = None
                     ) -> torch.Tensor:
    """What attention pays each held key, for KV eviction (SnapKV's observation window): the
    softmax of queries `q[n, H, D]` (held at slots `first_slot ..`, each seeing the slots up to
    its own) over one request's `seq_len` held keys on `pages`, summed over the queries and over
    each KV head's query heads: `[KvH, seq_len]` fp32."""
    page_size = kv_format.page_size(k_cache)
    k = _context_by_head(k_cache, pages[: -(-seq_len // page_size)], q.dtype)[:, :seq_len]
    n, heads, dim = q.shape
    kv_heads = k.shape[0]
    qf = q.float().view(n, kv_heads, heads // kv_heads, dim).permute(1, 2, 0, 3)
    scores = torch.matmul(qf, k.float().transpose(1, 2)[:, None]) * scale  # [KvH, G, n, s]
    if softcap is not None:
        scores = (scores / softcap).tanh() * softcap
    keys = torch.arange(seq_len, device=q.device)
    hidden = keys[None] > first_slot + torch.arange(n, device=q.device)[:, None]
    return scores.masked_fill(hidden, float("-inf")).softmax(-1).sum((1, 2))


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes `[N, K]` (0..15) with `w = scales * codes + zeros` per group of K -> the layout of
    `int4_linear`: torch's packed int4 weight and bf16 `scales_and_zeros[K / group, N, 2]`.

    torch's kernel computes `w = scale * (q - 8) + zero`, so its zero is ours plus 8 * scale.
    """
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    scales_and_zeros = torch.stack([scales, zeros + 8 * scales], -1).transpose(0, 1)
    return packed, scales_and_zeros.contiguous().to(torch.bfloat16)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """`x[M, K] @ w.T` for a `pack_int4` weight; bf16 activations (fp32 ones are far slower)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, group_size,
                                                      scales_and_zeros).to(x.dtype)


def pack_q4_blocks(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
                   ) -> torch.Tensor:
    """Codes `[N, K]` (0..15) with `w = scales * codes + zeros` per 32 of K -> `q4_linear`'s
    uint8 `[N, K / 32, 20]`: GGUF Q4_1's block (fp16 scale, fp16 min, then 16 bytes whose low
    nibbles are values 0..15 and high nibbles 16..31)."""
    n, k = codes.shape
    grouped = codes.view(n, k // 32, 32).to(torch.uint8)
    nibbles = grouped[..., :16] | (grouped[..., 16:] << 4)
    halves = torch.stack([scales, zeros], -1).to(torch.float16).view(torch.uint8)
    return torch.cat([halves, nibbles], -1).contiguous()


def q4_linear(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """`x[M, K] @ w.T` for a `pack_q4_blocks` weight, each 32-block of x quantized to int8
    (kernels/int_gemv_cpu.cpp: needs `cpu_extension.available`); bf16 for bf16 x, else fp32."""
    return torch.ops.tessera.q4_linear(x, blocks)


def i8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 `x[M, K] @ (weight * scales[:, None]).T` for int8 `weight[N, K]`, each 32-block of x
    quantized to int8 (kernels/int_gemv_cpu.cpp: needs `cpu_extension.available`)."""
    return torch.ops.tessera.i8_linear(x, weight, scales)


_HADAMARDS: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def hadamard(block: int, dtype: torch.dtype, device: torch.device | str = "cpu"
             ) -> torch.Tensor:
    """An orthonormal, symmetric (so self-inverse) `[block, block]` matrix whose entries all
    have magnitude about `1 / sqrt(block)`, so it spreads any one channel over the whole block:
    the Sylvester Hadamard matrix of `block`'s power-of-two factor, Kronecker the discrete
    Hartley transform (`cas(2 pi j k / n) / sqrt(n)`) of its odd factor `n` (SmolLM2's 576 =
    9 x 64). Kept in a plain dict, not `functools.cache`: a torch.compile'd forward reads the
    dict, where it would trace through a cache wrapper."""
    key = (block, dtype, torch.device(device))
    if key not in _HADAMARDS:
        odd = block // (block & -block)
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < block // odd:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
        angle = 2 * math.pi * torch.outer(torch.arange(odd), torch.arange(odd)).double() / odd
        h = torch.kron(angle.cos() + angle.sin(), h)
        _HADAMARDS[key] = (h / block ** 0.5).to(dtype=dtype, device=device)
    return _HADAMARDS[key]


# A Kronecker product's matrix-vector product is one small matmul per factor, so a block
# larger than this is rotated as two small matmuls over its `[block / 64, 64]` view.
_KRONECKER_INNER = 64


def rotate(x: torch.Tensor, block: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`x[..., K]` times the block-diagonal `hadamard` matrix of `block`-sized blocks. Rotating
    a linear's input and its weight alike leaves `x W^T` as it was, and spreads an outlier
    channel over the block, so that int8 per token rounds it no worse than the rest (QuaRot).

    Computed and returned in `dtype`: fp32 by default, as the int8 quantizer takes it (a
    16-bit result would be converted back before quantizing). A 512-block as `H_8 X H_64` does
    7x fewer flops than one `[512, 512]` matmul; with fp32 (whose small batched matmuls run
    several times faster than bf16's on CPU) a `[8, 2048]` input took 35 us instead of 91 on
    two Zen 4 cores. Large inputs are another matter: `rotate_activation`. Where the process
    loaded the CPU ops, an fp32 rotation is `tessera::rotate`'s fast Walsh-Hadamard transform
    instead: the same values up to fp32 rounding, in a fraction of the time."""
    if dtype == torch.float32 and cpu_extension.loaded() and not x.is_cuda:
        return torch.ops.tessera.rotate(x, block)
    inner = _KRONECKER_INNER if block % _KRONECKER_INNER == 0 else block
    y = x.to(dtype).unflatten(-1, (-1, block // inner, inner)) @ hadamard(inner, dtype,
                                                                           x.device)
    if block > inner:
        y = hadamard(block // inner, dtype, x.device) @ y
    return y.flatten(-3)


# From this many rows on (past kernel_choice's last token class, so a compiled decode step
# never branches on it), a bf16 activation is rotated in bf16.
BF16_ROTATION_MIN_ROWS = 513


def rotate_activation(x: torch.Tensor, block: int) -> torch.Tensor:
    """`rotate` for an activation `x[T, K]` on its way to int8 codes. A bf16 one of
    `BF16_ROTATION_MIN_ROWS` rows or more is rotated in bf16 where oneDNN's 16-bit matmuls are
    fast: rotating and quantizing `[4096, 2048]` (a Qwen3-MoE prefill chunk's expert inputs, in
    blocks of 512) took 10 ms instead of 23 on two Zen 4 cores, SmolLM2's `[2048, 1536]` 4.0
    instead of 6.4; at 128 rows the two tie. Its two roundings add ~0.24% rms to the values,
    under a third of what int8 codes round off after them."""
    if (x.dtype == torch.bfloat16 and SIXTEEN_BIT_MATMULS_ARE_FAST
            and x.shape[0] >= BF16_ROTATION_MIN_ROWS):
        return rotate(x, block, torch.bfloat16)
    return rotate(x, block)


def quantize_int8_rows(w: torch.Tensor, code_max: int = 127
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (an output channel, or an activation token): `w ~ q * scale`,
    with fp32 `scale[..., 1] = max |row| / code_max`. Where the process loaded the CPU ops,
    `tessera::quantize_rows` gives the same codes and scales in one pass over each row
    (a [4096, 2048] bf16 tensor in 1 ms rather than 7 on two Zen 4 cores); a compiled graph
    keeps these ops, which Inductor fuses itself."""
    if cpu_extension.loaded() and not w.is_cuda and not torch.compiler.is_compiling():
        return torch.ops.tessera.quantize_rows(w, code_max)
    wf = w.float()
    scale = wf.abs().amax(-1, keepdim=True).clamp_(min=1e-30) / code_max
    scaled = wf / scale if wf is w else wf.div_(scale)  # never divide the caller's tensor
    return scaled.round_().to(torch.int8), scale


def int8_weight_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor
                       ) -> torch.Tensor:
    """W8A16: `x[M, K] @ (weight * scales).T` for int8 `weight[N, K]` and bf16 `scales[N]`,
    dequantizing in the kernel (bf16 activations and output)."""
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), weight, scales)


def int8_gemm(x_codes: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
              scales: torch.Tensor) -> torch.Tensor:
    """fp32 `x @ w.T` for int8 `x_codes[M, K]` (fp32 `x_scale[M, 1]` per token) and int8
    `weight[N, K]` (fp32 `scales[N]`): an int32 GEMM (integer dot products: VNNI / AMX-INT8),
    then both scales."""
    return scale_int32(torch._int_mm(x_codes, weight.t()), x_scale, scales)


def scale_int32(products: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor
                ) -> torch.Tensor:
    """fp32 `products * x_scale * w_scale`: an int32 GEMM's result, per-token `x_scale[M, 1]`
    and per-output-channel `w_scale` (`[N]`, or `[M, N]` where rows use different weights)."""
    return products.float().mul_(x_scale).mul_(w_scale)


def pack_int8(weight: torch.Tensor) -> torch.Tensor:
    """int8 `weight[N, K]` in oneDNN's blocked layout for `packed_int8_gemm`: as many bytes, in
    an opaque (`is_mkldnn`) tensor. At few rows `torch._int_mm`, which packs its operand on
    every call, reads the weight at about half the speed: Qwen3-MoE 1B's 144 experts at 8 rows
    each took 87 ms that way and 48 ms packed on two Zen 4 cores; at 512 rows they tie."""
    return torch.ops.onednn.qlinear_prepack(weight, None)


def shift_to_uint8(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes plus 128, as uint8 (`packed_int8_gemm`'s activations): flipping the sign bit
    is that addition."""
    return codes.view(torch.uint8).bitwise_xor(128)


def packed_int8_gemm(shifted: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor
                     ) -> torch.Tensor:
    """fp32 `(shifted - 128) @ W^T * w_scale` for uint8 `shifted[M, K]` (`shift_to_uint8`),
    a `pack_int8` weight and fp32 `w_scale[N]` per output channel. oneDNN takes the zero point
    128 off exactly (its int8 activations take a slow path)."""
    return torch.ops.onednn.qlinear_pointwise(
        shifted, 1.0, 128, packed, w_scale, _NO_ZERO_POINT, None, 1.0, 0, torch.float32,
        "none", [], "")


_NO_ZERO_POINT = torch.zeros(1, dtype=torch.int64)  # the weights' (symmetric codes)


def packed_int8_linear(x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor
                       ) -> torch.Tensor:
    """W8A8 on a `pack_int8` weight: `x` quantized to int8 per token, then `packed_int8_gemm`
    (fp32)."""
    codes, x_scale = quantize_int8_rows(x)
    return packed_int8_gemm(shift_to_uint8(codes), packed, w_scale).mul_(x_scale)


def fbgemm_int8_available() -> bool:
    """Whether torch has fbgemm's int8 GEMM (x86 builds do)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


class FbgemmInt8Weight(HeldByKey):
    """An int8 `weight[N, K]` (fp32 `scales[N]` per output channel) prepacked for fbgemm's
    int8 GEMM (`fbgemm_int8_linear`): as many bytes, plus a column sum per output. torch marks
    its quantized tensors, which the prepack takes, deprecated; the pinned torch has them."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
            codes = torch._make_per_channel_quantized_tensor(
                weight, scales.double(), torch.zeros(len(scales), dtype=torch.long), 0)
        engine = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"  # prepack dispatches on the global engine
        try:
            packed = torch.ops.quantized.linear_prepack(codes, None)
        finally:
            torch.backends.quantized.engine = engine
        super().__init__(packed)
        self.out_features = weight.shape[0]
        self.nbytes = weight.numel() + 4 * weight.shape[0]  # the codes and a column sum each


def fbgemm_int8_linear(x: torch.Tensor, weight: FbgemmInt8Weight) -> torch.Tensor:
    """fp32 `x[M, K] @ W^T` with fbgemm's dynamic int8 linear (uint8 activations). It
    quantizes its input per tensor, so each row is scaled to max |x| = 1 first and its output
    scaled back: int8 per token, in effect. On two AVX2-only Zen 2 cores it runs ~80 GOP/s
    where `torch._int_mm` runs 4 (oneDNN's reference path) and W8A16 ~35. Without VNNI it sums
    u8 x s8 pairs in int16, exact only for weights within +-64: where that is below the int8
    weights' range, `kernel_choice.fbgemm_gemm_is_exact` keeps it from being offered."""
    x = x.float()
    row_max = x.abs().amax(-1, keepdim=True).clamp_(min=1e-30)
    return _fbgemm_linear(x / row_max, weight.key, weight.out_features).mul_(row_max)


@torch.library.custom_op("tessera::fbgemm_linear", mutates_args=())
def _fbgemm_linear(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(x, _HELD[key], False)


@_fbgemm_linear.register_fake
def _(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W8A8: `x` quantized to int8 per token, then `int8_gemm` (fp32)."""
    return int8_gemm(*quantize_int8_rows(x), weight, scales)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int, size_k: int) -> torch.Tensor:
    """fp32 `W[N, K]` of compressed-tensors' pack-quantized int4: code k = 8j + i of a row in
    bits 4i..4i+3 of `qweight[:, j]` (int32), unsigned; `W[n, k] = (q - z[n, k // G]) *
    s[n, k // G]`, with `z` = 8 (symmetric) when `zeros` is None."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    codes = ((qweight[..., None] >> shifts) & 0xF).flatten(-2)[:, :size_k].float()
    scale = scales.float().repeat_interleave(group_size, -1)[:, :size_k]
    zero = 8.0 if zeros is None else zeros.float().repeat_interleave(group_size, -1)[:, :size_k]
    return (codes - zero) * scale


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """`x[..., K] @ W.T` for a `dequantize_int4` weight, W rounded to x's dtype first (the
    Triton kernel's operand). It materializes W on every call: an oracle, not the CPU path
    (`int4_linear` is)."""
    w = dequantize_int4(qweight, scales, zeros, group_size, x.shape[-1])
    return F.linear(x, w.to(x.dtype))


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_int8_rows` of activations `x[M, K]`: int8 codes and fp32 scales `[M]`."""
    codes, scale = quantize_int8_rows(x)
    return codes, scale.squeeze(-1)


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor
                ) -> torch.Tensor:
    """`int8_linear` (per-token int8 activations, exact int32 GEMM, then both scales) in x's
    dtype."""
    out = int8_linear(x.reshape(-1, x.shape[-1]), weight, weight_scale)
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def w8a8_gemm(codes: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
              weight_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """`w8a8_linear` of activations already int8 per token (`codes [M, K]`, `x_scale [M]`)."""
    return int8_gemm(codes, x_scale[:, None], weight, weight_scale).to(out_dtype)


def rms_norm_quant_int8(x: torch.Tensor, weight: torch.Tensor, eps: float,
                        residual: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rms_norm`'s output quantized per token: (codes, scales `[T]`, x + residual)."""
    out, residual = rms_norm(x, weight, eps, residual)
    return *quantize_per_token_int8(out), residual


FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 e4m3 codes of `x[M, K]` and fp32 scales `[M]`, max |row| / 448 (the cast rounds to
    nearest even; the clamp keeps a quotient an ulp past 448 from becoming NaN)."""
    xf = x.float()
    scale = xf.abs().amax(-1).clamp_(min=1e-30) / FP8_MAX
    codes = (xf / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor
               ) -> torch.Tensor:
    """`x[..., K] @ W.T` for fp8 e4m3 `weight[N, K]` with fp32 `weight_scale[N]`, x quantized
    to fp8 per token: both dequantized to fp32 for the product, rounded to bf16 as the fp8
    tensor-core GEMM writes it, then cast to x's dtype."""
    codes, scale = quantize_per_token_fp8(x.reshape(-1, x.shape[-1]))
    out = F.linear(codes.float() * scale[:, None], weight.float() * weight_scale[:, None])
    return out.to(torch.bfloat16).to(x.dtype).view(*x.shape[:-1], weight.shape[0])
