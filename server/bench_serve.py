"""`tessera bench serve`: load an OpenAI-compatible server and print vLLM's serving metrics.

Works against any server (ours, vLLM, llama.cpp's llama-server). Each request is a chat of one
user message whose prompt, chat template included, is exactly `--input-len` tokens under
`--tokenizer` (give the server's model, so the template is the server's); each answer is forced
to `--output-len` tokens with `max_tokens` plus `ignore_eos` and `min_tokens` (accepted by vLLM,
llama-server and Tessera). Closed loop keeps `--concurrency` requests in flight; open loop sends
Poisson arrivals at `--request-rate`. TPOT excludes the first token; ITL is every gap between
streamed tokens. `--request-rates R1,R2,...` runs one open-loop load per rate and prints each
rate's SLO attainment (the share of requests within both `--slo-ttft-ms` and `--slo-tpot-ms`)
and DistServe's goodput: the highest rate at which at least 90% of requests are within both.
Progress goes to stderr every few seconds; `--save-result` keeps the summary and every
request, `--plot` draws latency CDFs and output throughput over time.
"""
import argparse
import asyncio
import importlib.util
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

from engine.logs import Progress

_PROGRESS_INTERVAL_S = 5.0


@dataclass
class Result:
    ok: bool = False
    start: float = 0.0  # seconds after the run began
    ttft: float = 0.0
    e2e: float = 0.0
    prompt_tokens: int = 0  # as the server counted them (usage), 0 if it did not say
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def synthetic_prompts(tokenizer_model: str | None, num: int, input_len: int,
                      seed: int) -> list[str]:
    """Random-token texts whose chat prompt (template included) is `input_len` tokens.

    The template's own tokens are measured once and the text fills the rest; each prompt is
    then counted whole and corrected, since text and template can merge at their seams.
    """
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_model)
    rng = random.Random(seed)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]

    def chat_len(text: str) -> int:
        return len(tok.apply_chat_template([{"role": "user", "content": text}],
                                           add_generation_prompt=True, tokenize=True,
                                           return_dict=False))

    def text_of(num_tokens: int) -> str:
        ids = rng.choices(vocab, k=num_tokens)
        for _ in range(4):  # decode/re-encode can merge tokens: trim, then top up
            ids = tok.encode(tok.decode(ids), add_special_tokens=False)[:num_tokens]
            ids += rng.choices(vocab, k=num_tokens - len(ids))
        return tok.decode(ids)

    overhead = chat_len("hello") - len(tok.encode("hello", add_special_tokens=False))
    if input_len <= overhead:
        raise SystemExit(f"--input-len {input_len} leaves no room for text: the chat template "
                         f"alone is {overhead} tokens")
    prompts = []
    for _ in range(num):
        length = input_len - overhead
        for _ in range(4):
            text = text_of(length)
            if (missing := input_len - chat_len(text)) == 0:
                break
            length += missing
        prompts.append(text)
    return prompts


async def one_request(http: httpx.AsyncClient, url: str, model: str, prompt: str,
                      output_len: int) -> Result:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": output_len, "min_tokens": output_len, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    result, last, chunks = Result(start=start), start, 0
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
                    result.prompt_tokens = data["usage"]["prompt_tokens"]
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
    """Every request's result (`start` relative to the run's) and the run's seconds."""
    url = args.base_url.rstrip("/") + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    concurrency = asyncio.Semaphore(args.concurrency or len(prompts))
    rng = np.random.default_rng(args.seed)
    progress = Progress(len(prompts), "requests done",
                        lambda line: print(line, file=sys.stderr, flush=True),
                        _PROGRESS_INTERVAL_S)
    done = 0

    async def report() -> None:
        while True:
            await asyncio.sleep(1.0)
            progress.update(done)

    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as http:

        async def limited(prompt: str) -> Result:
            nonlocal done
            async with concurrency:
                result = await one_request(http, url, args.model, prompt, args.output_len)
            done += 1
            return result

        start, tasks = time.perf_counter(), []
        reporter = asyncio.create_task(report())
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        reporter.cancel()
        for result in results:
            result.start -= start
        return results, time.perf_counter() - start


def summarize(args: argparse.Namespace, results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    pct = (50, 90, 99)

    def stats(name: str, values: list[float]) -> dict:
        arr = np.array(values) * 1000 if values else np.array([np.nan])
        return {f"mean_{name}_ms": float(arr.mean()),
                **{f"p{p}_{name}_ms": float(np.percentile(arr, p)) for p in pct}}

    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(r.prompt_tokens for r in ok)
    summary = {
        "base_url": args.base_url, "model": args.model, "input_len": args.input_len,
        "output_len": args.output_len, "concurrency": args.concurrency,
        "request_rate": args.request_rate, "num_prompts": len(results), "completed": len(ok),
        "failed": len(results) - len(ok), "duration_s": duration,
        "input_tokens": input_tokens, "mean_input_tokens": input_tokens / max(len(ok), 1),
        "output_tokens": output_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": output_tokens / duration,
        **stats("ttft", [r.ttft for r in ok]),
        **stats("tpot", [r.tpot for r in ok if r.tpot is not None]),
        **stats("itl", [gap for r in ok for gap in r.itl]),
        **stats("e2e", [r.e2e for r in ok]),
    }
    if args.slo_ttft_ms is not None or args.slo_tpot_ms is not None:
        good = [r for r in ok
                if (args.slo_ttft_ms is None or r.ttft * 1000 <= args.slo_ttft_ms)
                and (args.slo_tpot_ms is None or (r.tpot or 0) * 1000 <= args.slo_tpot_ms)]
        summary |= {"slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
                    "goodput": len(good) / duration,
                    "slo_attainment": len(good) / max(len(results), 1)}
    return summary


GOODPUT_ATTAINMENT = 0.9  # DistServe: the share of requests that must meet both SLOs


def sweep(args: argparse.Namespace, rates: list[float]) -> None:
    """One open-loop run per rate (ascending), each with prompts of its own (`--seed` plus
    the rate's index), so no run hits the prefix cache another filled; each rate's
    attainment, then the goodput."""
    print(f"{args.base_url}: {args.num_prompts} chat requests of {args.input_len} prompt tokens -> "
          f"{args.output_len} output tokens per rate, Poisson arrivals; SLOs TTFT <= "
          f"{args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms")
    print(f"{'req/s':>7} {'attained':>9} {'TTFT p90 ms':>12} {'TPOT p90 ms':>12} "
          f"{'failed':>7}")
    rows = []
    for i, rate in enumerate(sorted(rates)):
        args.request_rate = rate
        prompts = synthetic_prompts(args.tokenizer, args.num_prompts, args.input_len,
                                    args.seed + 1 + i)
        results, duration = asyncio.run(run(args, prompts))
        s = summarize(args, results, duration)
        rows.append(s)
        print(f"{rate:7.2f} {100 * s['slo_attainment']:8.0f}% {s['p90_ttft_ms']:12.1f} "
              f"{s['p90_tpot_ms']:12.1f} {s['failed']:7d}", flush=True)
    met = [s["request_rate"] for s in rows if s["slo_attainment"] >= GOODPUT_ATTAINMENT]
    print(f"goodput (DistServe: highest rate with >= {100 * GOODPUT_ATTAINMENT:.0f}% within "
          f"both SLOs): {max(met):.2f} req/s" if met else
          "goodput: no rate tried kept 90% of requests within both SLOs")
    if args.json:
        print(json.dumps({"goodput": max(met, default=0.0), "rates": rows}))


def server_kernels(base_url: str) -> dict[str, str]:
    """The kernels a Tessera server says its quantized layers run (`tessera:linear_kernels`
    on /metrics); empty for other servers, or a dense one."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"{base_url}/metrics", timeout=10).text
        families = list(text_string_to_metric_families(text))
    except (httpx.HTTPError, ValueError):
        return {}
    return {s.labels["layer"]: s.labels["plan"] for f in families for s in f.samples
            if s.name == "tessera:linear_kernels_info"}


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


def settings_line(s: dict) -> str:
    load = (f"concurrency {s['concurrency']} (closed loop)" if s["concurrency"]
            else "all at once" if s["request_rate"] == float("inf")
            else f"{s['request_rate']:g} req/s Poisson arrivals (open loop)")
    return (f"{s['base_url']} {s['model']}: {s['num_prompts']} chat requests of "
            f"{s['input_len']} prompt tokens (template included) -> {s['output_len']} output "
            f"tokens, {load}")


def print_table(summary: dict, errors: list[str]) -> None:
    s = summary
    print(settings_line(s))
    print(f"{'requests ok / failed':<28}{s['completed']} / {s['failed']}")
    print(f"{'duration':<28}{s['duration_s']:.2f} s")
    print(f"{'prompt tokens sent':<28}{s['input_tokens']} ({s['mean_input_tokens']:.1f} per "
          f"request, as the server counted)")
    print(f"{'output tokens':<28}{s['output_tokens']}")
    print(f"{'output throughput':<28}{s['output_throughput']:.2f} output tok/s")
    print(f"{'request throughput':<28}{s['request_throughput']:.3f} req/s")
    if "goodput" in s:
        slo = " and ".join(f"{name} <= {s[key]:g} ms" for name, key in (
            ("TTFT", "slo_ttft_ms"), ("TPOT", "slo_tpot_ms")) if s[key] is not None)
        print(f"{'goodput':<28}{s['goodput']:.3f} req/s ({slo})")
        print(f"{'SLO attainment':<28}{100 * s['slo_attainment']:.0f}% of requests")
    print(f"{'latency, ms':<12}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        row = [s[f"{k}_{name}_ms"] for k in ("mean", "p50", "p90", "p99")]
        print(f"{name.upper():<12}" + "".join(f"{v:>10.2f}" for v in row))
    for pid, rss in s["peak_rss_mib"].items():
        print(f"{f'peak RSS of pid {pid}':<28}{rss:.0f} MiB")
    for layer, plan in summary.get("kernels", {}).items():
        print(f"{'kernels ' + layer.split(' ')[1]:<28}{plan}")
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
                        help="model path whose tokenizer and chat template size the prompts "
                             "(default: bundled SmolLM2)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128,
                        help="prompt tokens per request, chat template included")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=None,
                        help="closed loop: requests in flight (default: all)")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="open loop: Poisson arrivals per second (default inf: all at once)")
    parser.add_argument("--slo-ttft-ms", type=float, default=None,
                        help="goodput counts requests within this TTFT (and --slo-tpot-ms)")
    parser.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument("--request-rates", default=None, metavar="R1,R2,...",
                        help="one open-loop run per rate, then DistServe's goodput (needs "
                             "both SLOs)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON line of results")
    parser.add_argument("--save-result", metavar="FILE.json",
                        help="write the summary and every request's timings as JSON")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw TTFT/TPOT/E2E CDFs and output throughput over time "
                             "(needs matplotlib)")
    parser.add_argument("--roofline-dtype", default=None,
                        help="also measure the batch-1 TPOT bound (weight bytes / matvec "
                             "bandwidth) of the bundled model in this dtype, after the run")
    parser.add_argument("--server-pid", type=int, action="append", default=[],
                        help="report this process's peak RSS after the run (repeatable)")
    args = parser.parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # say so before the run
        parser.error("--plot needs matplotlib: pip install matplotlib "
                     "(or pip install 'tessera[test]')")
    if args.request_rates is not None and (args.slo_ttft_ms is None or args.slo_tpot_ms is None):
        parser.error("--request-rates needs --slo-ttft-ms and --slo-tpot-ms")
    if args.request_rates is not None:
        sweep(args, [float(r) for r in args.request_rates.split(",")])
        return
    prompts = synthetic_prompts(args.tokenizer, args.num_prompts, args.input_len, args.seed)
    results, duration = asyncio.run(run(args, prompts))
    summary = summarize(args, results, duration)
    summary["peak_rss_mib"] = {pid: peak_rss_mib(pid) for pid in args.server_pid}
    summary["kernels"] = server_kernels(args.base_url)
    if args.roofline_dtype:
        from engine.roofline import measure

        bound = measure(dtype=args.roofline_dtype)
        bound["p50_tpot_over_bound"] = summary["p50_tpot_ms"] / bound["tpot_bound_ms"]
        summary["roofline"] = bound
    if args.json:
        print(json.dumps(summary))
    else:
        print_table(summary, [r.error for r in results if r.error])
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump({**summary, "requests": [asdict(r) for r in results]}, f, indent=1)
    if args.plot:
        from server.bench_plot import plot

        plot(results, duration, settings_line(summary), args.plot)
