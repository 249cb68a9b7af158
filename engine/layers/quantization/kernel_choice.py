"""Which CPU kernel runs a quantized linear at a step's token count: measured, not guessed.

The winner depends on the CPU (AMX, AVX-512 VNNI or AVX2 only), the thread count and the shape:
a 4-bit matrix-vector kernel reads the fewest bytes, which is what bounds one decoding request,
and integer GEMMs on int8 activations win once a step has enough tokens to be compute bound.
So each layer shape's candidates are timed at 1, 2, 4, ... `MAX_MEASURED_TOKENS` tokens on the
layer's own packed weights, once per machine, and a plan switches kernels only at the bounds of
`TOKEN_CLASSES`: the kernel with the least time summed over a class's sizes runs all of it. A
compiled CPU decode step takes a graph per class it meets (cpu_compile), and each graph kept
~40 MB resident (SmolLM2 on two Zen 4 cores), more than a switch inside a class gains: there,
switching at 4, 8 and 64 tokens rather than wherever a power of two's winner changed, 16- and
64-row decode steps took 35.9 and 86 ms rather than 35.5 and 94, with two graphs fewer. The
winners are cached in `$TESSERA_CACHE_DIR/cpu_kernels.json` (default `~/.cache/tessera`)
under a key naming the CPU model and its flags, torch's CPU capability (which
`ATEN_CPU_CAPABILITY` lowers), `ONEDNN_MAX_CPU_ISA`, the thread count and torch's version; a
lock makes processes that start together share one measurement, so they also compute alike.
"""
import fcntl
import functools
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import kernels

logger = logging.getLogger(__name__)

Kernel = Callable[[torch.Tensor], torch.Tensor]

# Part of the cache key: bump it when a kernel or the way it is timed changes.
MEASUREMENT_VERSION = 11
# The token counts a plan may switch kernels at: one request, the rows decode attention runs
# through SDPA (kernels.reference.SDPA_MAX_ROWS), then powers of eight.
TOKEN_CLASSES = (1, 4, 8, 64, 512)
MAX_MEASURED_TOKENS = TOKEN_CLASSES[-1]  # larger steps use the last class's kernel
_REPEATS = 5
# From this many tokens on, a candidate `_GIVE_UP` times slower than the best is no longer
# timed (kernels only fall further behind with size; W8A16 at 512 tokens on AVX2 took minutes)
_PRUNE_FROM = 32
_GIVE_UP = 3.0
_TOLERANCE = 0.05  # int4 or int8 weights, bf16 or int8 activations: ~1-2% of the output


@dataclass
class KernelPlan:
    """`bounds[i]` is the most tokens `kernels[i]` runs; the last one runs every larger step."""
    names: list[str]
    bounds: list[int]
    kernels: list[Kernel]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels[self._index(x.shape[0])](x)

    def name_at(self, m: int) -> str:
        """The kernel that runs a step of `m` tokens."""
        return self.names[self._index(m)]

    def _index(self, m: int) -> int:
        for i, bound in enumerate(self.bounds):
            if m <= bound:
                return i
        return len(self.bounds) - 1

    def describe(self) -> str:
        parts = [f"{name} up to {bound}" for name, bound in zip(self.names, self.bounds)]
        return ", ".join(parts[:-1] + [f"{self.names[-1]} above"] if len(parts) > 1
                         else [self.names[0]])


def cache_dir() -> Path:
    return Path(os.environ.get("TESSERA_CACHE_DIR", Path.home() / ".cache" / "tessera"))


def machine_key() -> str:
    """The CPU model and a digest of its flags (VMs name CPUs vaguely: "AMD EPYC"), torch's
    and oneDNN's instruction-set caps, threads, torch's and the measurement's versions."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {key.strip(): value.strip() for key, value in
              (line.split(":", 1) for line in info.splitlines()[:40] if ":" in line)}
    cpu = fields.get("model name", "unknown cpu")
    flags = hashlib.sha256(fields.get("flags", "").encode()).hexdigest()[:8]
    return (f"{cpu} (flags {flags}) | {torch.backends.cpu.get_cpu_capability()} | onednn "
            f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'all')} | {torch.get_num_threads()} threads | "
            f"torch {torch.__version__} | v{MEASUREMENT_VERSION}")


# Plans already measured or read in this process, by candidates, shape and dtype.
_PLANS: dict[str, tuple[list[str], list[int]]] = {}


def plan_kernels(layers: list[dict[str, Kernel]], reference: Kernel, out_features: int,
                 in_features: int, dtype: torch.dtype,
                 fits: Callable[[frozenset[str]], bool] = lambda names: True
                 ) -> list[KernelPlan]:
    """One plan per layer of one shape: the fastest of its candidates (name -> `x[M, K] ->
    y[M, N]`) per token count. They are timed over all the `layers` in turn, as a forward pass
    meets them: one weight alone would stay in cache and flatter the kernels that read more
    bytes. Only candidates whose output matches `reference` (a float matmul of the first
    layer's weight) are timed: a kernel can be wrong on some CPUs (oneDNN's int8 GEMM capped at
    AVX2 is), and is then never chosen. A plan's set of kernels must `fit` (the memory they
    hold): the fastest plan that does is taken."""
    key = f"{'+'.join(sorted(layers[0]))} {out_features}x{in_features} {dtype}"
    if key not in _PLANS:
        _PLANS[key] = _cached(key, lambda: _measure(layers, reference, in_features, dtype, fits))
    names, bounds = _PLANS[key]
    return [KernelPlan(names, bounds, [candidates[n] for n in names]) for candidates in layers]


def chosen_plans() -> dict[str, str]:
    """What this process chose, per candidates/shape/dtype, for logs and benchmarks."""
    return {key: KernelPlan(names, bounds, []).describe()
            for key, (names, bounds) in _PLANS.items()}


def _cached(key: str, measure: Callable[[], tuple[list[str], list[int]]]
            ) -> tuple[list[str], list[int]]:
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path, machine = directory / "cpu_kernels.json", machine_key()
    with open(directory / "cpu_kernels.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            table = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            table = {}  # a damaged cache is measured again
        if (hit := table.get(machine, {}).get(key)) is not None:
            return hit
        start = time.monotonic()
        names, bounds = measure()
        logger.info("CPU kernels for %s measured in %.1f s: %s", key,
                    time.monotonic() - start, KernelPlan(names, bounds, []).describe())
        table.setdefault(machine, {})[key] = [names, bounds]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
        return names, bounds


def _measure(layers: list[dict[str, Kernel]], reference: Kernel, in_features: int,
             dtype: torch.dtype, fits: Callable[[frozenset[str]], bool]
             ) -> tuple[list[str], list[int]]:
    alive = _correct(layers[0], reference, in_features, dtype)
    times: dict[int, dict[str, float]] = {}
    m = 1
    while m <= MAX_MEASURED_TOKENS:
        x = torch.randn(m, in_features).to(dtype)
        times[m] = {name: _time([candidates[name] for candidates in layers], x)
                    for name in alive}
        best = min(times[m].values())
        if m >= _PRUNE_FROM:  # far behind at a size where times are long enough to trust
            alive = {n: k for n, k in alive.items() if times[m][n] <= _GIVE_UP * best}
        m *= 2
    # The fastest plan that fits, over every set of candidates left out (a few dozen)
    names = sorted(times[1])
    plans = [_plan(times, frozenset(out)) for r in range(len(names))
             for out in itertools.combinations(names, r)]
    fitting = [plan for plan in plans if plan is not None and fits(frozenset(plan[0]))]
    if not fitting:
        raise RuntimeError(f"no plan of {', '.join(names)} holds few enough bytes")
    names, bounds, _ = min(fitting, key=lambda plan: plan[2])
    return names, bounds


def _plan(times: dict[int, dict[str, float]], excluded: frozenset[str]
          ) -> tuple[list[str], list[int], float] | None:
    """Per token class, the kernel (not in `excluded`) with the least time summed over the
    class's sizes: the plan's kernels, their bounds, and how much slower than each class's
    best kernel the plan runs, summed over the classes (each counts alike: a decode step's few
    rows as much as a prefill's 512, whose times are far longer); None where a class has no
    kernel left."""
    names: list[str] = []
    bounds: list[int] = []
    slowdown = 0.0
    for low, high in zip((0,) + TOKEN_CLASSES, TOKEN_CLASSES):
        sizes = [size for size in times if low < size <= high]
        # those timed at a class's last size were timed at all of it
        cost = {name: sum(times[size][name] for size in sizes) for name in times[sizes[-1]]}
        allowed = [name for name in cost if name not in excluded]
        if not allowed:
            return None
        best = min(allowed, key=cost.__getitem__)
        slowdown += cost[best] / min(cost.values())
        if names and names[-1] == best:
            bounds[-1] = high
        else:
            names.append(best)
            bounds.append(high)
    return names, bounds, slowdown


@torch.inference_mode()
def _correct(candidates: dict[str, Kernel],
             reference: Kernel, in_features: int,
             dtype: torch.dtype) -> dict[str, Kernel]:
    """The candidates within `_TOLERANCE` of the reference (relative to its largest output)."""
    x = torch.randn(16, in_features).to(dtype)
    expected = reference(x).float()
    bound = _TOLERANCE * expected.abs().max()
    correct = {}
    for name, kernel in candidates.items():
        error = (kernel(x).float() - expected).abs().max()
        if error <= bound:
            correct[name] = kernel
        else:
            logger.warning("CPU kernel %s is wrong on this machine (error %.3g, bound %.3g): "
                           "not used", name, error, bound)
    if not correct:
        raise RuntimeError(f"no kernel of {', '.join(candidates)} is correct on this CPU")
    return correct


@torch.inference_mode()
def _time(kernels: list[Kernel], x: torch.Tensor) -> float:
    """The shortest of `_REPEATS` times of running `x` through every kernel in turn (after one
    to warm up): on a shared machine, interference only ever adds time."""
    samples = []
    for _ in range(_REPEATS + 1):
        start = time.perf_counter()
        for kernel in kernels:
            kernel(x)
        samples.append(time.perf_counter() - start)
    return min(samples[1:])


@functools.cache
def int8_weight_code_max() -> int:
    """The largest int8 weight code: 127, or 64 where `torch._int_mm` sums exactly only up to
    it. oneDNN without VNNI (AVX2) adds 128 to the int8 activations and adds pairs of u8 x s8
    products in int16 (`vpmaddubsw`), which saturates past 2 x 255 x 64; weights kept within
    +-64 keep every sum exact, so W8A8 runs there too, at twice the weight's rounding step.
    Mixture-of-experts weights use this range; dense linears `linear_int8_code_max`."""
    for code_max in (127, 64):
        if _integer_gemm_is_exact(code_max):
            logger.info("int8 GEMM (torch._int_mm) is exact on this CPU for weight codes up to "
                        "+-%d: int8 weights use that range", code_max)
            return code_max
    logger.warning("int8 GEMM (torch._int_mm) is inexact on this CPU: W8A8 is not used")
    return 127


@functools.cache
def linear_int8_code_max() -> int:
    """The largest int8 weight code of a dense linear: `int8_weight_code_max`, or 64 where
    fbgemm's GEMM sums exactly only up to there. That is a CPU without VNNI (AVX2: u8 x s8
    pairs added in int16), where fbgemm is a linear's one fast integer GEMM: ~80 GOP/s on two
    Zen 2 cores against `torch._int_mm`'s 4 (oneDNN's reference path). The cost, SmolLM2
    perplexity on GPL-3: +0.41% over dense fp32 rather than +0.25%. Experts keep
    `int8_weight_code_max` (no fbgemm kernel runs them): +-64 moved a random tiny MoE's
    greedy tokens past tests/test_gguf_families.py's margin."""
    code_max = int8_weight_code_max()
    if (kernels.fbgemm_int8_available() and not _fbgemm_gemm_is_exact(code_max)
            and _fbgemm_gemm_is_exact(64)):
        logger.info("fbgemm's int8 GEMM is exact on this CPU for weight codes up to +-64: "
                    "dense int8 linears use that range")
        return 64
    return code_max


def integer_gemm_is_exact() -> bool:
    """Whether `torch._int_mm` is exact for weights within `int8_weight_code_max`. For int8
    layers whose kernel is not measured per shape (mixture-of-experts layers)."""
    return _integer_gemm_is_exact(int8_weight_code_max())


def fbgemm_gemm_is_exact(code_max: int) -> bool:
    """Whether torch has fbgemm's int8 GEMM and it is exact for weights within `+-code_max`
    (the int8 linears' third candidate, `kernels.fbgemm_int8_linear`)."""
    return kernels.fbgemm_int8_available() and _fbgemm_gemm_is_exact(code_max)


@functools.cache
def _integer_gemm_is_exact(code_max: int) -> bool:
    a, b = _random_codes(code_max)
    return torch.equal(torch._int_mm(a, b.t()), a.int() @ b.int().t())


@functools.cache
def _fbgemm_gemm_is_exact(code_max: int) -> bool:
    """Every row holds 0 and 255, so its activations quantize to themselves: the output is
    the integer sums up to fp32 rounding (saturated sums are off by thousands)."""
    a, b = _random_codes(code_max)
    x = kernels.shift_to_uint8(a).float()
    x[:, :2] = torch.tensor([0.0, 255.0])
    products = kernels.fbgemm_int8_linear(x, kernels.pack_int8_fbgemm(b, torch.ones(len(b))))
    return bool(((products - x @ b.float().t()).abs() < 0.5).all())


@functools.cache
def packed_int8_gemm_is_exact() -> bool:
    """Whether oneDNN's matmul on packed int8 weights (`kernels.pack_int8`, the CPU's W8A8
    experts) is there and exact for weights within `int8_weight_code_max`."""
    if not torch.backends.mkldnn.is_available():
        return False
    a, b = _random_codes(int8_weight_code_max())
    products = kernels.packed_int8_gemm(kernels.shift_to_uint8(a), kernels.pack_int8(b),
                                        torch.ones(b.shape[0]))
    return torch.equal(products, (a.int() @ b.int().t()).float())


# The rows each expert gets in a decode step of 32 requests routed to 2 of 8 experts (Mixtral's
# and the Qwen3-MoE benchmark's routing): few enough that the weights' bytes bound the step.
EXPERT_DECODE_ROWS = 8


def packed_if_faster(weights: torch.Tensor, scales: torch.Tensor) -> list[torch.Tensor] | None:
    """The experts `weights[E, N, K]` (fp32 `scales[E, N]`) packed for oneDNN's matmul
    (`kernels.pack_int8`), if it beats `torch._int_mm` on the stacked ones at
    `EXPERT_DECODE_ROWS` rows: the two W8A8 kernels timed as `plan_kernels` times a layer's
    candidates, over these experts. On two Zen 4 cores packed experts read twice as fast; with
    oneDNN capped at AVX2, half as fast."""
    packed = [kernels.pack_int8(w) for w in weights]
    experts = [{"w8a8": functools.partial(kernels.int8_linear, weight=w, scales=s),
                "w8a8-packed": functools.partial(kernels.packed_int8_linear, packed=p,
                                                 w_scale=s)}
               for w, p, s in zip(weights, packed, scales)]

    def reference(x: torch.Tensor) -> torch.Tensor:
        return x.float() @ (weights[0].float() * scales[0][:, None]).t()

    plan = plan_kernels(experts, reference, *weights.shape[1:], torch.bfloat16)[0]
    return packed if plan.name_at(EXPERT_DECODE_ROWS) == "w8a8-packed" else None


def _random_codes(code_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 activations `[16, 256]` and weights `[64, 256]` within `+-code_max`."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (16, 256), dtype=torch.int8, generator=gen)
    b = torch.randint(-code_max, code_max + 1, (64, 256), dtype=torch.int8, generator=gen)
    return a, b
