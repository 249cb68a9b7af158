"""`tessera calibrate heads`: which KV heads need the whole context, written as a head config
(`--kv-head-config`, scheduler/head_config.py).

Passkey prompts (bench kv-quality's: a five-digit number planted in filler, at depths spread
over the context) run through the model with every head holding the whole context, each
followed by its answer (teacher-forced). For the queries that retrieve, the question's last
`--queries` and the answer's, the engine returns the attention each KV head pays every key
(the statistics SnapKV scores by, `ScoredQueries`). A head's score is the share of that
attention that falls on the needle, averaged over its query heads, those queries and the
prompts: the heads that look the needle up far back are retrieval heads (RazorAttention's and
the Retrieval Head paper's criterion); the `--streaming-fraction` of heads with the lowest
scores stream. Only the retrieving queries count: the needle's own keys and values were
computed when it was read, within every head's window.
"""
import argparse
import random

import numpy as np
import torch

from engine.bench_kv_quality import passkey_prompt
from engine.layers.attention import AttentionMetadata, ScoredQueries
from engine.llm import LLM
from scheduler.head_config import write_head_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tessera calibrate heads", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the head config to write (JSON)")
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default SmolLM2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--sinks", type=int, default=4, help="positions a streaming head keeps first")
    p.add_argument("--window", type=int, default=252, help="recent positions it keeps")
    p.add_argument("--streaming-fraction", type=float, default=0.5,
                   help="share of the KV heads that stream (default %(default)s)")
    p.add_argument("--length", type=int, default=2048, help="calibration prompt tokens")
    p.add_argument("--prompts", type=int, default=8, help="prompts, needles at spread depths")
    p.add_argument("--queries", type=int, default=8,
                   help="scored queries at the question's end, besides the answer's")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 < args.streaming_fraction < 1:
        p.error("--streaming-fraction must be in (0, 1)")
    if args.length <= args.sinks + args.window + args.queries:
        p.error("--length must exceed sinks + window + queries: nothing would be evicted")
    return args


@torch.inference_mode()
def needle_attention(llm: LLM, ids: list[int], needle: range, queries: int) -> np.ndarray:
    """`[layers, kv_heads]`: the share of the attention the last `queries` queries of `ids`
    pay to the positions `needle`, one full-KV prefill on the engine's (idle) pages."""
    runner, n = llm.engine.runner, len(ids)
    dev, page = runner.device, runner.kv_spec.page_size
    block_table = torch.arange(-(-n // page), device=dev)[None]
    positions, meta = AttentionMetadata.for_batch(
        torch.zeros(1, dtype=torch.int64, device=dev), torch.tensor([n], device=dev),
        block_table, page, n, n)
    scored = ScoredQueries(0, n - queries, queries, n - queries, n)
    meta.scored = (scored,)
    runner.model(torch.tensor(ids, device=dev), positions, runner.kv_layers, meta)
    scores = torch.stack(scored.scores).float()  # [layers, kv_heads, n]
    return (scores[..., needle.start:needle.stop].sum(-1) / scores.sum(-1)).cpu().numpy()


def score_heads(llm: LLM, length: int, prompts: int, queries: int, seed: int) -> np.ndarray:
    """Each KV head's needle share, averaged over `prompts` passkey prompts."""
    rng = random.Random(seed)
    shares = []
    for depth in np.linspace(0.05, 0.95, prompts):
        key = rng.randrange(10000, 100000)
        answer = llm.tokenizer.encode(f" {key}.")
        ids, needle = passkey_prompt(llm, length - len(answer), depth, key)
        shares.append(needle_attention(llm, ids + answer, needle, queries + len(answer)))
    return np.mean(shares, 0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    llm = LLM(model=args.model, device=args.device, dtype=args.dtype, enforce_eager=True,
              max_model_len=args.length, max_num_batched_tokens=args.length)
    scores = score_heads(llm, args.length, args.prompts, args.queries, args.seed)
    count = round(scores.size * args.streaming_fraction)
    order = np.argsort(scores, axis=None)[:count]
    streaming = list(zip(*np.unravel_index(order, scores.shape)))
    write_head_config(args.out, args.sinks, args.window, streaming, scores)
    kept = np.sort(scores, axis=None)
    print(f"{count} of {scores.size} KV heads stream (sinks {args.sinks}, window "
          f"{args.window}); attention share on the needle: streaming heads <= "
          f"{kept[count - 1]:.3f}, full-context heads >= {kept[count]:.3f}, max {kept[-1]:.3f} "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
