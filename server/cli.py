"""`tessera serve`, `tessera quantize`, `tessera calibrate heads` and `tessera bench
serve|throughput|kernels|perplexity|kv-quality|kv-transfer|tensor-parallel|fuzz|soak|faults`.

`serve` checks its flags and the model path before it imports the HTTP stack, so a usage
error comes at once; benchmarks are imported only when asked for.
"""
import argparse
import importlib
import sys

from server import __version__

_BENCHES = {
    "serve": "server.bench_serve",
    "throughput": "engine.bench_throughput",
    "kernels": "engine.bench_kernels",
    "perplexity": "engine.bench_perplexity",
    "kv-quality": "engine.bench_kv_quality",
    "kv-transfer": "engine.bench_kv_transfer",
    "tensor-parallel": "engine.bench_tensor_parallel",
    "fuzz": "server.bench_fuzz",
    "soak": "server.bench_soak",
    "faults": "server.bench_faults",
}
_BENCH_HELP = """benchmarks (each has its own --help):
  serve       load a running OpenAI-compatible server: TTFT, TPOT, ITL, E2E, output tok/s
  throughput  offline engine beside transformers `generate` on the same weights and prompts
  kernels     the Triton kernels against the GPU's copy bandwidth, matmul peak and torch
  perplexity  perplexity of a long text, windowed (optionally beside transformers)
  kv-quality  each KV page format and eviction policy beside auto: perplexity, passkey,
              bytes/token, decode step
  kv-transfer a request's KV pages handed to another engine process on this host, against
              the machine's memcpy bandwidth
  tensor-parallel  the decode step at each tensor-parallel size and rank 0's share of it
              in collectives (torch.profiler)
  fuzz        schemathesis over the server's /openapi.json: no 5xx, only OpenAI error objects
  soak        thousands of streams dropped after their first chunks: pages freed, RSS per 1,000
  faults      /health latency under a 5 MB tokenization and 600 calls; a SIGKILLed engine's
              recovery, against the limits"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tessera {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="start the OpenAI-compatible server", add_help=False)
    commands.add_parser("quantize", help="write a compressed-tensors checkpoint (w8a8, w4a16, "
                        "fp8) of a model", add_help=False)
    calibrate = commands.add_parser("calibrate", help="write a head config for "
                                    "--kv-head-config (calibrate heads --help)")
    calibrate.add_argument("what", choices=["heads"])
    bench = commands.add_parser("bench", help="run a benchmark", epilog=_BENCH_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("which", choices=sorted(_BENCHES))
    if argv[:1] == ["serve"]:
        from server.config import parse_serve_args

        engine_config, settings = parse_serve_args(argv[1:])
        from server.api import serve
        serve(engine_config, settings)
    elif argv[:1] == ["quantize"]:
        from engine.quantize import main as quantize
        quantize(argv[1:])
    elif argv[:2] == ["calibrate", "heads"]:
        from engine.calibrate_heads import main as calibrate_heads
        calibrate_heads(argv[2:])
    elif argv[:1] == ["bench"] and len(argv) > 1 and argv[1] in _BENCHES:
        importlib.import_module(_BENCHES[argv[1]]).main(argv[2:])
    else:
        parser.parse_args(argv)  # prints help, the version, usage or the error, and exits


if __name__ == "__main__":
    main()
