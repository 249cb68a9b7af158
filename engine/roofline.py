"""Speed bounds, and the ceilings they are computed from, measured in the run that uses them.

- `device_ceilings`: a device's copy bandwidth and dense matmul throughput (what `tessera bench
  kernels` and `tessera bench throughput` divide by), timed by `time_ms`.
- `batch_bound`: the fastest a batch of equal requests can run on those ceilings: prompt FLOPs
  at matmul speed plus, per decode step, the weights and the KV read at copy speed.
- `decode_step_bound_s`: one decode step of a few sequences, bytes over bandwidth.
- `measure` (CPU): the single-stream bound `weight bytes / matvec bandwidth`: it streams the
  model's own linear shapes through `F.linear` with one row (as decode does), so the bound and
  the figure it is compared with come from the same machine.

The byte and FLOP counts are plain arithmetic on `ModelArch` (no device), so they are tested on
CPU; see `tests/test_bench_bound.py`.
"""
import time

import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.loader import ModelArch, hf_weight_shapes, load
from engine.model_runner import resolve_dtype


def decode_linear_shapes(arch: ModelArch) -> list[tuple[int, int]]:
    """Every matrix a decode step reads in full: the layers' linears, then the LM head (once,
    tied or not). Not the embedding table: a step gathers only its tokens' rows from it."""
    shapes = [s for name, s in hf_weight_shapes(arch).items() if len(s) == 2
              and name not in ("model.embed_tokens.weight", "lm_head.weight")]
    return shapes + [(arch.vocab_size, arch.hidden_size)]


def linear_params(arch: ModelArch) -> tuple[int, int]:
    """(parameters of the layers' linears, parameters of the LM head)."""
    *layers, head = decode_linear_shapes(arch)
    return sum(n * k for n, k in layers), head[0] * head[1]


def weight_bytes(arch: ModelArch, dtype_bytes: int) -> int:
    """Bytes of weights one decode step reads: all linears including the LM head."""
    return sum(linear_params(arch)) * dtype_bytes


def kv_bytes_per_token(arch: ModelArch, dtype_bytes: int) -> int:
    """K and V of one token in every layer."""
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * dtype_bytes


def causal_attention_flops(arch: ModelArch, prompt_len: int) -> int:
    """QK^T and PV over the query-key pairs a causal prompt of `prompt_len` tokens sees, in all
    layers (2 FLOPs per multiply-add, two products)."""
    pairs = prompt_len * (prompt_len + 1) // 2
    return 4 * arch.num_layers * arch.num_heads * arch.head_dim * pairs


def prompt_flops(arch: ModelArch, prompt_len: int) -> int:
    """One prompt's prefill: the layers' linears on every token (2 x params per token), the LM
    head on the last token only (it yields the first output token), causal attention."""
    layers, head = linear_params(arch)
    return 2 * layers * prompt_len + 2 * head + causal_attention_flops(arch, prompt_len)


def waves(num_seqs: int, concurrency: int) -> int:
    """Rounds of at most `concurrency` sequences that `num_seqs` equal sequences need."""
    return -(-num_seqs // max(1, min(concurrency, num_seqs)))


def decode_kv_tokens(input_len: int, output_len: int) -> int:
    """KV entries one sequence reads over its decode steps: the prefill step yields output token
    1; decode step j = 1 .. output_len - 1 writes token input_len + j - 1 and attends over
    input_len + j entries."""
    steps = output_len - 1
    return steps * input_len + steps * (steps + 1) // 2


def decode_step_bound_s(arch: ModelArch, dtype_bytes: int, context_lens: list[float],
                        bandwidth_gb_s: float) -> float:
    """Seconds of one decode step of sequences with these contexts: weights plus the KV read,
    over the bandwidth."""
    kv = kv_bytes_per_token(arch, dtype_bytes) * sum(context_lens)
    return (weight_bytes(arch, dtype_bytes) + kv) / (bandwidth_gb_s * 1e9)


def batch_bound(arch: ModelArch, dtype_bytes: int, num_prompts: int, input_len: int,
                output_len: int, concurrency: int, bandwidth_gb_s: float,
                matmul_tflops: float) -> dict:
    """Fastest end-to-end time (and output tok/s) of `num_prompts` prompts of `input_len`
    tokens each generating `output_len` tokens, at most `concurrency` at once:

        prompt FLOPs / matmul FLOP/s
      + (decode steps x weight bytes + KV bytes read by every sequence) / bandwidth

    decode steps = waves x (output_len - 1), waves = ceil(num_prompts / concurrency). Prefill
    bytes and decode FLOPs are not counted (each phase is costed by its binding resource)."""
    n_waves = waves(num_prompts, concurrency)
    steps = n_waves * (output_len - 1)
    flops = num_prompts * prompt_flops(arch, input_len)
    w_bytes = steps * weight_bytes(arch, dtype_bytes)
    kv_bytes = (num_prompts * decode_kv_tokens(input_len, output_len)
                * kv_bytes_per_token(arch, dtype_bytes))
    prefill_s = flops / (matmul_tflops * 1e12)
    decode_s = (w_bytes + kv_bytes) / (bandwidth_gb_s * 1e9)
    total_s = prefill_s + decode_s
    return {"concurrency": min(concurrency, num_prompts), "waves": n_waves,
            "decode_steps": steps, "prompt_flops": flops, "decode_weight_bytes": w_bytes,
            "decode_kv_bytes": kv_bytes, "prefill_s": prefill_s, "decode_s": decode_s,
            "total_s": total_s, "tok_s": num_prompts * output_len / total_s}


def time_ms(fn, device: str) -> float:
    """Milliseconds per call of `fn`: triton's `do_bench` on CUDA (events, cache flushed), the
    median of a few wall-clock calls elsewhere (CPU runs only prove that a bench works)."""
    if device.startswith("cuda"):
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100)
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[1] * 1e3


def device_ceilings(dtype: torch.dtype, device: str = "cuda", copy_bytes: int = 1 << 30,
                    matmul_n: int = 8192) -> tuple[float, float]:
    """(GB/s of a `copy_bytes` device copy counting read and write, `matmul_n`^3 matmul TFLOP/s
    in `dtype`). Frees what it allocated, so a KV cache sized from free memory afterwards is not
    shrunk by it."""
    with torch.device(device):
        src = torch.empty(copy_bytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        a, b = (torch.randn(matmul_n, matmul_n, dtype=dtype) for _ in range(2))
    copy_ms = time_ms(lambda: dst.copy_(src), device)
    matmul_ms = time_ms(lambda: a @ b, device)
    del src, dst, a, b
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return 2 * copy_bytes / copy_ms / 1e6, 2 * matmul_n**3 / matmul_ms / 1e9


def measure(model: str | None = None, dtype: str = "auto", repeats: int = 5) -> dict:
    """CPU matvec time per token over the model's decode matrices, and its GB/s."""
    arch, _ = load(ModelConfig(model=model))
    torch_dtype, _ = resolve_dtype(dtype, "cpu")
    shapes = decode_linear_shapes(arch)
    weights = [torch.randn(s, dtype=torch_dtype) for s in shapes]
    inputs = [torch.randn(1, s[1], dtype=torch_dtype) for s in shapes]
    for w, x in zip(weights, inputs):  # warm-up
        F.linear(x, w)
    start = time.perf_counter()
    for _ in range(repeats):
        for w, x in zip(weights, inputs):
            F.linear(x, w)
    seconds = (time.perf_counter() - start) / repeats
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    return {"dtype": str(torch_dtype).removeprefix("torch."), "weight_bytes": nbytes,
            "matvec_gb_s": nbytes / seconds / 1e9, "tpot_bound_ms": seconds * 1000}
