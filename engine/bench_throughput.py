"""`tessera bench throughput`: offline generation speed, Tessera beside transformers `generate`.

Both run in the same process on the same model and synthetic prompts of exactly `--input-len`
tokens, each producing exactly `--output-len` tokens (EOS ignored): a batch of `--num-prompts`,
then a single request. transformers runs batched (`--transformers-batch` at a time) in `--dtype`,
whose "auto" is the dtype dense GEMMs run fastest in here (bf16 on CUDA or with AVX-512 BF16 or
AMX, else fp32; Tessera's integer kernels take bf16 on any CPU); with `--load-format dummy` both
get random weights of the config's shapes, built on the device.

On CUDA (or anywhere with `--roofline`) the run also measures the device's copy bandwidth and
matmul throughput (as `tessera bench kernels` does) and prints the batch against the bound they
give (see `engine.roofline.batch_bound`), and the batch-1 decode step against weights-plus-KV
bytes over the bandwidth. On CUDA it reports the decode graphs' capture time. Each stage says
on stderr what it is doing, and long generations print their progress every few seconds.
"""
import argparse
import gc
import json
import sys
import time

import torch

from engine import LLM, SamplingParams
from engine.config import QUANTIZATIONS, CacheConfig
from engine.logs import Progress
from engine.model_runner import resolve_dtype
from engine.roofline import batch_bound, decode_step_bound_s, device_ceilings
from engine.tokenizer import DEFAULT_MODEL_NAME

VLLM_REFERENCE = "vLLM published: ~5.3k output tok/s for Llama-3.1-8B on one H100"
_PROGRESS_INTERVAL_S = 5.0


def stage(text: str) -> None:
    """What the run does now, on stderr (stdout keeps the results, and --json one line)."""
    print(text, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tessera bench throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="GGUF file or HF directory (default SmolLM2); with --load-format dummy "
                        "a directory holding config.json, e.g. configs/llama3-8b")
    p.add_argument("--load-format", default="auto", choices=["auto", "gguf", "hf", "dummy"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default="auto", choices=QUANTIZATIONS,
                   help="weight format of the linears, as the server's flag (default auto)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run decode steps eagerly, not as CUDA graphs")
    p.add_argument("--gpu-memory-utilization", type=float,
                   default=CacheConfig.gpu_memory_utilization,
                   help="CUDA: fraction of GPU memory the engine may use (default %(default)s)")
    p.add_argument("--transformers-batch", type=int, default=None,
                   help="prompts per transformers `generate` call (default: all at once); on "
                        "CUDA it is halved on out-of-memory until it fits")
    p.add_argument("--roofline", action="store_true",
                   help="measure the ceilings and compare with the bound off CUDA too (on CUDA "
                        "always); on CPU a small copy and matmul, enough for a dry run")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers runs")
    p.add_argument("--json", action="store_true", help="print one JSON line of results")
    return p.parse_args(argv)


def synthetic_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 32000), (n, length), generator=gen).tolist()


def build_llm(args) -> LLM:
    return LLM(model=args.model, load_format=args.load_format, device=args.device,
               dtype=args.dtype, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens,
               max_model_len=args.input_len + args.output_len + 1,
               quantization=args.quantization, enforce_eager=args.enforce_eager,
               gpu_memory_utilization=args.gpu_memory_utilization)


def time_tessera(llm: LLM, prompts: list[list[int]], output_len: int) -> float:
    """Seconds to generate `output_len` tokens for every prompt, end to end."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    progress = Progress(len(prompts), "requests done", stage, _PROGRESS_INTERVAL_S)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, progress.update)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
    return elapsed


def load_transformers(args, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.tokenizer import resolve_model_path

    path = resolve_model_path(args.model)
    if args.load_format == "dummy":  # random weights made on the device, in the dtype
        config = AutoConfig.from_pretrained(str(path if path.is_dir() else path.parent))
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    elif path.is_file():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(args.device).eval()


@torch.inference_mode()
def time_transformers(model, prompts: list[list[int]], output_len: int, device: str,
                      batch: int | None = None) -> float:
    """Seconds for `generate` over all prompts, `batch` prompts per call (default all)."""
    batch = batch or len(prompts)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[i:i + batch], device=device)  # equal lengths: no padding
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=output_len, min_new_tokens=output_len,
                             eos_token_id=None, pad_token_id=0)
        assert out.shape[1] == len(prompts[0]) + output_len
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_transformers_batch(model, prompts, output_len, device, batch: int | None
                            ) -> tuple[float, int]:
    """(seconds, prompts per call); on CUDA out-of-memory halves the batch and starts over."""
    batch = min(batch or len(prompts), len(prompts))
    while True:
        try:
            return time_transformers(model, prompts, output_len, device, batch), batch
        except torch.cuda.OutOfMemoryError:
            if not device.startswith("cuda") or batch == 1:
                raise
        stage(f"transformers: out of memory at {batch} prompts per generate, retrying with "
              f"{(batch + 1) // 2}")
        batch = (batch + 1) // 2
        _free_cuda()


def _free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype, _ = resolve_dtype(args.dtype, args.device)
    cuda = args.device.startswith("cuda")
    roofline = cuda or args.roofline
    n, in_len, out_len = args.num_prompts, args.input_len, args.output_len
    results = {"model": args.model or f"{DEFAULT_MODEL_NAME} (bundled)",
               "load_format": args.load_format,
               "device": args.device, "dtype": str(dtype).removeprefix("torch."),
               "quantization": args.quantization,
               "threads": torch.get_num_threads(), "num_prompts": n,
               "input_len": in_len, "output_len": out_len,
               "max_num_seqs": args.max_num_seqs,
               "max_num_batched_tokens": args.max_num_batched_tokens}
    if roofline:  # before the engine takes its share of memory, on an otherwise idle device
        stage("measuring the device's copy bandwidth and matmul throughput")
        sizes = {} if cuda else {"copy_bytes": 1 << 26, "matmul_n": 1024}
        bandwidth, tflops = device_ceilings(dtype, args.device, **sizes)
        results |= {"device_name": torch.cuda.get_device_name(args.device) if cuda else "cpu",
                    "enforce_eager": args.enforce_eager, "copy_gb_s": bandwidth,
                    "matmul_tflops": tflops}
    stage(f"tessera: loading {results['model']} ({args.load_format})")
    llm = build_llm(args)
    results["quantization"] = llm.engine.runner.linear_method.name  # "auto" resolved
    results["kernels"] = llm.engine.runner.kernels_chosen()
    graphs = llm.engine.runner.graphs
    results["graph_capture_s"] = graphs.capture_s if graphs is not None else None
    arch = llm.engine.runner.arch
    prompts = synthetic_prompts(n, in_len, arch.vocab_size)
    # Warm-up and single-request prompts differ from the batch's, so the prefix cache gives
    # no run a prompt it has seen before.
    warm = synthetic_prompts(8 if cuda else 2, in_len, arch.vocab_size, seed=1)
    single = synthetic_prompts(1, in_len, arch.vocab_size, seed=2)
    time_tessera(llm, warm, 4)
    stage(f"tessera: {n} prompts x {in_len} tokens -> {out_len} tokens, then one")
    batch_s = time_tessera(llm, prompts, out_len)
    single_s = time_tessera(llm, single, out_len)
    results |= {"tessera_batch_s": batch_s, "tessera_batch_tok_s": n * out_len / batch_s,
                "tessera_single_tok_s": out_len / single_s}
    if roofline:
        elt = torch.finfo(dtype).bits // 8
        page_size = llm.config.cache.page_size
        kv_pages = llm.engine.runner.kv_cache.num_pages
        kv_seqs = kv_pages // -(-(in_len + out_len) // page_size)
        concurrency = min(args.max_num_seqs, kv_seqs)
        bound = batch_bound(arch, elt, n, in_len, out_len, concurrency, bandwidth, tflops)
        results |= {"kv_pages": kv_pages, "kv_capacity_seqs": kv_seqs}
        results |= {f"bound_{k}": v for k, v in bound.items()}
        results["batch_fraction_of_bound"] = results["tessera_batch_tok_s"] / bound["tok_s"]
        if out_len > 1:
            stage("tessera: timing the batch-1 decode step")
            # One decode step at batch 1: the same prompt (now in the prefix cache, so both
            # runs prefill alike) run to 1 and to output_len tokens, best of 3 each; steps see
            # contexts input_len + 1 .. input_len + output_len - 1, on average
            # input_len + output_len / 2.
            full_s, first_s = (min(time_tessera(llm, single, k) for _ in range(3))
                               for k in (out_len, 1))
            step_s = (full_s - first_s) / (out_len - 1)
            step_bound_s = decode_step_bound_s(arch, elt, [in_len + out_len / 2], bandwidth)
            results |= {"single_decode_step_ms": step_s * 1e3,
                        "single_decode_tok_s": 1 / step_s,
                        "single_decode_bound_ms": step_bound_s * 1e3,
                        "single_decode_bound_tok_s": 1 / step_bound_s,
                        "single_decode_fraction_of_bound": step_bound_s / step_s}
        results["reference"] = VLLM_REFERENCE
    del llm
    if cuda:
        _free_cuda()
    if not args.no_transformers:
        stage("transformers: loading the same weights")
        model = load_transformers(args, dtype)
        time_transformers(model, warm[:2], 4, args.device)  # warm-up
        stage(f"transformers: {n} prompts x {in_len} tokens -> {out_len} tokens, then one")
        t_batch_s, per_call = time_transformers_batch(model, prompts, out_len, args.device,
                                                      args.transformers_batch)
        results |= {"transformers_batch": per_call, "transformers_chunked": per_call < n,
                    "transformers_batch_tok_s": n * out_len / t_batch_s,
                    "transformers_single_tok_s":
                        out_len / time_transformers(model, single, out_len, args.device)}
        results["batch_ratio"] = (results["tessera_batch_tok_s"]
                                  / results["transformers_batch_tok_s"])
        results["single_ratio"] = (results["tessera_single_tok_s"]
                                   / results["transformers_single_tok_s"])
        del model
        if cuda:
            _free_cuda()
    if args.json:
        print(json.dumps(results))
    else:
        print_table(results, args)
    return 0


def print_table(r: dict, args) -> None:
    if "device_name" in r:
        print(f"{r['device_name']}: copy {r['copy_gb_s']:.0f} GB/s, {r['dtype']} matmul "
              f"{r['matmul_tflops']:.0f} TFLOP/s (measured in this run)")
        where = f"{r['device_name']}{', eager' if r['enforce_eager'] else ''}"
    else:
        where = f"{r['threads']} threads"
    print(f"{r['model']} ({r['load_format']}) on {r['device']} {r['dtype']}"
          f"{'' if r['quantization'] == 'none' else ' ' + r['quantization']}"
          f", {where}, max_num_seqs {r['max_num_seqs']}, "
          f"max_num_batched_tokens {r['max_num_batched_tokens']}")
    for layer, plan in r["kernels"].items():
        print(f"  kernels {layer.split(' ')[1]}: {plan}")
    print(f"batch: {r['num_prompts']} prompts x {r['input_len']} prompt tokens -> "
          f"{r['output_len']} output tokens each (EOS ignored); single: one such prompt alone")
    print(f"{'output tok/s':14}{'batch':>14}{'single':>14}")
    print(f"{'tessera':14}{r['tessera_batch_tok_s']:14.1f}{r['tessera_single_tok_s']:14.1f}")
    if "transformers_batch_tok_s" in r:
        chunked = (f"  (generate on {r['transformers_batch']} prompts at a time)"
                   if r["transformers_chunked"] else "")
        print(f"{'transformers':14}{r['transformers_batch_tok_s']:14.1f}"
              f"{r['transformers_single_tok_s']:14.1f}{chunked}")
        print(f"{'ratio':14}{r['batch_ratio']:14.2f}x{r['single_ratio']:13.2f}x")
    if "bound_tok_s" in r:
        print(f"{'bound':14}{r['bound_tok_s']:14.1f}   tessera at "
              f"{r['batch_fraction_of_bound']:.0%} of it")
        print(f"  = prompt FLOPs / matmul + decode bytes / copy bandwidth = "
              f"{r['bound_prompt_flops'] / 1e12:.4g} TFLOP / {r['matmul_tflops']:.0f} TFLOP/s "
              f"({r['bound_prefill_s']:.3f} s) + ({r['bound_decode_weight_bytes'] / 1e9:.4g} GB "
              f"weights over {r['bound_decode_steps']} steps + "
              f"{r['bound_decode_kv_bytes'] / 1e9:.4g} GB KV) / {r['copy_gb_s']:.0f} GB/s "
              f"({r['bound_decode_s']:.3f} s)")
        print(f"  {r['bound_concurrency']} sequences at once (max-num-seqs {r['max_num_seqs']}, "
              f"KV room for {r['kv_capacity_seqs']}): {r['bound_waves']} "
              f"wave{'s' if r['bound_waves'] > 1 else ''}; tessera took "
              f"{r['tessera_batch_s']:.3f} s, the bound {r['bound_total_s']:.3f} s")
    if "single_decode_step_ms" in r:
        print(f"batch-1 decode step {r['single_decode_step_ms']:.2f} ms "
              f"({r['single_decode_tok_s']:.1f} tok/s), bound {r['single_decode_bound_ms']:.2f} ms"
              f" ({r['single_decode_bound_tok_s']:.1f} tok/s, weights + KV / copy bandwidth): "
              f"{r['single_decode_fraction_of_bound']:.0%} of the roofline")
    if r["graph_capture_s"] is not None:
        print(f"decode CUDA graphs captured in {r['graph_capture_s']:.1f} s")
    if "reference" in r:
        print(f"{r['reference']} (context only, not run here)")


if __name__ == "__main__":
    raise SystemExit(main())
