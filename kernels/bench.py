"""`tessera bench kernels`: each Triton kernel beside the GPU's own limits and torch's best.

The ceilings (device-to-device copy bandwidth, bf16 matmul throughput) are measured in the same
run by `engine.roofline.device_ceilings`, the measurement `tessera bench throughput` computes its
bound from, so the ratios mean the same on any GPU. Shapes are Llama-3-8B's; pages are shuffled.
"""
import argparse
import sys
from functools import partial

import torch
import torch.nn.functional as F

import kernels
from engine.roofline import device_ceilings
from kernels import reference

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTER, PAGE = 32, 8, 128, 4096, 14336, 16


def _ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100)


def _attention(batch: int, q_len: int, ctx: int, dtype: torch.dtype):
    """(ours, SDPA on the same tokens unpaged, bytes, flops) for `batch` x `q_len` new tokens."""
    dev, num_pages = "cuda", batch * -(-ctx // PAGE)
    k_cache, v_cache = (torch.randn(num_pages, PAGE, KV_HEADS, HEAD_DIM, dtype=dtype, device=dev)
                        for _ in range(2))
    block_table = torch.randperm(num_pages, device=dev).int().view(batch, -1)
    q = torch.randn(batch * q_len, HEADS, HEAD_DIM, dtype=dtype, device=dev)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=dev) * q_len
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    qp = q.view(batch, q_len, HEADS, HEAD_DIM).transpose(1, 2)
    kp, vp = (torch.randn(batch, KV_HEADS, ctx, HEAD_DIM, dtype=dtype, device=dev)
              for _ in range(2))
    scale = HEAD_DIM**-0.5
    ours = partial(kernels.paged_attention, q, k_cache, v_cache, query_start_loc, seq_lens,
                   block_table, scale, q_len, ctx)
    peer = partial(F.scaled_dot_product_attention, qp, kp, vp, is_causal=q_len > 1, scale=scale,
                   enable_gqa=True)
    visible = q_len * ctx - (q_len * (q_len - 1)) // 2  # query-key pairs under the causal mask
    nbytes = q.element_size() * (2 * q.numel() + 2 * batch * ctx * KV_HEADS * HEAD_DIM)
    return ours, peer, nbytes, 4 * batch * HEADS * HEAD_DIM * visible


def _ops(tokens: int, dtype: torch.dtype):
    """(name, ours, torch reference, bytes) for the per-token ops over `tokens` tokens."""
    dev, elt = "cuda", torch.finfo(dtype).bits // 8
    x, res, gate_up = (torch.randn(tokens, n, dtype=dtype, device=dev)
                       for n in (HIDDEN, HIDDEN, 2 * INTER))
    w = torch.randn(HIDDEN, dtype=dtype, device=dev)
    q = torch.randn(tokens, HEADS, HEAD_DIM, dtype=dtype, device=dev)
    k, v = (torch.randn(tokens, KV_HEADS, HEAD_DIM, dtype=dtype, device=dev) for _ in range(2))
    angles = torch.rand(tokens, HEAD_DIM // 2, device=dev) * 6.3  # norm-preserving rotations
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)
    positions = torch.arange(tokens, device=dev)
    k_cache, v_cache = (torch.empty(-(-tokens // PAGE), PAGE, KV_HEADS, HEAD_DIM, dtype=dtype,
                                    device=dev) for _ in range(2))
    slots = torch.randperm(tokens, device=dev)
    kv_bytes = 4 * k.numel() * elt
    return [
        ("rms_norm+residual", lambda m: m.rms_norm(x, w, 1e-5, res), 4 * x.numel() * elt),
        ("rotary_embedding", lambda m: m.rotary_embedding(positions, q, k, cos_sin),
         2 * (q.numel() + k.numel()) * elt + cos_sin.numel() * elt),
        ("silu_and_mul", lambda m: m.silu_and_mul(gate_up), 3 * gate_up.numel() // 2 * elt),
        ("write_kv", lambda m: m.write_kv(k, v, k_cache, v_cache, slots), kv_bytes),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tessera bench kernels", description=__doc__)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens for the per-token ops")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tessera bench kernels needs a CUDA GPU: it times the Triton kernels, which "
                 "only run there (the CPU path uses the torch references).")
    dtype = getattr(torch, args.dtype)
    bandwidth, tflops = device_ceilings(dtype)
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth:.0f} GB/s, "
          f"{args.dtype} matmul {tflops:.0f} TFLOP/s (measured)")
    print("torch: SDPA on the same K/V unpaged for attention, the eager reference otherwise")
    print(f"{'kernel':28} {'ms':>8} {'GB/s':>7} {'TFLOP/s':>8} {'of limit':>8} "
          f"{'torch ms':>9} {'speedup':>8}")

    def row(name: str, ms: float, peer_ms: float, nbytes: int, flops: int = 0) -> None:
        gbs, tfs = nbytes / ms / 1e6, flops / ms / 1e9
        limit = max(gbs / bandwidth, tfs / tflops)  # whichever resource binds
        print(f"{name:28} {ms:8.3f} {gbs:7.0f} {tfs:8.1f} {limit:8.0%} {peer_ms:9.3f} "
              f"{peer_ms / ms:7.2f}x")

    for name, batch, q_len, ctx in [("decode attn 64 x 4k", 64, 1, 4096),
                                    ("decode attn 1 x 32k", 1, 1, 32768),
                                    ("prefill attn 2k", 1, 2048, 2048),
                                    ("prefill attn 8k", 1, 8192, 8192)]:
        ours, peer, nbytes, flops = _attention(batch, q_len, ctx, dtype)
        row(name, _ms(ours), _ms(peer), nbytes, flops)
    for name, op, nbytes in _ops(args.tokens, dtype):
        row(f"{name} {args.tokens} tok", _ms(lambda: op(kernels)),
            _ms(lambda: op(reference)), nbytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
