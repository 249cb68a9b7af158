"""`tessera bench perplexity`: perplexity of a long text through the engine's paged path.

The text is tokenized and cut into windows of `--max-model-len` - 1 tokens (one position stays
free for the token every request generates) starting `--stride` tokens apart. Each window is one
request with `prompt_logprobs` and `max_tokens=1`, prefilled in `--max-num-batched-tokens`
chunks, so every chunk after the first attends to KV pages that earlier chunks wrote: what the
KV-cache format or the weight quantization costs shows up in the figure. Every token is scored
once, by the first window that holds it past the window's first position; with overlapping
windows (stride < window) a window scores only the tokens beyond the previous one, the overlap
serving as context. Perplexity = exp(mean negative log-likelihood, in nats per scored token).

`--transformers` scores the same windows with transformers on the same weights, in the same
dtype (unpaged, one forward per window), and prints its perplexity beside ours and the ratio.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch

from engine import LLM, SamplingParams
from engine.bench_throughput import load_transformers
from engine.config import KV_CACHE_DTYPES, QUANTIZATIONS, byte_size
from engine.llm import RequestOutput
from engine.tokenizer import DEFAULT_MODEL_NAME

DEFAULT_FILE = "/usr/share/common-licenses/GPL-3"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tessera bench perplexity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default SmolLM2)")
    p.add_argument("--load-format", default="auto", choices=["auto", "gguf", "hf"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default="auto", choices=QUANTIZATIONS)
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="KV page dtype (auto = model dtype)")
    p.add_argument("--max-model-len", type=int, default=1024,
                   help="engine context; windows hold one token less (default %(default)s)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: the window, no overlap)")
    p.add_argument("--max-num-batched-tokens", type=int, default=256,
                   help="prefill chunk budget per step (default %(default)s)")
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--num-kv-pages", type=int, default=None)
    kv.add_argument("--kv-cache-memory", type=byte_size, default=None, help="e.g. 512MiB")
    p.add_argument("--file", default=DEFAULT_FILE, help="text to score (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="use the text's first N + 1 tokens only (at most N scored)")
    p.add_argument("--transformers", action="store_true",
                   help="also score the windows with transformers (the reference)")
    p.add_argument("--json", action="store_true", help="print one JSON line of results")
    args = p.parse_args(argv)
    window = args.max_model_len - 1
    args.stride = args.stride or window
    if window < 2 or not 1 <= args.stride <= window:
        p.error(f"need --max-model-len >= 3 and 1 <= --stride <= {window} (the window)")
    return args


def windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window: it holds tokens begin..end-1 and scores
    first_scored..end-1, each token once (a window's first token has no context in it)."""
    out, scored_to = [], 1
    for begin in range(0, num_tokens - 1, stride):
        end = min(begin + window, num_tokens)
        first = max(scored_to, begin + 1)
        if end > first:
            out.append((begin, end, first))
            scored_to = end
        if end == num_tokens:
            break
    return out


def window_outputs(llm: LLM, ids: list[int], plan: list[tuple[int, int, int]]
                   ) -> list[RequestOutput]:
    """Every window of `plan` one request with prompt logprobs, all at once."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    return llm.generate([ids[begin:end] for begin, end, _ in plan], params)


def scored_nll(plan: list[tuple[int, int, int]], outs: list[RequestOutput]) -> list[float]:
    """Negative log-likelihood of each scored token of the windows' outputs."""
    return [-lp.logprob for (begin, _, first), out in zip(plan, outs)
            for lp in out.prompt_logprobs[first - begin:]]


def tessera_nll(llm: LLM, ids: list[int], plan: list[tuple[int, int, int]]) -> list[float]:
    """Negative log-likelihood of each scored token: every window one request, all at once."""
    return scored_nll(plan, window_outputs(llm, ids, plan))


@torch.inference_mode()
def transformers_nll(model, ids: list[int], plan: list[tuple[int, int, int]], device: str
                     ) -> list[float]:
    """Negative log-likelihood of each scored token, one unpaged forward per window."""
    nll = []
    for begin, end, first in plan:
        window = torch.tensor([ids[begin:end]], device=device)
        logprobs = model(window).logits[0, first - begin - 1:-1].float().log_softmax(-1)
        nll += (-logprobs.gather(1, window[0, first - begin:, None])).squeeze(1).tolist()
    return nll


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    llm = LLM(model=args.model, load_format=args.load_format, device=args.device,
              dtype=args.dtype, max_num_batched_tokens=args.max_num_batched_tokens,
              num_kv_pages=args.num_kv_pages, kv_cache_memory=args.kv_cache_memory,
              max_model_len=args.max_model_len, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype,
              enforce_eager=True)  # prefill only: a compiled decode step would go unused
    text_ids = llm.tokenizer.encode(Path(args.file).read_text())
    ids = text_ids if args.max_tokens is None else text_ids[:args.max_tokens + 1]
    window = args.max_model_len - 1
    plan = windows(len(ids), window, args.stride)
    if not plan:
        raise SystemExit(f"{args.file}: {len(ids)} tokens, nothing to score")
    start = time.perf_counter()
    nll = tessera_nll(llm, ids, plan)
    seconds = time.perf_counter() - start
    runner = llm.engine.runner
    mean = math.fsum(nll) / len(nll)
    results = {
        "ppl": math.exp(mean), "nll_mean": mean, "tokens_evaluated": len(nll),
        "windows": len(plan), "seconds": seconds,
        "prompt_tokens_per_s": sum(e - b for b, e, _ in plan) / seconds,
        "model": args.model or DEFAULT_MODEL_NAME, "device": args.device,
        "dtype": str(runner.dtype).removeprefix("torch."),
        "kv_cache_dtype": runner.kv_spec.storage,
        "quantization": args.quantization, "max_model_len": args.max_model_len,
        "window": window, "stride": args.stride,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "page_size": runner.kv_spec.page_size, "num_kv_pages": runner.kv_cache.num_pages,
        "file": args.file, "text_tokens": len(text_ids), "threads": torch.get_num_threads()}
    if args.transformers:
        dtype = runner.dtype
        del llm, runner  # the engine's weights and KV cache go before the reference loads
        reference = transformers_nll(load_transformers(args, dtype), ids, plan, args.device)
        ref_mean = math.fsum(reference) / len(reference)
        results |= {"transformers_ppl": math.exp(ref_mean), "transformers_nll_mean": ref_mean,
                    "ppl_ratio": math.exp(mean - ref_mean)}
    if args.json:
        print(json.dumps(results))
    else:
        print_report(results)
    return 0


def print_report(r: dict) -> None:
    print(f"{r['model']} on {r['device']} ({r['threads']} threads): weights {r['dtype']}"
          f"{'' if r['quantization'] == 'none' else ' ' + r['quantization']}"
          f", KV cache {r['kv_cache_dtype']} "
          f"({r['num_kv_pages']} pages of {r['page_size']} tokens)")
    print(f"text {r['file']}: {r['text_tokens']} tokens; {r['windows']} windows of up to "
          f"{r['window']} tokens, stride {r['stride']}, prefilled in chunks of "
          f"{r['max_num_batched_tokens']} tokens")
    print(f"perplexity {r['ppl']:.4f}  (mean NLL {r['nll_mean']:.4f} nats/token over "
          f"{r['tokens_evaluated']} scored tokens)")
    if "transformers_ppl" in r:
        print(f"transformers on the same windows: perplexity {r['transformers_ppl']:.4f} "
              f"(mean NLL {r['transformers_nll_mean']:.4f}); tessera / transformers "
              f"{r['ppl_ratio']:.5f}x")
    print(f"{r['seconds']:.1f} s, {r['prompt_tokens_per_s']:.0f} prompt tokens/s")


if __name__ == "__main__":
    raise SystemExit(main())
