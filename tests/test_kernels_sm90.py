"""Every Triton kernel compiles for Hopper (sm_90) down to a cubin, on a CPU-only machine.

tests/test_kernels.py checks the kernels' numbers under the Triton interpreter, which never
runs Triton's compiler: errors only the compiler sees (a loop-carried value changing type, a
failure lowering to LLVM IR or in ptxas, shared memory beyond what an H100 block may have)
pass there and would first show on a GPU. This test runs the real pipeline (TTIR -> TTGIR ->
LLVM IR -> PTX -> cubin, with the ptxas bundled in the triton wheel) for
`GPUTarget("cuda", 90, 32)`; it needs no GPU or CUDA driver.

The launch configurations are not written here by hand. A subprocess (this file run as a
script, without TRITON_INTERPRET, so `triton.jit` gives real `JITFunction`s whatever
tests/test_kernels.py set in this process's environment) replaces every jit function of
`MODULES` with a recorder, calls the public wrappers with CPU tensors of the shapes and
dtypes the engine passes them (`SCENARIOS`; int64 metadata, page size 16, an fp32 rope
table), and feeds each recorded launch (args, constexpr kwargs, num_warps / num_stages)
through Triton's own launch binder with an sm_90 backend (`create_function_from_signature`
and `JITFunction._pack_args`, private: a Triton upgrade that moves them breaks this test
loudly, not silently). So each kernel is compiled with the signature, constexprs and
specialization (16-divisible ints and pointers get `tt.divisibility`) that launching those
tensors on an H100 would compile. The values are the small CPU tensors' own: a real engine
tensor whose stride or address is not 16-divisible specializes differently, which changes
vectorization, not what the kernel is made of. Identical configurations compile once, in
parallel worker processes.

Each configuration must give a cubin whose shared memory (`metadata.shared`, what a launch
requests) fits Hopper's 227 KiB per block; `pytest -s` prints it per configuration. Every jit
function of the modules must be launched by some scenario or called by a launched
kernel, so a new kernel cannot go untested. The compile cache is a fresh temporary
directory: nothing is reused between runs.
"""
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOPPER_SMEM_PER_BLOCK = 227 * 1024  # opt-in maximum of dynamic shared memory per block, sm_90

# (name, hidden, heads, kv heads, head dim, intermediate) of the engine's Llama-family models:
# GQA groups 3, 4, 1, 8 and head dims 64 and 128.
SMOLLM2 = ("smollm2-135m", 576, 9, 3, 64, 1536)
LLAMA3_8B = ("llama3-8b", 4096, 32, 8, 128, 14336)
LLAMA2_7B = ("llama2-7b", 4096, 32, 32, 128, 11008)
TINYLLAMA = ("tinyllama-1.1b", 2048, 32, 4, 64, 5632)
# (model, activation dtype, KV cache dtype: a torch dtype or a `kv_format` name). bf16, the GPU
# dtype, for every model; fp16 once; an fp32 model (kv_cache_dtype "auto") and a bf16 model
# with a "float32" KV cache, whose fp32 attention takes the ieee-precision dot path: bf16
# queries cast to the cache dtype, and at head dim 128 the largest shared-memory footprint.
# Every quantized KV format with bf16 activations (int4 at head dim 128 too: two scale groups
# per head), and int8 under an fp32 model (dequantized to fp32, ieee dots). Not the whole cross
# product: each fp32-dot attention kernel takes 5-10 s to compile, and the group size only
# changes index arithmetic.
SCENARIOS = [
    *[(m, "bfloat16", "bfloat16") for m in (SMOLLM2, LLAMA3_8B, LLAMA2_7B, TINYLLAMA)],
    (LLAMA3_8B, "float16", "float16"),
    (SMOLLM2, "float32", "float32"),
    (LLAMA3_8B, "bfloat16", "float32"),
    *[(SMOLLM2, "bfloat16", fmt) for fmt in ("int8", "fp8", "int4")],
    (LLAMA3_8B, "bfloat16", "int4"),
    (SMOLLM2, "float32", "int8"),
]
# Quantized linears (model, activation dtype) at the model's linear shapes (qkv, o, gate_up,
# down): decode batches of 1 and 16 (16-row tiles, split K) and a 2048-token prefill. W4A16
# symmetric in groups of 128 at decode, with zero points at prefill, and in groups of 32 (the
# smallest K tile) once; W8A8 split and unsplit; the fused RMSNorm quantizer with and without
# a residual. Sizes are not specialized on (the batch) or 16-divisible at every shape, so the
# four shapes share each compile.
QUANT_SCENARIOS = [(LLAMA3_8B, "bfloat16")]
PAGE_SIZE = 16
MAX_MODEL_LEN = 8192  # decode sizes its split grid by max_model_len (see engine/cuda_graphs.py)
MODULES = ["kernels.triton_attention", "kernels.triton_ops", "kernels.triton_moe",
           "kernels.triton_quant"]


# --------------------------------------------------------------------------- subprocess side


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def _run_wrappers(ta, ops, moe, model, act_name, cache_name):
    """Call every wrapper the way one prefill step and one decode step of `model` do."""
    import torch

    from kernels import kv_format

    _, hidden, heads, kv_heads, head_dim, inter = model
    act = getattr(torch, act_name)
    i64 = torch.int64
    # Two requests: one with 5 cached tokens and an 11-token chunk, one new 7-token prompt.
    num_tokens, num_pages = 18, 8
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=act)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.reshape(-1, heads, head_dim)
    k = k.reshape(-1, kv_heads, head_dim)
    v = v.reshape(-1, kv_heads, head_dim)
    if cache_name in kv_format.FORMATS:
        k_cache, v_cache = (kv_format.allocate(kv_format.FORMATS[cache_name],
                                               (num_pages, PAGE_SIZE, kv_heads), head_dim, "cpu")
                            for _ in range(2))
    else:
        k_cache, v_cache = (torch.zeros(num_pages, PAGE_SIZE, kv_heads, head_dim,
                                        dtype=getattr(torch, cache_name)) for _ in range(2))
    block_table = torch.tensor([[3, 1, 0], [2, 0, 0]], dtype=i64)
    positions = torch.cat([torch.arange(5, 16), torch.arange(7)]).to(i64)
    slot_mapping = torch.arange(num_tokens, dtype=i64)
    slot_mapping[-1] = -1
    cos_sin = torch.randn(MAX_MODEL_LEN, head_dim, dtype=torch.float32)
    weight = torch.ones(hidden, dtype=act)
    x = torch.randn(num_tokens, hidden, dtype=act)
    scale = head_dim ** -0.5

    ops.rms_norm(x, weight, 1e-5)
    ops.rms_norm(x, weight, 1e-5, torch.randn_like(x))
    ops.rotary_embedding(positions, q, k, cos_sin)
    ops.write_kv(k, v, k_cache, v_cache, slot_mapping)
    ops.silu_and_mul(torch.randn(num_tokens, 2 * inter, dtype=act))
    ta.paged_prefill_attention(q, k_cache, v_cache, torch.tensor([0, 11, 18], dtype=i64),
                               torch.tensor([16, 7], dtype=i64), block_table, scale, 11)
    ta.paged_decode_attention(q[:2], k_cache, v_cache, torch.tensor([0, 1, 2], dtype=i64),
                              torch.tensor([17, 8], dtype=i64), block_table, scale,
                              MAX_MODEL_LEN)
    # Four experts of the model's widths (never written: no kernel runs). The prefill step's
    # 18 tokens take the large-batch tiles, the decode step's 2 the small-batch ones.
    w13 = torch.empty(4, 2 * inter, hidden, dtype=act)
    w2 = torch.empty(4, hidden, inter, dtype=act)
    topk_weights, topk_ids = torch.rand(num_tokens, 4).topk(2)
    for rows in (num_tokens, 2):
        moe.fused_moe(x[:rows], w13, w2, topk_weights[:rows], topk_ids[:rows], ops.silu_and_mul)


def _run_quant_wrappers(quant, model, act_name):
    """Call the quantized linears the way a decode step and a prefill step of `model` do."""
    import torch

    _, hidden, heads, kv_heads, head_dim, inter = model
    act = getattr(torch, act_name)
    linears = [(hidden, (heads + 2 * kv_heads) * head_dim), (heads * head_dim, hidden),
               (hidden, 2 * inter), (inter, hidden)]  # (K, N)
    for size_k, size_n in linears:
        qweight = torch.empty(size_n, size_k // 8, dtype=torch.int32)
        scales = torch.empty(size_n, size_k // 128, dtype=act)
        zeros = torch.empty(size_n, size_k // 128, dtype=torch.uint8)
        weight = torch.empty(size_n, size_k, dtype=torch.int8)
        for size_m in (1, 16, 2048):
            x = torch.empty(size_m, size_k, dtype=act)
            quant.w4a16_linear(x, qweight, scales, zeros if size_m > 16 else None, 128)
            quant.w8a8_linear(x, weight, torch.empty(size_n))
    quant.w4a16_linear(x[:16], qweight, torch.empty(size_n, size_k // 32, dtype=act),
                       torch.empty(size_n, size_k // 32, dtype=torch.uint8), 32)
    x = torch.empty(16, hidden, dtype=act)
    quant.rms_norm_quant_int8(x, torch.ones(hidden, dtype=act), 1e-5)
    quant.rms_norm_quant_int8(x, torch.ones(hidden, dtype=act), 1e-5, torch.empty_like(x))


def _register_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, bytes of stack: spills and local arrays) from the bundled
    cuobjdump; reported, not asserted: they bound occupancy, which only a GPU can time."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return (int(found[1]), int(found[2])) if found else (-1, -1)


def _compile_one(job) -> dict:
    """Compile one configuration for sm_90 (in a worker process); errors are returned."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod_name, name, signature, constexprs, attrs, options = job
    fn = getattr(importlib.import_module(mod_name), name)

    def arg(path: tuple[int, ...]) -> str:  # a tuple argument's items are `pool[1]`
        return fn.arg_names[path[0]] + "".join(f"[{i}]" for i in path[1:])

    def flat(label: str, ty) -> list[tuple[str, str]]:
        if isinstance(ty, tuple):
            return [item for i, t in enumerate(ty) for item in flat(f"{label}[{i}]", t)]
        return [(label, ty)]

    entry = {
        "kernel": f"{mod_name}.{name}",
        "signature": {k: v for label, ty in signature.items() for k, v in flat(label, ty)
                      if v != "constexpr"},
        "constexprs": {arg(path): value for path, value in constexprs.items()},
        "divisible_by_16": [arg(path) for path, values in attrs.items() if values],
        "num_warps": options["num_warps"], "num_stages": options["num_stages"],
    }
    start = time.perf_counter()
    try:
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                target=GPUTarget("cuda", 90, 32), options=options)
        entry["has_cubin"] = bool(kernel.asm.get("cubin"))
        entry["shared"] = kernel.metadata.shared
        entry["registers"], entry["spill_bytes"] = _register_usage(kernel.asm["cubin"])
    except Exception as e:  # report every failing configuration, not just the first
        entry["error"] = f"{type(e).__name__}: {e}"
    entry["seconds"] = round(time.perf_counter() - start, 2)
    return entry


def _compile_all(out_path: str) -> None:
    sys.path.insert(0, str(ROOT))
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    mods = [importlib.import_module(m) for m in MODULES]
    jit_fns = {(m.__name__, name): obj for m in mods for name, obj in vars(m).items()
               if isinstance(obj, JITFunction)}
    assert jit_fns, f"no JITFunction in {MODULES}: is TRITON_INTERPRET set?"

    launches = []
    for (mod_name, name), fn in jit_fns.items():
        setattr(sys.modules[mod_name], name, _Recorder(fn, launches))
    try:
        for model, act, cache in SCENARIOS:
            _run_wrappers(*mods[:3], model, act, cache)
        for model, act in QUANT_SCENARIOS:
            _run_quant_wrappers(mods[3], model, act)
    finally:  # the kernels call the helpers by their global names when compiled
        for (mod_name, name), fn in jit_fns.items():
            setattr(sys.modules[mod_name], name, fn)

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    configs = {}
    for fn, args, kwargs in launches:
        # What JITFunction.run does before compiling, with an sm_90 backend instead of the
        # active driver's.
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args,
                                                              specialization, options)
        key = (fn.__name__, repr(signature), repr(sorted(constexprs.items())),
               repr(sorted(attrs.items())), repr(options))
        configs.setdefault(key, (fn, signature, constexprs, attrs, options))

    jobs = [(fn.__module__, fn.__name__, signature, constexprs, attrs, options.__dict__)
            for fn, signature, constexprs, attrs, options in configs.values()]
    # fp32 (ieee) dots compile slowest: start them first so the workers finish together.
    jobs.sort(key=lambda job: ("ieee" not in job[3].values(), job[0] != MODULES[0]))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = max(1, min(4, cpus or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_compile_one, jobs))

    # A jit function never launched must at least be called by a launched kernel.
    launched = {fn for fn, _, _ in launches}
    reached = set(launched)
    changed = True
    while changed:
        changed = False
        for fn in jit_fns.values():
            called = re.compile(rf"\b{fn.__name__}\s*\(")
            if fn not in reached and any(called.search(g.src) for g in reached):
                reached.add(fn)
                changed = True
    unreached = sorted(f"{fn.__module__}.{fn.__name__}" for fn in jit_fns.values()
                       if fn not in reached)
    Path(out_path).write_text(json.dumps({"results": results, "unreached": unreached}))


# ------------------------------------------------------------------------------- pytest side


def _compile_in_subprocess() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items()
               if k not in ("TRITON_INTERPRET", "TRITON_OVERRIDE_ARCH", "TRITON_KERNEL_OVERRIDE",
                            "TRITON_ALWAYS_COMPILE")}
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        out = os.path.join(tmp, "report.json")
        proc = subprocess.run([sys.executable, __file__, out], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"compile subprocess failed:\n{proc.stdout}\n{proc.stderr}"
        return json.loads(Path(out).read_text())


def test_every_triton_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    start = time.perf_counter()
    report = _compile_in_subprocess()
    results = sorted(report["results"], key=lambda r: (r["kernel"], -r["seconds"]))
    print(f"\n{len(results)} sm_90 compiles in {time.perf_counter() - start:.1f} s")
    for r in results:
        print(f"  {r['kernel'].rsplit('.', 1)[1]:22} {r.get('shared', '-'):>7} B smem "
              f"{r.get('registers', '-'):>4} regs {r.get('spill_bytes', '-'):>4} B stack "
              f"{r['seconds']:5.2f} s warps={r['num_warps']} {r['constexprs']} "
              f"{sorted(set(r['signature'].values()))}")
    errors = {}  # one entry per distinct error, with every configuration that hits it
    for r in results:
        if "error" in r:
            errors.setdefault((r["kernel"], r["error"]), []).append(
                f"  constexprs={r['constexprs']} num_warps={r['num_warps']} "
                f"signature={r['signature']} not_16_divisible="
                f"{[a for a in r['signature'] if a not in r['divisible_by_16']]}")
    assert not errors, "kernels that do not compile for sm_90:\n" + "\n\n".join(
        f"{kernel}, {len(configs)} configuration(s):\n" + "\n".join(configs) + f"\n{error}"
        for (kernel, error), configs in errors.items())
    assert all(r["has_cubin"] for r in results), [r for r in results if not r["has_cubin"]]
    too_big = [r for r in results if r["shared"] > HOPPER_SMEM_PER_BLOCK]
    assert not too_big, f"shared memory over {HOPPER_SMEM_PER_BLOCK} B per block:\n" + "\n".join(
        f"  {r['kernel']} {r['shared']} B constexprs={r['constexprs']} "
        f"dtypes={sorted(set(r['signature'].values()))}" for r in too_big)
    assert not report["unreached"], (
        f"jit functions no scenario launches or calls: {report['unreached']}; add their "
        f"wrapper to _run_wrappers in {Path(__file__).name}")
    assert {r["kernel"].rsplit(".", 1)[0] for r in results} == set(MODULES)


if __name__ == "__main__":
    _compile_all(sys.argv[1])
