"""`tessera bench serve`: load an OpenAI-compatible server and print vLLM's serving metrics.

Works against any server (ours, vLLM, llama.cpp's llama-server). Prompts are random token runs
of exactly `--input-len` tokens under our tokenizer; each answer is forced to `--output-len`
tokens with `max_tokens` plus `ignore_eos` and `min_tokens` (accepted by vLLM, llama-server and
Tessera). Closed loop keeps `--concurrency` requests in flight; open loop sends Poisson arrivals
at `--request-rate`. TPOT excludes the first token; ITL is every gap between streamed tokens.
"""
import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def synthetic_prompts(tokenizer_model: str | None, num: int, input_len: int,
                      seed: int) -> list[str]:
    """Random-token texts that re-tokenize to `input_len` tokens (chat framing comes on top)."""
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_model)
    rng = random.Random(seed)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    prompts = []
    for _ in range(num):
        ids = rng.sample(vocab, input_len)
        for _ in range(4):  # decode/re-encode can merge tokens: top up, then trim
            ids = tok.encode(tok.decode(ids))[:input_len]
            ids += rng.sample(vocab, input_len - len(ids))
        prompts.append(tok.decode(ids))
    return prompts


async def one_request(http: httpx.AsyncClient, url: str, model: str, prompt: str,
                      output_len: int) -> Result:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": output_len, "min_tokens": output_len, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    result, start = Result(), time.perf_counter()
    last, chunks = start, 0
    try:
        async with http.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                data = json.loads(line[5:])
                if data.get("usage"):
                    result.output_tokens = data["usage"]["completion_tokens"]
                if not any((c.get("delta") or {}).get("content") for c in data.get("choices", [])):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last, chunks = now, chunks + 1
        result.e2e = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
        result.ok = chunks > 0
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = repr(exc)
    return result


async def run(args: argparse.Namespace, prompts: list[str]) -> tuple[list[Result], float]:
    url = args.base_url.rstrip("/") + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    concurrency = asyncio.Semaphore(args.concurrency or len(prompts))
    rng = np.random.default_rng(args.seed)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as http:

        async def limited(prompt: str) -> Result:
            async with concurrency:
                return await one_request(http, url, args.model, prompt, args.output_len)

        start, tasks = time.perf_counter(), []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def summarize(args: argparse.Namespace, results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    pct = (50, 90, 99)

    def stats(name: str, values: list[float]) -> dict:
        arr = np.array(values) * 1000 if values else np.array([np.nan])
        return {f"mean_{name}_ms": float(arr.mean()),
                **{f"p{p}_{name}_ms": float(np.percentile(arr, p)) for p in pct}}

    good = [r for r in ok
            if (args.slo_ttft_ms is None or r.ttft * 1000 <= args.slo_ttft_ms)
            and (args.slo_tpot_ms is None or (r.tpot or 0) * 1000 <= args.slo_tpot_ms)]
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "base_url": args.base_url, "model": args.model, "input_len": args.input_len,
        "output_len": args.output_len, "concurrency": args.concurrency,
        "request_rate": args.request_rate, "num_prompts": len(results), "completed": len(ok),
        "failed": len(results) - len(ok), "duration_s": duration,
        "output_tokens": output_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": output_tokens / duration,
        "goodput": len(good) / duration,
        **stats("ttft", [r.ttft for r in ok]),
        **stats("tpot", [r.tpot for r in ok if r.tpot is not None]),
        **stats("itl", [gap for r in ok for gap in r.itl]),
        **stats("e2e", [r.e2e for r in ok]),
    }


def peak_rss_mib(pid: int) -> float:
    """VmHWM of a process and its children's, in MiB (the engine core is a child process)."""
    from pathlib import Path

    def hwm(p: str) -> float:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return hwm(str(pid)) + sum(hwm(c) for c in children if Path(f"/proc/{c}").exists())


def print_table(summary: dict, errors: list[str]) -> None:
    s = summary
    print(f"{'requests (ok/failed)':<28}{s['completed']}/{s['failed']}")
    print(f"{'duration':<28}{s['duration_s']:.2f} s")
    print(f"{'output tokens':<28}{s['output_tokens']}")
    print(f"{'output throughput':<28}{s['output_throughput']:.2f} tok/s")
    print(f"{'request throughput':<28}{s['request_throughput']:.3f} req/s")
    print(f"{'goodput':<28}{s['goodput']:.3f} req/s")
    print(f"{'':<10}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}  (ms)")
    for name in ("ttft", "tpot", "itl", "e2e"):
        row = [s[f"{k}_{name}_ms"] for k in ("mean", "p50", "p90", "p99")]
        print(f"{name.upper():<10}" + "".join(f"{v:>10.2f}" for v in row))
    for pid, rss in s["peak_rss_mib"].items():
        print(f"{f'peak RSS of pid {pid}':<28}{rss:.0f} MiB")
    if "roofline" in s:
        r = s["roofline"]
        print(f"{'TPOT bound':<28}{r['tpot_bound_ms']:.2f} ms ({r['weight_bytes'] / 1e6:.0f} MB "
              f"of {r['dtype']} weights at {r['matvec_gb_s']:.1f} GB/s); "
              f"TPOT p50 / bound = {r['p50_tpot_over_bound']:.2f}")
    for error in errors[:5]:
        print("error:", error)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tessera bench serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct",
                        help="model name sent in each request")
    parser.add_argument("--tokenizer", default=None,
                        help="model path whose tokenizer sizes the prompts (default: bundled)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=None,
                        help="closed loop: requests in flight (default: all)")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="open loop: Poisson arrivals per second (default inf: all at once)")
    parser.add_argument("--slo-ttft-ms", type=float, default=None)
    parser.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON line of results")
    parser.add_argument("--roofline-dtype", default=None,
                        help="also measure the batch-1 TPOT bound (weight bytes / matvec "
                             "bandwidth) of the bundled model in this dtype, after the run")
    parser.add_argument("--server-pid", type=int, action="append", default=[],
                        help="report this process's peak RSS after the run (repeatable)")
    args = parser.parse_args(argv)
    prompts = synthetic_prompts(args.tokenizer, args.num_prompts, args.input_len, args.seed)
    results, duration = asyncio.run(run(args, prompts))
    summary = summarize(args, results, duration)
    summary["peak_rss_mib"] = {pid: peak_rss_mib(pid) for pid in args.server_pid}
    if args.roofline_dtype:
        from engine.roofline import measure

        bound = measure(dtype=args.roofline_dtype)
        bound["p50_tpot_over_bound"] = summary["p50_tpot_ms"] / bound["tpot_bound_ms"]
        summary["roofline"] = bound
    if args.json:
        print(json.dumps(summary))
    else:
        print_table(summary, [r.error for r in results if r.error])
