"""`tessera bench tensor-parallel`: the decode step under each tensor-parallel size, and the
share of it that rank 0 spends in collectives (torch.profiler), in the same run.

For each size the offline engine takes `--batch` requests of `--context` prompt tokens, runs
their prompts, then times `--steps` decode steps (`EngineCore.step`, scheduler included; the
median is printed) and profiles as many more on rank 0: the collectives' share is the summed
wall time of rank 0's all-reduce and all-gather calls, waiting for the other ranks included,
over the steps' wall time. On a CPU, ranks
split the cores (`cores / size` threads each), so the figure is overhead, not speed.
"""
import argparse
import json
import statistics
import time

from torch.profiler import ProfilerActivity, profile

from engine.cpu_info import reported_cpu_flags
from engine.llm import LLM
from engine.messages import AddRequest
from engine.parallel import COLLECTIVE
from engine.sampling_params import SamplingParams


def _decode_steps(llm: LLM, args: argparse.Namespace) -> dict:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=2 * args.steps + 2, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(AddRequest(f"b{i}", [(7 * i + t) % 1000 + 10
                                                for t in range(args.context)], params, 0.0))
    while any(r.num_computed_tokens < r.num_prompt_tokens
              for r in engine.scheduler.requests.values()):
        engine.step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall = time.perf_counter() - start
    collective_us = sum(e.cpu_time_total for e in prof.key_averages() if e.key == COLLECTIVE)
    while engine.has_unfinished():
        engine.step()
    return {"decode_step_ms": round(1e3 * statistics.median(times), 2),
            "collective_share": round(collective_us / 1e6 / wall, 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tessera bench tensor-parallel",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: bundled SmolLM2-135M")
    parser.add_argument("--load-format", default="auto", help="dummy: random weights from an "
                        "HF config directory")
    parser.add_argument("--sizes", default="1,3", help="tensor-parallel sizes (default 1,3)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, quantization=args.quantization,
                  enforce_eager=True, max_model_len=args.context + 2 * args.steps + 8,
                  tensor_parallel_size=size)
        try:
            row = {"tensor_parallel_size": size, **_decode_steps(llm, args),
                   "weight_bytes_per_rank": llm.engine.executor.weight_bytes}
        finally:
            llm.engine.executor.shutdown()
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["decode_step_ms"]
    print(json.dumps({"cpu_flags": reported_cpu_flags(), "batch": args.batch,
                      "context": args.context, "dtype": args.dtype,
                      "step_vs_first": [round(r["decode_step_ms"] / base, 2) for r in rows]}))


if __name__ == "__main__":
    main()
