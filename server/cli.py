"""`tessera serve` and `tessera bench serve|throughput|kernels|perplexity`.

Benchmarks are imported only when asked for, so `serve` never pays for their imports.
"""
import argparse
import importlib
import sys

_BENCHES = {
    "serve": "server.bench_serve",
    "throughput": "engine.bench_throughput",
    "kernels": "engine.bench_kernels",
    "perplexity": "engine.bench_perplexity",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="start the OpenAI-compatible server", add_help=False)
    bench = commands.add_parser("bench", help="run a benchmark", add_help=False)
    bench.add_argument("which", choices=sorted(_BENCHES))
    if argv[:1] == ["serve"]:
        from server.api import serve
        serve(argv[1:])
    elif argv[:1] == ["bench"] and len(argv) > 1 and argv[1] in _BENCHES:
        importlib.import_module(_BENCHES[argv[1]]).main(argv[2:])
    else:
        parser.parse_args(argv)  # prints usage or the error and exits


if __name__ == "__main__":
    main()
