"""`tessera bench kernels`: each Triton kernel beside the GPU's own limits and torch's best.

The ceilings (device-to-device copy bandwidth, matmul throughput) are measured in the same run
by `engine.roofline.device_ceilings`, the measurement `tessera bench throughput` computes its
bound from, so the ratios mean the same on any GPU. Shapes are Llama-3-8B's; pages are shuffled.
The `decode_64x4k_int8` row reads int8 KV pages (`kernels.kv_format`): its bytes are the codes and
scales it reads, so its share of bandwidth compares with the plain row's; torch's figure is the
same SDPA over unquantized K/V.
The fused mixture-of-experts row is a Mixtral-8x7B layer at decode (random routing): the bytes
are the weights of the experts that received a token, and torch's figure is the reference's
per-expert loop of cuBLAS matmuls.
The quantized linears (`kernels.triton_quant`) run at each of Llama-3-8B's linear shapes, at
decode batches and a prefill chunk (`QUANT_TOKENS`): W4A16 (symmetric int4, groups of 128),
W8A8 (int8 per token and per channel, the activations' quantizer included) and fp8 (e4m3,
`torch._scaled_mm`; on GPUs with fp8 tensor cores only). torch's figure is cuBLAS `F.linear`
on the dense weight in --dtype, the speedup is over it. Their limit is the larger of the bytes
(codes, scales, activations in and out) at copy bandwidth and the FLOPs at the matmul peak of
the tensor cores they use: --dtype's for W4A16, int8's (`torch._int_mm`) and fp8's
(`torch._scaled_mm`) measured in the same run.
The Triton functions are called directly (not through `kernels`' dispatch), so `--tiny` runs
the same rows on CPU under TRITON_INTERPRET=1: that proves the bench, it measures nothing.

It lives in `engine/` rather than `kernels/` because it uses the engine's roofline.
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from engine.roofline import device_ceilings, time_ms
from kernels import kv_format, reference
from kernels.kv_format import QuantizedPages


@dataclass(frozen=True)
class MoEShapes:
    hidden: int
    inter: int
    experts: int
    top_k: int
    tokens: int


@dataclass(frozen=True)
class Shapes:
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    inter: int
    page: int
    tokens: int  # for the per-token ops
    # (row id, batch, new tokens per request, context, KV pages: None for the activation dtype
    # or a `kv_format` name): the ids stay put across shape sets, so a dry run's JSON has a real
    # run's keys.
    attention: tuple[tuple[str, int, int, int, str | None], ...]
    copy_bytes: int
    matmul_n: int
    moe: MoEShapes  # the row "fused_moe_decode_64"
    linears: tuple[tuple[str, int, int], ...]  # (name, K, N) of a layer's linears
    linear_tokens: dict[str, int]  # token counts of the quantized-linear rows, by row-id suffix


LLAMA3_8B = Shapes(heads=32, kv_heads=8, head_dim=128, hidden=4096, inter=14336, page=16,
                   tokens=4096, attention=(("decode_64x4k", 64, 1, 4096, None),
                                           ("decode_64x4k_int8", 64, 1, 4096, "int8"),
                                           ("decode_1x32k", 1, 1, 32768, None),
                                           ("prefill_2k", 1, 2048, 2048, None),
                                           ("prefill_8k", 1, 8192, 8192, None)),
                   copy_bytes=1 << 30, matmul_n=8192,
                   moe=MoEShapes(hidden=4096, inter=14336, experts=8, top_k=2, tokens=64),
                   linears=(("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672),
                            ("down", 14336, 4096)),
                   linear_tokens={"m1": 1, "m16": 16, "prefill_2k": 2048})
TINY = Shapes(heads=4, kv_heads=2, head_dim=64, hidden=256, inter=512, page=16, tokens=64,
              attention=(("decode_64x4k", 4, 1, 96, None),
                         ("decode_64x4k_int8", 4, 1, 96, "int8"),
                         ("decode_1x32k", 1, 1, 160, None), ("prefill_2k", 1, 32, 32, None),
                         ("prefill_8k", 1, 48, 48, None)),
              copy_bytes=1 << 22, matmul_n=256,
              moe=MoEShapes(hidden=128, inter=256, experts=4, top_k=2, tokens=16),
              linears=(("qkv", 128, 192), ("o", 128, 128), ("gate_up", 128, 256),
                       ("down", 256, 128)),
              linear_tokens={"m1": 1, "m16": 16, "prefill_2k": 48})
# The quantized-linear rows of each format (`Shapes.linear_tokens`): W4A16 at decode batches of
# 1 and 16 (it reads a quarter of bf16's weight bytes) and a 2048-token prefill chunk; W8A8 and
# fp8 at 16 and 2048 (their tensor cores are twice as fast as bf16's, which a prefill can use).
QUANT_TOKENS = {"w4a16": ("m1", "m16", "prefill_2k"), "w8a8": ("m16", "prefill_2k"),
                "fp8": ("m16", "prefill_2k")}
W4A16_GROUP = 128


def _attention(s: Shapes, batch: int, q_len: int, ctx: int, kv: str | None, dtype: torch.dtype,
               dev: str):
    """(ours, SDPA on the same tokens unpaged, bytes, flops) for `batch` x `q_len` new tokens
    over pages in `dtype` or, given `kv`, in that `kv_format`."""
    from kernels import triton_attention

    num_pages = batch * -(-ctx // s.page)
    k_cache, v_cache = (torch.randn(num_pages, s.page, s.kv_heads, s.head_dim, dtype=dtype,
                                    device=dev) for _ in range(2))
    token_head_bytes = s.head_dim * k_cache.element_size()
    if kv is not None:
        fmt = kv_format.FORMATS[kv]
        k_cache, v_cache = (QuantizedPages(*kv_format.quantize(c, fmt)) for c in (k_cache, v_cache))
        token_head_bytes = fmt.token_head_bytes(s.head_dim)
    block_table = torch.randperm(num_pages, device=dev).int().view(batch, -1)
    q = torch.randn(batch * q_len, s.heads, s.head_dim, dtype=dtype, device=dev)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=dev) * q_len
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    qp = q.view(batch, q_len, s.heads, s.head_dim).transpose(1, 2)
    kp, vp = (torch.randn(batch, s.kv_heads, ctx, s.head_dim, dtype=dtype, device=dev)
              for _ in range(2))
    scale = s.head_dim**-0.5
    args = (q, k_cache, v_cache, query_start_loc, seq_lens, block_table, scale)
    ours = (partial(triton_attention.paged_decode_attention, *args, ctx) if q_len == 1 else
            partial(triton_attention.paged_prefill_attention, *args, q_len))
    peer = partial(F.scaled_dot_product_attention, qp, kp, vp, is_causal=q_len > 1, scale=scale,
                   enable_gqa=True)
    visible = q_len * ctx - (q_len * (q_len - 1)) // 2  # query-key pairs under the causal mask
    nbytes = q.element_size() * 2 * q.numel() + 2 * batch * ctx * s.kv_heads * token_head_bytes
    return ours, peer, nbytes, 4 * batch * s.heads * s.head_dim * visible


def _fused_moe(s: MoEShapes, dtype: torch.dtype, dev: str):
    """(ours, the reference's per-expert matmuls, weight bytes of the experts used, flops)."""
    from kernels import triton_moe, triton_ops

    x = torch.randn(s.tokens, s.hidden, dtype=dtype, device=dev)
    w13 = torch.randn(s.experts, 2 * s.inter, s.hidden, dtype=dtype, device=dev)
    w2 = torch.randn(s.experts, s.hidden, s.inter, dtype=dtype, device=dev)
    scores = torch.randn(s.tokens, s.experts, device=dev).softmax(-1)
    topk_weights, topk_ids = scores.topk(s.top_k, dim=-1)
    args = (x, w13, w2, topk_weights, topk_ids)
    per_expert = 3 * s.inter * s.hidden  # gate, up and down
    return (partial(triton_moe.fused_moe, *args, triton_ops.silu_and_mul),
            partial(reference.fused_moe, *args, reference.silu_and_mul),
            topk_ids.unique().numel() * per_expert * x.element_size(),
            2 * topk_ids.numel() * per_expert)


def _has_fp8(dev: str) -> bool:
    """Whether `torch._scaled_mm` runs here: on CPU, and on GPUs from sm_89 (Ada, Hopper) on."""
    return dev == "cpu" or torch.cuda.get_device_capability() >= (8, 9)


def _low_precision_tflops(n: int, dev: str) -> tuple[float, float | None]:
    """(int8 `torch._int_mm`, fp8 `torch._scaled_mm` or None where it cannot run) n^3
    TFLOP/s: the tensor-core peaks W8A8 and fp8 are held to."""
    a = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=dev)
    int8 = 2 * n**3 / time_ms(lambda: torch._int_mm(a, a.t()), dev) / 1e9
    if not _has_fp8(dev):
        return int8, None
    f, one = a.to(torch.float8_e4m3fn), torch.ones((), device=dev)
    fp8_ms = time_ms(lambda: torch._scaled_mm(f, f.t(), one, one, out_dtype=torch.bfloat16), dev)
    return int8, 2 * n**3 / fp8_ms / 1e9


def _quantized_linears(s: Shapes, dtype: torch.dtype, dev: str):
    """(row id, shape, ours, cuBLAS F.linear on the dense weight, bytes, flops, the matmul
    ceiling's name) for each quantized format at each linear shape and token count."""
    from kernels import triton_quant

    for name, size_k, size_n in s.linears:
        dense = torch.randn(size_n, size_k, dtype=dtype, device=dev) / size_k**0.5
        groups = size_k // W4A16_GROUP
        formats = {
            "w4a16": (partial(triton_quant.w4a16_linear,
                              qweight=torch.randint(-2**31, 2**31, (size_n, size_k // 8),
                                                    dtype=torch.int32, device=dev),
                              scales=torch.rand(size_n, groups, dtype=dtype, device=dev) / 64,
                              zeros=None, group_size=W4A16_GROUP),
                      size_n * size_k // 2 + size_n * groups * dense.element_size(), "matmul"),
            "w8a8": (partial(triton_quant.w8a8_linear,
                             weight=torch.randint(-127, 128, (size_n, size_k), dtype=torch.int8,
                                                  device=dev),
                             weight_scale=torch.rand(size_n, device=dev) / 1e3),
                     size_n * size_k + 4 * size_n, "int8"),
        }
        if _has_fp8(dev):
            formats["fp8"] = (partial(triton_quant.fp8_linear,
                                      weight=dense.to(torch.float8_e4m3fn),
                                      weight_scale=torch.ones(size_n, device=dev)),
                              size_n * size_k + 4 * size_n, "fp8")
        for label, tokens in s.linear_tokens.items():
            x = torch.randn(tokens, size_k, dtype=dtype, device=dev)
            peer = partial(F.linear, x, dense)
            io_bytes = (tokens * size_k + tokens * size_n) * x.element_size()
            for fmt, (linear, weight_bytes, ceiling) in formats.items():
                if label in QUANT_TOKENS[fmt]:
                    yield (f"{fmt}_{name}_{label}", f"{tokens}x{size_k}->{size_n}",
                           partial(linear, x), peer, weight_bytes + io_bytes,
                           2 * tokens * size_k * size_n, ceiling)


def _ops(s: Shapes, dtype: torch.dtype, dev: str):
    """(row id, the op given its module (Triton's or the reference), bytes) for the per-token
    ops over `s.tokens` tokens."""
    tokens, elt = s.tokens, torch.finfo(dtype).bits // 8
    x, res, gate_up = (torch.randn(tokens, n, dtype=dtype, device=dev)
                       for n in (s.hidden, s.hidden, 2 * s.inter))
    w = torch.randn(s.hidden, dtype=dtype, device=dev)
    q = torch.randn(tokens, s.heads, s.head_dim, dtype=dtype, device=dev)
    k, v = (torch.randn(tokens, s.kv_heads, s.head_dim, dtype=dtype, device=dev)
            for _ in range(2))
    angles = torch.rand(tokens, s.head_dim // 2, device=dev) * 6.3  # norm-preserving rotations
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)
    positions = torch.arange(tokens, device=dev)
    k_cache, v_cache = (torch.empty(-(-tokens // s.page), s.page, s.kv_heads, s.head_dim,
                                    dtype=dtype, device=dev) for _ in range(2))
    slots = torch.randperm(tokens, device=dev)
    kv_bytes = 4 * k.numel() * elt
    return [
        ("rms_norm_residual", lambda m: m.rms_norm(x, w, 1e-5, res), 4 * x.numel() * elt),
        ("rotary_embedding", lambda m: m.rotary_embedding(positions, q, k, cos_sin),
         2 * (q.numel() + k.numel()) * elt + cos_sin.numel() * elt),
        ("silu_and_mul", lambda m: m.silu_and_mul(gate_up), 3 * gate_up.numel() // 2 * elt),
        ("write_kv", lambda m: m.write_kv(k, v, k_cache, v_cache, slots), kv_bytes),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tessera bench kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        default="bfloat16")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes; on CPU with TRITON_INTERPRET=1 this proves the bench "
                             "runs (a dry run), it measures nothing")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per line: the ceilings, then one per kernel row")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not (args.tiny and os.environ.get("TRITON_INTERPRET") == "1"):
        sys.exit("tessera bench kernels needs a CUDA GPU: it times the Triton kernels, which "
                 "only run there (the CPU path uses the torch references). A dry run on CPU: "
                 "TRITON_INTERPRET=1 tessera bench kernels --tiny --dtype float32")
    dev, shapes, dtype = ("cuda" if cuda else "cpu"), (TINY if args.tiny else LLAMA3_8B), \
        getattr(torch, args.dtype)
    bandwidth, tflops = device_ceilings(dtype, dev, shapes.copy_bytes, shapes.matmul_n)
    int8_tops, fp8_tflops = _low_precision_tflops(shapes.matmul_n, dev)
    ceilings = {"matmul": tflops, "int8": int8_tops, "fp8": fp8_tflops}
    name = torch.cuda.get_device_name() if cuda else "cpu (interpreted Triton)"
    emit = (lambda row: print(json.dumps(row), flush=True)) if args.json else None
    if emit:
        emit({"row": "ceilings", "device_name": name, "dtype": args.dtype, "tiny": args.tiny,
              "copy_gb_s": bandwidth, "matmul_tflops": tflops, "int8_tops": int8_tops,
              "fp8_tflops": fp8_tflops})
    else:
        fp8 = f"{fp8_tflops:.0f} TFLOP/s" if fp8_tflops else "none"
        print(f"{name}: copy {bandwidth:.0f} GB/s, {args.dtype} matmul {tflops:.0f} TFLOP/s, "
              f"int8 {int8_tops:.0f} TOP/s, fp8 {fp8} (measured)")
        print("torch: SDPA on the same K/V unpaged for attention, the eager reference otherwise "
              "(fused MoE: per-expert cuBLAS matmuls; quantized linears: cuBLAS F.linear on "
              "the dense weight)")
        print(f"{'kernel':42} {'ms':>8} {'GB/s':>7} {'TFLOP/s':>8} {'of limit':>8} "
              f"{'torch ms':>9} {'speedup':>8}")

    def row(row_id: str, shape: str, ms: float, peer_ms: float, nbytes: int,
            flops: int = 0, ceiling: str = "matmul") -> None:
        gbs, tfs = nbytes / ms / 1e6, flops / ms / 1e9
        of_bw, of_mm = gbs / bandwidth, tfs / ceilings[ceiling]
        if emit:
            emit({"row": row_id, "shape": shape, "ms": ms, "gb_s": gbs, "tflop_s": tfs,
                  "fraction_of_bandwidth": of_bw, "fraction_of_matmul": of_mm,
                  "torch_ms": peer_ms, "speedup_vs_torch": peer_ms / ms})
            return
        print(f"{row_id + ' ' + shape:42} {ms:8.3f} {gbs:7.0f} {tfs:8.1f} {max(of_bw, of_mm):8.0%} "
              f"{peer_ms:9.3f} {peer_ms / ms:7.2f}x")

    for row_id, batch, q_len, ctx, kv in shapes.attention:
        ours, peer, nbytes, flops = _attention(shapes, batch, q_len, ctx, kv, dtype, dev)
        row(row_id, f"{batch}x{q_len}x{ctx}", time_ms(ours, dev), time_ms(peer, dev), nbytes,
            flops)
    from kernels import triton_ops
    for row_id, op, nbytes in _ops(shapes, dtype, dev):
        row(row_id, f"{shapes.tokens} tok", time_ms(lambda: op(triton_ops), dev),
            time_ms(lambda: op(reference), dev), nbytes)
    moe = shapes.moe
    ours, peer, nbytes, flops = _fused_moe(moe, dtype, dev)
    row("fused_moe_decode_64", f"{moe.tokens}x{moe.top_k}/{moe.experts}",
        time_ms(ours, dev), time_ms(peer, dev), nbytes, flops)
    peer_ms = {}  # one cuBLAS timing per shape and token count, shared by the formats
    for row_id, shape, ours, peer, nbytes, flops, ceiling in _quantized_linears(shapes, dtype,
                                                                                 dev):
        if shape not in peer_ms:
            peer_ms[shape] = time_ms(peer, dev)
        row(row_id, shape, time_ms(ours, dev), peer_ms[shape], nbytes, flops, ceiling)
    return 0


if __name__ == "__main__":
    sys.exit(main())
