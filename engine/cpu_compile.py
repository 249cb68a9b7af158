"""The model's forward under torch.compile, for CPU steps that only decode.

A one-token step of SmolLM2 on CPU spends more time in ~40 small aten calls per layer (norms,
rotary, the KV gather, casts, each a few microseconds from Python) than in its GEMMs. Inductor
fuses them into a few C++ loops around the GEMM and attention calls: a forward at a 300-token
context went from 15 to 10.5 ms on two Zen 4 cores (llama-server's whole step: ~9 ms). Batched
decode steps gain as much: 32 rows at a 256-token context went from 110 to 77 ms, 8 rows from
50 to 35 ms (two AMX Xeon cores), and a Qwen3-MoE step of 32 rows, whose expert GEMMs alone
are opaque custom ops, from 172 to 158 ms (from 170-180 to 140-145 ms on two Zen 4 cores once
the rest of its MoE layers joined the graph). Steps with a prefill stay eager: their GEMMs
dominate.

The graph is dynamic in the context length (its page count: torch's decode attention masks
the last page's tail; the CPU op reads each row's own length) and in the batch, and is
compiled at start-up, so no request waits on a compile. torch specializes sizes 0 and 1, and
the forward branches on the row count where a linear's measured kernel changes (at the bounds
of kernel_choice's `TOKEN_CLASSES`) and, on quantized KV pages, where decode attention
switches to SDPA (4 rows), each branch a graph of its own. So one request has a graph,
batches of `MIN_BATCH` rows or more get one per token class, warmed up at a size inside it, and
2 to 4 rows run eagerly. A context of one page would need a graph of its own: those few steps
run eagerly too. Inductor's cache lives beside the
kernel measurements (`inductor_cache_dir`): the first start compiles for a minute or more,
later ones mostly load.
"""
import dataclasses
import gc
import hashlib
import os
import time
import types
from collections.abc import Iterator
from pathlib import Path

import torch

import kernels
from engine.cpu_info import cpu_flags
from engine.cpu_memory import release_freed_memory
from engine.layers.attention import AttentionMetadata
from engine.layers.quantization.kernel_choice import TOKEN_CLASSES, cache_dir
from kernels.reference import SDPA_MAX_ROWS


MIN_BATCH = SDPA_MAX_ROWS + 1  # fewer rows take decode attention's SDPA branch


def inductor_cache_dir() -> Path:
    """Inductor's cache, one per instruction set its C++ may target: torch's capability
    (`ATEN_CPU_CAPABILITY` lowers it) and the CPU's flags, and per build of Tessera's own CPU
    ops. Its graph cache keys on neither the vector width (loops generated for AVX2's 256-bit
    vectors, found again at AVX-512 and rebuilt for it, stored 512-bit vectors past their
    buffers' ends and the process died of heap corruption) nor a custom op's code (a graph
    cached when q4_linear returned fp32 corrupted the heap once it returned bf16)."""
    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:8]
    return (cache_dir() / "inductor" / f"{torch.backends.cpu.get_cpu_capability()}-{flags}-"
            f"{kernels.cpu_extension_digest()}")


def warm_up_batches(max_num_seqs: int) -> list[int]:
    """A row count inside each range the forward's branches cut `[MIN_BATCH, max_num_seqs]`
    into: one past a token class's bound, as no model dimension is likely to be (torch would
    tie them)."""
    return [1] + [n for n in (bound + 1 for bound in TOKEN_CLASSES)
                  if MIN_BATCH <= n <= max_num_seqs]


def _tensors(value) -> Iterator[torch.Tensor]:
    """The tensors in nested tuples, lists and dataclasses (a model's KV layers)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            yield from _tensors(getattr(value, field.name))


def _release_traced_graphs() -> None:
    """Let the graphs dynamo traced go once Inductor has compiled them. aot_autograd hangs
    three bound methods of each traced GraphModule on the function it returns, "for
    convenience" (`zero_grad`, `named_parameters`, `named_buffers`); nothing calls them in
    inference, and they keep every node with its fake tensors alive: 300k Python objects and
    41 MiB resident for SmolLM2's five graphs."""
    for obj in gc.get_objects():
        if (type(obj) is types.FunctionType  # isinstance would ask weak proxies, some dead
                and isinstance(getattr(obj.__dict__.get("zero_grad"), "__self__", None),
                               torch.fx.GraphModule)):
            for name in ("zero_grad", "named_parameters", "named_buffers"):
                obj.__dict__.pop(name, None)
    gc.collect()  # the graphs are cycles (graph, nodes, module), freed before start-up's trim


class CompiledDecode:
    def __init__(self, model: torch.nn.Module, kv_layers: list, pool_pages: list[int],
                 page_size: int, max_model_len: int, max_num_seqs: int):
        """`pool_pages`: the pages of each pool the layers read, the main one first (a second
        one holds a head config's streaming heads or a model's sliding layers)."""
        # Set, not defaulted: torch sets the variable itself (to /tmp) the first time it looks.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())
        self.kv_layers, self.page_size = kv_layers, page_size
        # The pools never change size: fixed, their checks are one C++ guard per tensor rather
        # than symbolic ones on each size and stride that dynamo checks in Python every call.
        for pool in _tensors(kv_layers):
            torch._dynamo.mark_static(pool)
            if pool._base is not None:  # K and V are views of one allocation
                torch._dynamo.mark_static(pool._base)
        # No guards on the modules: their parameters and attributes are set once, at load.
        # Checking them cost 0.7 of a 12.8 ms one-request SmolLM2 step on two AMX Xeon cores.
        # Floats (a layer's eps and softmax scale) as constants: symbolic, each was a Python guard.
        torch._dynamo.config.specialize_float = True
        self.forward = torch.compile(model.forward, dynamic=True, options={
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        start = time.perf_counter()
        # 11 and 7 pages: counts no model dimension is likely to equal (torch would tie them).
        contexts = [min(n * page_size - 3, max_model_len) for n in (11, 7)]
        self.batches = warm_up_batches(max_num_seqs)
        for rows in self.batches:
            self._warm_up(rows, list(zip(contexts, pool_pages)))
            release_freed_memory()  # one compile's garbage never adds to the next one's
        self.compile_s = time.perf_counter() - start
        _release_traced_graphs()

    def describe(self) -> str:
        """The row counts compiled at start-up, for the start-up log."""
        _, *batches = self.batches
        return "one request" + (f" and {', '.join(map(str, batches))} rows" if batches else "")

    def covers(self, meta: AttentionMetadata) -> bool:
        rows = meta.block_table.shape[0]
        return (meta.max_query_len == 1 and (rows == 1 or rows >= MIN_BATCH)
                and min(m.max_seq_len for m in (meta, meta.streaming) if m) > self.page_size)

    @torch.inference_mode()
    def _warm_up(self, rows: int, pools: list[tuple[int, int]]) -> None:
        """A decode step of `rows` rows at a `(context, pages)` per pool, every row on the
        pool's first pages (free: no request exists yet; what it writes there is overwritten
        before anything reads it)."""
        metas = []
        for context, num_pages in pools:
            pages = -(-context // self.page_size)
            block_table = (torch.arange(pages) % num_pages).expand(rows, pages).contiguous()
            positions, meta = AttentionMetadata.for_batch(
                torch.full((rows,), context - 1), torch.ones(rows, dtype=torch.int64),
                block_table, self.page_size, 1, context)
            metas.append((positions, meta))
        (positions, meta), *second = metas
        if second:
            meta.streaming = second[0][1]
        self.run(torch.zeros(rows, dtype=torch.int64), positions, meta)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states `[rows, hidden]` of a decode step."""
        return self.forward(input_ids, positions, self.kv_layers, meta)
