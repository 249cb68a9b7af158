"""The GPU check's closing table: every target figure, its target, the ratio; summary.jsonl.

    python tests/gpu/summary.py OUT_DIR [--dry-run]

Reads what tests/gpu/check.sh left in OUT_DIR (stages.jsonl, env.jsonl, tests.xml,
kernels.jsonl, throughput.jsonl). Exits 1 when a stage failed or was cut at its budget, so a
rerun with `--only` knows what to retry; a missed target is reported, not an error.
"""
import json
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Target:
    figure: str
    source: str  # "kernels:<row id>" or "throughput"
    key: str
    target: float
    at_least: bool = True  # False: the figure must stay at or under the target

    def ratio(self, value: float) -> float:
        return value / self.target if self.at_least else self.target / value


TARGETS = [
    Target("decode attention 64 x 4k, share of copy bandwidth", "kernels:decode_64x4k",
           "fraction_of_bandwidth", 0.80),
    Target("decode attention 64 x 4k on int8 KV pages, share of copy bandwidth",
           "kernels:decode_64x4k_int8", "fraction_of_bandwidth", 0.75),
    Target("decode attention 1 x 32k, speed vs SDPA", "kernels:decode_1x32k",
           "speedup_vs_torch", 1.0),
    Target("prefill attention 2k, speed vs SDPA", "kernels:prefill_2k", "speedup_vs_torch", 0.70),
    Target("prefill attention 8k, speed vs SDPA", "kernels:prefill_8k", "speedup_vs_torch", 0.70),
    Target("batch-1 decode step, share of roofline", "throughput",
           "single_decode_fraction_of_bound", 0.80),
    Target("offline 512x512->128, vs transformers", "throughput", "batch_ratio", 1.5),
    Target("offline 512x512->128, share of bound", "throughput", "batch_fraction_of_bound", 0.75),
    Target("decode CUDA graph capture, seconds", "throughput", "graph_capture_s", 30.0,
           at_least=False),
    # Llama-3-8B's gate|up projection (4096 -> 28672), the largest weight read of a step.
    Target("W4A16 GEMM M=1, speed vs cuBLAS bf16", "kernels:w4a16_gate_up_m1",
           "speedup_vs_torch", 2.5),
    Target("W4A16 GEMM M=16, speed vs cuBLAS bf16", "kernels:w4a16_gate_up_m16",
           "speedup_vs_torch", 2.5),
    Target("W4A16 GEMM M=16, share of weight-bytes roofline", "kernels:w4a16_gate_up_m16",
           "fraction_of_bandwidth", 0.75),
    Target("W8A8 GEMM M=2048, speed vs cuBLAS bf16", "kernels:w8a8_gate_up_prefill_2k",
           "speedup_vs_torch", 1.4),
]
CONTEXT = [("copy bandwidth, GB/s", "kernels:ceilings", "copy_gb_s"),
           ("matmul, TFLOP/s", "kernels:ceilings", "matmul_tflops"),
           ("offline output tok/s", "throughput", "tessera_batch_tok_s"),
           ("offline bound, output tok/s", "throughput", "bound_tok_s"),
           ("batch-1 decode tok/s", "throughput", "single_decode_tok_s")]


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def load_sources(out: Path) -> dict[str, dict]:
    sources = {f"kernels:{row['row']}": row for row in _jsonl(out / "kernels.jsonl")}
    for row in _jsonl(out / "throughput.jsonl"):
        sources["throughput"] = row
    return sources


def tests_outcome(out: Path) -> dict:
    path = out / "tests.xml"
    if not path.exists():
        return {}
    cases = ET.parse(path).getroot().iter("testcase")
    counts, failed = {"passed": 0, "failed": 0, "skipped": 0}, []
    for case in cases:
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failed.append(f"{case.get('classname')}::{case.get('name')}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts | {"failures": failed}


def main(argv: list[str]) -> int:
    out, dry = Path(argv[0]), "--dry-run" in argv[1:]
    sources, stages = load_sources(out), _jsonl(out / "stages.jsonl")
    env = (_jsonl(out / "env.jsonl") or [{}])[0]
    rows = []
    for t in TARGETS:
        value = sources.get(t.source, {}).get(t.key)
        rows.append({"figure": t.figure, "source": t.source, "key": t.key, "value": value,
                     "target": t.target, "at_least": t.at_least,
                     "ratio": t.ratio(value) if value else None,
                     "met": (t.ratio(value) >= 1) if value else None})
    with open(out / "summary.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

    print(f"GPU check on {env.get('gpu') or 'CPU'}: python {env.get('python')}, torch "
          f"{env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}"
          + ("  [DRY RUN: tiny shapes on CPU, the figures measure nothing]" if dry else ""))
    for s in stages:
        print(f"  stage {s['stage']:11} {s['status']:8} {s['seconds']:>4} s  {s['note']}")
    tests = tests_outcome(out)
    if tests:
        print(f"  tests: {tests['passed']} passed, {tests['failed']} failed, "
              f"{tests['skipped']} skipped")
        for name in tests["failures"]:
            print(f"    FAILED {name}")
    print(f"{'figure':52} {'value':>10} {'target':>8} {'ratio':>7}")
    for row in rows:
        value, sign = row["value"], ">=" if row["at_least"] else "<="
        shown = f"{value:10.3g}" if value is not None else f"{'n/a':>10}"
        verdict = "" if row["met"] is None else ("ok" if row["met"] else "MISS")
        ratio = f"{row['ratio']:7.2f}" if row["ratio"] is not None else f"{'':7}"
        print(f"{row['figure']:52} {shown} {sign}{row['target']:6g} {ratio} {verdict}")
    for name, source, key in CONTEXT:
        value = sources.get(source, {}).get(key)
        if value is not None:
            print(f"{name:52} {value:10.4g}")
    return 1 if any(s["status"] in ("failed", "skipped") and s["stage"] != "wheels"
                    for s in stages) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
