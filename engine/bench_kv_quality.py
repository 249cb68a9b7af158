"""`tessera bench kv-quality`: what each KV page format and eviction policy costs in quality,
memory and speed.

For each `--kv-cache-dtype` (the first, `auto` by default, is the baseline of the same run),
then each of `--kv-policies` and of `--kv-head-configs` (on the first format):

- perplexity on a long text, windows of `--ppl-window` tokens scored as `tessera bench
  perplexity` scores them;
- passkey retrieval: a five-digit number planted at `--depths` of a filler text at each of
  `--lengths` (tokens; `max` is the model's context), `--trials` numbers per cell, greedy,
  exact match of the first number answered;
- KV bytes per token (codes and scales, all layers, K and V) and, under a policy, the share of
  the perplexity run's computed tokens still held when each window ended (under a head config,
  the share of the bytes: every token at the full-context heads, sinks + window at the
  streaming heads);
- one decode step at `--decode-batch` requests of `--decode-context` tokens each, or as many as
  a policy keeps if fewer (the model's forward and its logits, the pages filled without a
  prefill, as timing needs no content).

Prompts run in chunks of `--chunk` tokens: a policy evicts between steps, so a query sees up to
one chunk more than it keeps.

Each format runs in a fresh process. A table, `--json` (one line), `--plot FILE.png` (quality
against KV bytes per token).
"""
import argparse
import importlib.util
import json
import math
import multiprocessing
import random
import re
import statistics
import time
from pathlib import Path

import torch

from engine.bench_perplexity import DEFAULT_FILE, scored_nll, window_outputs, windows
from engine.config import KV_CACHE_DTYPES
from engine.cpu_info import reported_cpu_flags
from engine.layers.attention import AttentionMetadata
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from scheduler.head_config import load_head_config
from scheduler.kv_policy import parse_kv_policy

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tessera bench kv-quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default SmolLM2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantization", default="auto")
    p.add_argument("--kv-cache-dtypes", default="auto,fp8,int8,int4",
                   help="comma-separated formats, the first the baseline (default %(default)s)")
    p.add_argument("--kv-policies", default="",
                   help="semicolon-separated kv_policy specs, each a row on the first format, "
                        "e.g. 'streaming:sinks=4,window=2044;streaming:sinks=0,window=2048'")
    p.add_argument("--kv-head-configs", default="",
                   help="semicolon-separated head config files (tessera calibrate heads), each "
                        "a row on the first format")
    p.add_argument("--chunk", type=int, default=256, help="prompt tokens per step")
    p.add_argument("--file", default=DEFAULT_FILE, help="text for perplexity")
    p.add_argument("--ppl-tokens", type=int, default=8192, help="score the text's first N")
    p.add_argument("--ppl-window", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="engine context (default: the model's); 'max' passkeys use it")
    p.add_argument("--lengths", default="1024,2048,4096,max",
                   help="passkey context lengths in tokens, 'max' = the model's")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths, 0 = the start")
    p.add_argument("--trials", type=int, default=20, help="passkeys per (length, depth) cell")
    p.add_argument("--decode-batch", type=int, default=32)
    p.add_argument("--decode-context", type=int, default=2048)
    p.add_argument("--decode-steps", type=int, default=5, help="timed steps (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line of results")
    p.add_argument("--plot", default=None, help="write quality vs KV bytes per token (PNG)")
    args = p.parse_args(argv)
    args.formats = args.kv_cache_dtypes.split(",")
    if bad := [f for f in args.formats if f not in KV_CACHE_DTYPES]:
        p.error(f"unknown KV cache dtype {bad[0]!r}; choose from {', '.join(KV_CACHE_DTYPES)}")
    args.policies = [spec for spec in args.kv_policies.split(";") if spec.strip()]
    args.head_configs = [path for path in args.kv_head_configs.split(";") if path.strip()]
    for path in args.head_configs:
        try:
            load_head_config(path)
        except ValueError as e:
            p.error(str(e))
    for spec in args.policies:
        try:
            parse_kv_policy(spec)
        except ValueError as e:
            p.error(str(e))
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        p.error("--plot needs matplotlib: pip install matplotlib")
    return args


def passkey_prompt(llm: LLM, length: int, depth: float, key: int) -> tuple[list[int], range]:
    """`length` tokens: filler with the needle at `depth`, then the question; and where the
    needle is."""
    tok = llm.tokenizer
    needle, question = tok.encode(" " + NEEDLE.format(key=key)), tok.encode(QUESTION)
    filler = tok.encode(FILLER)
    room = length - len(needle) - len(question)
    body = (filler * (room // len(filler) + 1))[:room]
    at = int(room * depth)
    return body[:at] + needle + body[at:] + question, range(at, at + len(needle))


def passkey(llm: LLM, lengths: list[int], depths: list[float], trials: int, seed: int
            ) -> dict[str, float]:
    """Exact-match accuracy per `length@depth` cell; the same keys for every format."""
    rng = random.Random(seed)
    cells = [(n, d) for n in lengths for d in depths]
    keys = {cell: [rng.randrange(10000, 100000) for _ in range(trials)] for cell in cells}
    prompts = [passkey_prompt(llm, n - 8, d, k)[0] for (n, d) in cells for k in keys[n, d]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8))
    answers = iter(re.findall(r"\d+", o.outputs[0].text)[:1] for o in outs)
    return {f"{n}@{d}": sum(next(answers) == [str(k)] for k in keys[n, d]) / trials
            for n, d in cells}


@torch.inference_mode()
def decode_step_seconds(llm: LLM, batch: int, context: int, steps: int) -> float:
    """Median seconds of one decode step of `batch` requests `context` tokens deep, on the
    engine's pages (whatever they hold: the work does not depend on it)."""
    runner = llm.engine.runner
    page = runner.kv_spec.page_size
    width = -(-context // page)
    block_table = torch.arange(batch * width, device=runner.device).view(batch, width)
    starts = torch.full((batch,), context - 1, device=runner.device)
    ones = torch.ones(batch, dtype=torch.int64, device=runner.device)
    positions, meta = AttentionMetadata.for_batch(starts, ones, block_table, page, 1, context)
    if runner.head_config is not None:  # the streaming heads hold sinks + window
        held = min(context, runner.head_config.sinks + runner.head_config.window + 1)
        width = -(-held // page)
        _, meta.streaming = AttentionMetadata.for_batch(
            starts, ones, torch.arange(batch * width, device=runner.device).view(batch, width)
            % runner.streaming_cache.num_pages, page, 1, held, torch.full_like(starts, held - 1))
    ids = torch.zeros(batch, dtype=torch.int64, device=runner.device)
    times = []
    for _ in range(steps + 1):  # the first warms up
        start = time.perf_counter()
        hidden = runner.model(ids, positions, runner.kv_layers, meta)
        runner.model.compute_logits(hidden)
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(args: argparse.Namespace, fmt: str, policy: str | None,
            head_config: str | None = None) -> dict:
    page = 16
    llm = LLM(model=args.model, device=args.device, dtype=args.dtype,
              quantization=args.quantization, kv_cache_dtype=fmt, kv_policy=policy or "none",
              kv_head_config=head_config,
              max_model_len=args.max_model_len, page_size=page,
              max_num_batched_tokens=args.chunk,
              num_kv_pages=max(args.decode_batch * -(-args.decode_context // page),
                               -(-(args.max_model_len or 0) // page)),
              enforce_eager=True)  # steps time the page format, not Inductor's fusion
    runner = llm.engine.runner
    lengths = sorted({runner.max_model_len if n == "max" else int(n)
                      for n in args.lengths.split(",")})
    text_ids = llm.tokenizer.encode(Path(args.file).read_text())[:args.ppl_tokens + 1]
    plan = windows(len(text_ids), args.ppl_window - 1, args.ppl_window - 1)
    outs = window_outputs(llm, text_ids, plan)
    nll, evicted = scored_nll(plan, outs), [o.kv_evicted_tokens or 0 for o in outs]
    depths = [float(d) for d in args.depths.split(",")]
    kept = parse_kv_policy(policy)
    context = min(args.decode_context, kept.held_tokens(args.decode_context) + 1) if kept \
        else args.decode_context
    computed = [end - begin for begin, end, _ in plan]
    held = 1 - sum(evicted) / sum(computed)
    bytes_per_token = runner.kv_spec.token_bytes
    if runner.streaming_cache is not None:
        streaming = runner.streaming_cache.spec.token_bytes
        keeps = runner.head_config.sinks + runner.head_config.window
        held = sum(bytes_per_token * n + streaming * min(n, keeps) for n in computed) / (
            (bytes_per_token + streaming) * sum(computed))
        bytes_per_token += streaming
    return {
        "kv_cache_dtype": runner.kv_spec.storage,
        "kv_policy": policy or (head_config and f"heads:{Path(head_config).name}"),
        "kv_bytes_per_token": bytes_per_token,
        "kv_held": held,
        "perplexity": math.exp(math.fsum(nll) / len(nll)),
        "passkey": passkey(llm, lengths, depths, args.trials, args.seed),
        "decode_context": context,
        "decode_step_ms": 1000 * decode_step_seconds(llm, args.decode_batch, context,
                                                     args.decode_steps)}


def compare(rows: list[dict]) -> None:
    """Each row beside the baseline (the first): perplexity change, token capacity per KV
    byte, decode step ratio, passkey accuracy over the cells where the baseline is >= 50%."""
    base = rows[0]
    judged = [c for c, acc in base["passkey"].items() if acc >= 0.5]
    for r in rows:
        r["perplexity_change"] = r["perplexity"] / base["perplexity"] - 1
        r["tokens_per_byte_vs_baseline"] = (base["kv_bytes_per_token"] * base["kv_held"]
                                            / (r["kv_bytes_per_token"] * r["kv_held"]))
        r["decode_step_vs_baseline"] = r["decode_step_ms"] / base["decode_step_ms"]
        r["passkey_mean"] = statistics.mean(r["passkey"].values())
        r["passkey_vs_baseline"] = (
            sum(r["passkey"][c] for c in judged) / sum(base["passkey"][c] for c in judged)
            if judged else None)


def report(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"{args.model or 'SmolLM2-135M-Instruct'} on {args.device} "
          f"({torch.get_num_threads()} threads, CPU flags {reported_cpu_flags()}), "
          f"dtype {args.dtype}; perplexity of {args.file} (first {args.ppl_tokens} tokens, "
          f"windows of {args.ppl_window}); passkey {args.trials} trials per cell; decode "
          f"step {args.decode_batch} x {args.decode_context} tokens (or what a policy keeps); "
          f"prompt chunks of {args.chunk}")
    cells = list(rows[0]["passkey"])
    width = max(9, *(len(label(r)) + 1 for r in rows))
    head = (f"{'format':<{width}}{'B/token':>9}{'held':>7}{'x tokens':>9}{'ppl':>9}{'Δppl':>8}"
            f"{'decode ms':>11}{'x step':>8}{'passkey':>9}{'vs base':>9}")
    print(head)
    for r in rows:
        vs = r["passkey_vs_baseline"]
        print(f"{label(r):<{width}}{r['kv_bytes_per_token']:>9,}{100 * r['kv_held']:>6.0f}%"
              f"{r['tokens_per_byte_vs_baseline']:>9.2f}{r['perplexity']:>9.3f}"
              f"{100 * r['perplexity_change']:>+7.2f}%{r['decode_step_ms']:>11.1f}"
              f"{r['decode_step_vs_baseline']:>8.2f}{100 * r['passkey_mean']:>8.0f}%"
              f"{'-' if vs is None else f'{100 * vs:.0f}%':>9}")
    print("passkey per cell (length@depth): " + "  ".join(
        f"{c}: " + "/".join(f"{100 * r['passkey'][c]:.0f}" for r in rows) for c in cells))


def label(row: dict) -> str:
    return row["kv_cache_dtype"] + (f" {row['kv_policy']}" if row["kv_policy"] else "")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ppl, key) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        held = r["kv_bytes_per_token"] * r["kv_held"]
        for ax, y in ((ppl, r["perplexity"]), (key, 100 * r["passkey_mean"])):
            ax.scatter(held, y)
            ax.annotate(label(r), (held, y))
    ppl.set(xlabel="KV bytes held per token", ylabel="perplexity", title="perplexity")
    key.set(xlabel="KV bytes held per token", ylabel="passkey exact match (%)",
            title="passkey")
    for ax in (ppl, key):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # a fresh process per format: one engine's freed memory never shapes the next one's steps
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        rows = pool.starmap(measure, [(args, fmt, None) for fmt in args.formats]
                            + [(args, args.formats[0], spec) for spec in args.policies]
                            + [(args, args.formats[0], None, path)
                               for path in args.head_configs])
    compare(rows)
    if args.json:
        print(json.dumps({"cpu_flags": reported_cpu_flags(), "rows": rows}))
    else:
        report(rows, args)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
