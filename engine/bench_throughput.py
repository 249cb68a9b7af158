"""`tessera bench throughput`: offline generation speed, Tessera beside transformers `generate`.

Both run in the same process on the same weights and synthetic prompts of exactly
`--input-len` tokens, each producing exactly `--output-len` tokens (EOS ignored): a batch of
`--num-prompts`, then a single request. transformers runs batched with left padding in its
fastest dtype on this machine (the same choice Tessera makes unless `--dtype` is given).
"""
import argparse
import json
import time

import torch

from engine import LLM, SamplingParams
from engine.model_runner import resolve_dtype


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tessera bench throughput", description=__doc__)
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default SmolLM2)")
    p.add_argument("--load-format", default="auto", choices=["auto", "gguf", "hf", "dummy"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default=None, choices=["q4"],
                   help="q4: GGUF 4-bit linears packed for few-token steps (CPU, bf16)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers runs")
    p.add_argument("--json", action="store_true", help="print one JSON line of results")
    return p.parse_args(argv)


def synthetic_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 32000), (n, length), generator=gen).tolist()


def run_tessera(llm: LLM, prompts: list[list[int]], output_len: int) -> float:
    """Output tokens per second over the whole batch, end to end."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
    return len(prompts) * output_len / elapsed


def load_transformers(args, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.tokenizer import resolve_model_path

    path = resolve_model_path(args.model)
    if args.load_format == "dummy":
        config = AutoConfig.from_pretrained(str(path if path.is_dir() else path.parent))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    elif path.is_file():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(args.device).eval()


@torch.inference_mode()
def run_transformers(model, prompts: list[list[int]], output_len: int, device: str) -> float:
    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding is needed
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=output_len, min_new_tokens=output_len,
                         eos_token_id=None, pad_token_id=0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert out.shape[1] == len(prompts[0]) + output_len
    return len(prompts) * output_len / elapsed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = resolve_dtype(args.dtype, args.device)
    llm = LLM(model=args.model, load_format=args.load_format, device=args.device,
              dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.input_len + args.output_len + 1,
              quantization=args.quantization)
    vocab = llm.engine.runner.arch.vocab_size
    prompts = synthetic_prompts(args.num_prompts, args.input_len, vocab)
    run_tessera(llm, prompts[:2], 4)  # warm-up
    results = {"device": args.device, "dtype": str(dtype).removeprefix("torch."),
               "quantization": args.quantization,
               "threads": torch.get_num_threads(), "num_prompts": args.num_prompts,
               "input_len": args.input_len, "output_len": args.output_len,
               "tessera_batch_tok_s": run_tessera(llm, prompts, args.output_len),
               "tessera_single_tok_s": run_tessera(llm, prompts[:1], args.output_len)}
    del llm
    if not args.no_transformers:
        model = load_transformers(args, dtype)
        run_transformers(model, prompts[:2], 4, args.device)  # warm-up
        results["transformers_batch_tok_s"] = run_transformers(model, prompts, args.output_len,
                                                               args.device)
        results["transformers_single_tok_s"] = run_transformers(model, prompts[:1],
                                                                args.output_len, args.device)
        results["batch_ratio"] = (results["tessera_batch_tok_s"]
                                  / results["transformers_batch_tok_s"])
        results["single_ratio"] = (results["tessera_single_tok_s"]
                                   / results["transformers_single_tok_s"])
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{args.device} {results['dtype']}{' q4' if args.quantization else ''}, "
          f"{results['threads']} threads, "
          f"{args.num_prompts} prompts x {args.input_len} tokens -> {args.output_len} tokens")
    print(f"{'':14}{'batch tok/s':>14}{'single tok/s':>14}")
    print(f"{'tessera':14}{results['tessera_batch_tok_s']:14.1f}"
          f"{results['tessera_single_tok_s']:14.1f}")
    if not args.no_transformers:
        print(f"{'transformers':14}{results['transformers_batch_tok_s']:14.1f}"
              f"{results['transformers_single_tok_s']:14.1f}")
        print(f"{'ratio':14}{results['batch_ratio']:14.2f}x{results['single_ratio']:13.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
