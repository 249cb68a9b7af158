"""Builds the model, its KV cache and each step's flat batch; runs forward and sampling."""
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from engine import kv_calibration, loader
from engine.config import EngineConfig
from engine.cpu_info import cpu_flags
from engine.cpu_memory import release_freed_memory, retain_freed_memory
from engine.cpu_compile import CompiledDecode
from engine.cuda_graphs import DecodeGraphs
from engine.kv_cache import (DEFAULT_CPU_KV_MEMORY, KVCache, KVCacheSpec, check_fits,
                             gpu_kv_budget, split_pages)
from engine.layers.attention import AttentionMetadata, HeadSplit, ScoredQueries
from engine.layers.quantization import get_linear_method, resolve_quantization
from engine.layers.quantization.kernel_choice import cache_dir, chosen_plans
from engine.messages import TokenLogprobs
from engine.models import model_class
from engine.parallel import TensorParallel
from engine.sampler import SamplingBatch, gather_logprobs, sample
from engine.step_plan import PageTables, StepPlan
from engine.structured_output import StructuredOutputManager
from engine.tokenizer import model_format, resolve_model_path
import kernels
from kernels import kv_format
from scheduler.head_config import load_head_config
from scheduler.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_bf16_feature() -> str | None:
    """The CPU feature that makes bf16 matmuls fast (AVX-512 BF16 or AMX), if any; without one
    bf16 is several times slower than fp32. None where torch's kernels are capped below
    AVX-512 (`ATEN_CPU_CAPABILITY=avx2`): they do not use it then."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return None
    flags = cpu_flags()
    for flag, name in (("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX")):
        if flag in flags:
            return name
    return None


def resolve_dtype(dtype: str, device: str, integer_linears: bool = False
                  ) -> tuple[torch.dtype, str]:
    """The serving dtype, and why: "auto" picks bf16 on CUDA, on CPUs that run bf16 matmuls
    fast, and where the linears run integer kernels (`LinearMethod.integer_kernels`), whose
    activations are bf16 or int8 on any CPU. Only dense GEMMs need the CPU's bf16 support:
    under AVX2, the GGUF default served 229 tok/s at 16 requests in bf16, 206 in fp32."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(_DTYPES)}; got {dtype!r}")
        return _DTYPES[dtype], "as requested"
    if device.startswith("cuda"):
        return torch.bfloat16, "auto: CUDA"
    if feature := cpu_bf16_feature():
        return torch.bfloat16, f"auto: CPU has {feature}"
    if integer_linears:
        return torch.bfloat16, ("auto: integer linear kernels, on bf16 or int8 activations "
                                "(the CPU has no AVX-512 BF16 or AMX)")
    return torch.float32, "auto: CPU has neither AVX-512 BF16 nor AMX, bf16 would be slow"


@dataclass
class RunnerOutput:
    """One step's results: the sampled token (and its logprobs) of each request that samples,
    the prompt logprobs this step's chunks gave, per request that asked for them, and the
    attention scores a KV policy asked for."""
    sampled: dict[str, tuple[int, TokenLogprobs | None]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # per request whose queries were scored: `[layers, kv_heads, held slots]` (see
    # engine.layers.attention.ScoredQueries)
    attention_scores: dict[str, np.ndarray] = field(default_factory=dict)


def _take_cores(tp: TensorParallel) -> None:
    """Torch's threads: every core this process may use, or under tensor parallelism on CPU
    an equal share of them per rank (pinned when there are enough to go round)."""
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // tp.size)
    if tp.size > 1 and len(cores) >= tp.size:
        os.sched_setaffinity(0, cores[tp.rank * share:(tp.rank + 1) * share])
    torch.set_num_threads(share)


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Build parameters in the serving dtype: no fp32 copy of the model ever exists."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class ModelRunner:
    """One rank's model, KV pool and step execution: the whole model by default, or its share
    under tensor parallelism (`tp`, engine/parallel.py), where every rank runs each step's
    forward and LM-head calls together and the engine core's rank samples."""

    def __init__(self, config: EngineConfig, tp: TensorParallel = TensorParallel()):
        self.config, self.tp = config, tp
        self.device = torch.device(config.device)
        if self.device.type == "cpu":
            _take_cores(tp)
            retain_freed_memory()
            kernels.cpu_kernels_available(cache_dir())  # loads decode attention's op
        else:
            if tp.size > 1:  # rank r on GPU r; a Ray actor sees only its own GPU
                self.device = torch.device("cuda", tp.rank % torch.cuda.device_count())
            if self.device.index is not None:  # Triton and graph capture use this device
                torch.cuda.set_device(self.device)
        fmt = model_format(resolve_model_path(config.model.model), config.model.load_format)
        self.linear_method = get_linear_method(resolve_quantization(
            config.model.quantization, fmt, self.device.type,
            loader.checkpoint_method(config.model)))
        self.dtype, self.dtype_reason = resolve_dtype(config.model.dtype, config.device,
                                                      self.linear_method.integer_kernels)
        self.linear_method.check_supported(self.device, self.dtype)
        start = time.monotonic()
        arch, weights = loader.load(config.model, self.linear_method, self.device)
        model_cls = model_class(arch.architecture)
        self.arch = arch
        self.max_model_len = config.model.max_model_len or arch.max_position_embeddings
        with torch.device(self.device), default_dtype(self.dtype):
            model = model_cls(arch, max(self.max_model_len, 1), self.linear_method, tp)
        model.load_weights(weights)
        self.model = model.eval()
        if self.device.type == "cpu":
            release_freed_memory()  # the repacking's temporaries, before the pool is touched
        self.load_s = time.monotonic() - start
        kv = config.cache.kv_cache_dtype
        self.kv_spec = KVCacheSpec(arch.num_layers, tp.heads(arch).num_kv_heads, arch.head_dim,
                                   config.cache.page_size, _DTYPES.get(kv, self.dtype),
                                   kv_format.FORMATS.get(kv))
        num_pages = tp.min(self._num_kv_pages())  # the pool every rank can hold
        self.streaming_cache: KVCache | None = None
        self.head_config = None
        if config.cache.kv_head_config is not None:
            num_pages = self._split_heads(num_pages)
        elif (window := self.second_pool_window()) is not None:
            num_pages = self._split_sliding_layers(num_pages, window)
        check_fits(num_pages, config.cache.page_size, self.max_model_len)
        # A prefill engine's pool is shared memory on CPU: decode engines on this host copy
        # handed-off pages straight out of it (engine/kv_transfer.py).
        self.kv_cache = KVCache(self.kv_spec, num_pages, self.device,
                                shared=config.disagg.role == "prefill"
                                and self.device.type == "cpu")
        self.kv_layers = self.kv_cache.layers
        if self.streaming_cache is not None:
            group = arch.num_heads // arch.num_kv_heads
            self.kv_layers = [
                HeadSplit.of(full, streaming, torch.from_numpy(mask).to(self.device), group)
                for full, streaming, mask in zip(self.kv_cache.layers, self.streaming_cache.layers,
                                                 self.streaming_heads)]
        quant = self.kv_spec.quant
        if quant is not None and quant.calibrates_keys:
            self.kv_layers = kv_calibration.calibrate(
                self.model, self.kv_spec, self.kv_layers, arch.vocab_size, self.max_model_len,
                self.device, centre=arch.attn_softcap is None)
        self.graphs, self.compiled = None, None
        self.page_tables = PageTables()
        eager = config.model.enforce_eager
        if self.device.type == "cpu" and not eager and tp.size == 1:
            self.compiled = CompiledDecode(
                self.model, self.kv_layers,
                [c.num_pages for c in (self.kv_cache, self.streaming_cache) if c],
                config.cache.page_size, self.max_model_len, config.scheduler.max_num_seqs)
        if self.device.type == "cuda" and not eager:
            self.graphs = DecodeGraphs(self.model, self.kv_layers,
                                       config.scheduler.max_num_seqs,
                                       -(-self.max_model_len // config.cache.page_size),
                                       self.max_model_len, self.device,
                                       second_pool=self.streaming_cache is not None)
        if self.device.type == "cpu":
            release_freed_memory()

    def second_pool_window(self) -> int | None:
        """A model whose sliding layers share one window and whose other layers have none
        (Gemma 2 and 3) keeps its sliding layers in a pool of their own, whose pages before
        the window go back as a request advances: that window. Not under tensor parallelism or
        a prefill/decode role (the handoff sends one pool)."""
        windows = set(self.arch.layer_windows or [None])
        if (len(windows) != 2 or None not in windows or self.tp.size > 1
                or self.config.disagg.role != "colocated"):
            return None
        return max(windows - {None})

    def _split_sliding_layers(self, num_pages: int, window: int) -> int:
        """The sliding layers' pool (all their heads) and the global layers' main pool, in the
        memory of `num_pages` pages of every layer. A request holds the `window - 1` tokens
        before its step's first query, on at most one page more than they fill."""
        sliding = np.array([w is not None for w in self.arch.layer_windows])
        mask = np.repeat(sliding[:, None], self.kv_spec.num_kv_heads, axis=1)
        return self._split_pool(num_pages, mask, -(-window // self.kv_spec.page_size) + 1,
                                window - 1 + self.kv_spec.page_size)

    def _split_heads(self, num_pages: int) -> int:
        """Under a head config: the streaming heads' pool, and `self.kv_spec` narrowed to the
        full-context heads. Each streaming head holds sinks + window tokens before a step."""
        arch, cache = self.arch, self.config.cache
        if any(arch.layer_windows or ()):
            raise ValueError("--kv-head-config is not supported on models with sliding-window "
                             "layers (they evict by position already)")
        self.head_config = load_head_config(cache.kv_head_config)
        mask = self.head_config.streaming_mask(arch.num_layers, arch.num_kv_heads)
        if mask.all() or not mask.any():
            raise ValueError(f"--kv-head-config {cache.kv_head_config}: name some KV heads "
                             "streaming but not all (for all, use --kv-policy streaming)")
        held = self.head_config.sinks + self.head_config.window
        return self._split_pool(num_pages, mask, -(-(held + 1) // self.kv_spec.page_size),
                                held)

    def _split_pool(self, num_pages: int, mask: np.ndarray, pages_per_seq: int,
                    held: int) -> int:
        """The second pool, of the heads `mask[layers, kv_heads]` names, and `self.kv_spec`
        narrowed to the others, in the memory of `num_pages` pages of all heads. The second
        pool is sized for `max_num_seqs` requests of `pages_per_seq` (the tokens one holds
        before a decode step, and its own) plus one step's tokens, but takes no more than its
        heads' share of the memory, and no less than one request holding `held` tokens before
        the longest step needs; returns the main pool's pages."""
        sched, page = self.config.scheduler, self.kv_spec.page_size
        self.streaming_heads, dense = mask, self.kv_spec
        self.kv_spec = replace(dense, layer_heads=tuple((~mask).sum(1).tolist()))
        streaming = replace(dense, layer_heads=tuple(mask.sum(1).tolist()))
        step = min(sched.max_num_batched_tokens, self.max_model_len)
        full_pages, streaming_pages = split_pages(
            num_pages, dense, self.kv_spec, streaming,
            sched.max_num_seqs * pages_per_seq + -(-sched.max_num_batched_tokens // page),
            -(-(held + step) // page))
        self.streaming_cache = KVCache(streaming, streaming_pages, self.device)
        return full_pages

    def kernels_chosen(self) -> dict[str, str]:
        """The CPU kernel per step size of each quantized layer shape (empty when dense)."""
        return chosen_plans()

    def _num_kv_pages(self) -> int:
        cache = self.config.cache
        if cache.num_kv_pages is not None:
            return cache.num_kv_pages
        if cache.kv_cache_memory is not None:
            return self.kv_spec.num_pages_for(cache.kv_cache_memory)
        if self.device.type == "cuda":
            return self.kv_spec.num_pages_for(self._cuda_kv_budget())
        return self.kv_spec.num_pages_for(DEFAULT_CPU_KV_MEMORY)

    def _cuda_kv_budget(self) -> int:
        """What `gpu_memory_utilization` leaves for KV pages after what is in use once the
        weights are loaded, the larger peak of the two largest steps the scheduler can build,
        and, with CUDA graphs, their pool (the buckets share one decode step's scratch)."""
        dev, sched = self.device, self.config.scheduler
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        # A full token budget of prefill, as requests of at most max_model_len tokens.
        tokens, chunk = sched.max_num_batched_tokens, min(sched.max_num_batched_tokens,
                                                          self.max_model_len)
        prefill_lens = [chunk] * (tokens // chunk) + ([tokens % chunk] if tokens % chunk else [])
        width = -(-chunk // self.kv_spec.page_size)
        scratch = KVCache(self.kv_spec, len(prefill_lens) * width, dev)
        prefill = self._peak_of(lambda: self._warm_up(scratch, prefill_lens, width))
        decode = self._peak_of(lambda: self._warm_up(scratch, [1] * sched.max_num_seqs, width))
        del scratch
        torch.cuda.empty_cache()
        graphs = 0 if self.config.model.enforce_eager else decode
        budget = gpu_kv_budget(total, total - free, max(prefill, decode) + graphs,
                               self.config.cache.gpu_memory_utilization)
        logger.info("GPU memory: %.2f GiB total, %.2f GiB in use after loading, step peaks "
                    "%.2f GiB prefill / %.2f GiB decode, CUDA graph pool ~%.2f GiB: %.2f GiB "
                    "for KV pages at utilization %.2f", total / 2**30, (total - free) / 2**30,
                    prefill / 2**30, decode / 2**30, graphs / 2**30, budget / 2**30,
                    self.config.cache.gpu_memory_utilization)
        return budget

    def _peak_of(self, step) -> int:
        """Bytes `step` takes on top of what is allocated, counting the allocator's reserve."""
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        allocated, reserved = torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev)
        step()
        torch.cuda.synchronize(dev)
        return max(torch.cuda.max_memory_allocated(dev) - allocated,
                   torch.cuda.max_memory_reserved(dev) - reserved)

    @torch.inference_mode()
    def _warm_up(self, scratch: KVCache, lens: list[int], width: int) -> None:
        """One step of prompts of these lengths on a scratch cache, and their logits in fp32 (as
        the sampler sees them). One-token steps take the decode path with the split-KV grid
        sized for `max_model_len`, as a captured decode step is."""
        dev, longest = self.device, max(lens)
        lens_t = torch.tensor(lens, device=dev)
        block_table = torch.arange(len(lens) * width, device=dev).view(-1, width) % \
            scratch.num_pages
        positions, meta = AttentionMetadata.for_batch(
            torch.zeros_like(lens_t), lens_t, block_table, self.kv_spec.page_size, longest,
            longest if longest > 1 else self.max_model_len)
        hidden = self.model(torch.zeros(sum(lens), dtype=torch.int64, device=dev), positions,
                            scratch.layers, meta)
        self.model.compute_logits(hidden[meta.query_start_loc[1:] - 1])

    def _prepare(self, plan: StepPlan, out: SchedulerOutput | None = None):
        """The flat batch: token ids, positions, slots and per-request attention metadata; the
        queries a KV policy scores come from the scheduler's output (engine core only)."""
        tables = self.page_tables.apply(plan)
        ids = [t for p in plan.requests for t in p.token_ids]
        starts = torch.tensor([p.start for p in plan.requests])
        num_new = torch.tensor([len(p.token_ids) for p in plan.requests])
        kv_starts = [p.kv_start for p in plan.requests]
        positions, meta = self._metadata(starts, num_new, tables, kv_starts)
        if self.streaming_cache is not None:
            _, meta.streaming = self._metadata(starts, num_new,
                                               self.page_tables.streaming_rows(plan),
                                               [p.streaming.kv_start for p in plan.requests])
        if out is not None:
            meta.scored = tuple(self._scored(out, starts.tolist(), kv_starts))
        return torch.tensor(ids, device=self.device), positions.to(self.device), \
            meta.to(self.device)

    def _metadata(self, starts: torch.Tensor, num_new: torch.Tensor, tables: list[list[int]],
                  kv_starts: list[int]) -> tuple[torch.Tensor, AttentionMetadata]:
        """Positions and attention metadata of the flat batch on these page tables."""
        max_pages = max(len(t) for t in tables)
        # Padding and released pages (block_manager.RELEASED, out of every query's sliding
        # window, so masked) read page 0.
        block_table = torch.tensor([t + [0] * (max_pages - len(t)) for t in tables],
                                   dtype=torch.int64).clamp_(min=0)
        kv_starts_t = torch.tensor(kv_starts)
        return AttentionMetadata.for_batch(
            starts, num_new, block_table, self.kv_spec.page_size, int(num_new.max()),
            int((kv_starts_t + num_new).max()), kv_starts_t)

    @staticmethod
    def _scored(out: SchedulerOutput, starts: list[int], kv_starts: list[int]):
        """The queries each request's policy scores (`ScheduledRequest.scored_queries`)."""
        offset = 0  # the request's first row in the flat batch
        for row, s in enumerate(out.scheduled):
            if s.scored_queries:
                skip = s.scored_queries.start - starts[row]
                yield ScoredQueries(row, offset + skip, len(s.scored_queries),
                                    kv_starts[row] + skip, kv_starts[row] + s.num_new_tokens)
            offset += s.num_new_tokens

    def _forward(self, plan: StepPlan, out: SchedulerOutput | None = None):
        input_ids, positions, meta = self._prepare(plan, out)
        # A step whose layers append attention scores (meta.scored) runs the eager forward.
        if (self.graphs is not None and meta.max_query_len == 1 and not meta.scored
                and len(plan.requests) <= self.graphs.max_batch):
            hidden = self.graphs.run(input_ids, positions, meta)
        elif self.compiled is not None and not meta.scored and self.compiled.covers(meta):
            hidden = self.compiled.run(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, self.kv_layers, meta)
        return hidden, meta

    def _sample_logits(self, plan: StepPlan, hidden: torch.Tensor) -> torch.Tensor | None:
        if not plan.sample_rows:
            return None
        return self.model.compute_logits(hidden[torch.tensor(plan.sample_rows,
                                                             device=self.device)])

    def _prompt_logit_blocks(self, plan: StepPlan, hidden: torch.Tensor):
        """fp32 logits of the prompt-logprob rows, `max_num_seqs` rows at a time (as many as
        a decode step's logits, which the CUDA KV sizing profiles): a long chunk's
        `[tokens, vocab]` logits never exist at once."""
        rows, block = plan.prompt_rows, self.config.scheduler.max_num_seqs
        for b in range(0, len(rows), block):
            yield self.model.compute_logits(
                hidden[torch.tensor(rows[b:b + block], device=self.device)])

    @torch.inference_mode()
    def follow(self, plan: StepPlan) -> None:
        """A tensor-parallel worker's step: its share of the forward and of every LM-head
        call the engine core makes (the logits are gathered across ranks)."""
        hidden, _ = self._forward(plan)
        self._sample_logits(plan, hidden)
        for _ in self._prompt_logit_blocks(plan, hidden):
            pass

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, plan: StepPlan,
                structured: StructuredOutputManager | None = None) -> RunnerOutput:
        """Run one step (`plan` is `out` as workers see it): forward the flat batch, sample,
        and gather the prompt logprobs."""
        self.kv_cache.compact(out.kv_compaction)
        if self.streaming_cache is not None:
            self.streaming_cache.compact(out.streaming_compaction)
        hidden, meta = self._forward(plan, out)
        return RunnerOutput(self._sample(out, plan, hidden, structured),
                            self._prompt_logprobs(out, plan, hidden),
                            {out.scheduled[s.row].request.request_id:
                             torch.stack(s.scores).cpu().numpy() for s in meta.scored})

    def _sample(self, out: SchedulerOutput, plan: StepPlan, hidden: torch.Tensor,
                structured: StructuredOutputManager | None
                ) -> dict[str, tuple[int, TokenLogprobs | None]]:
        logits = self._sample_logits(plan, hidden)
        if logits is None:
            return {}
        requests = [s.request for s in out.scheduled if s.samples]
        bitmask = structured and structured.bitmask([r.request_id for r in requests])
        batch = SamplingBatch.from_requests(requests, self.arch.vocab_size, bitmask)
        # Plain greedy rows need only an argmax: keep the [B, vocab] logits on the device.
        tokens, logprobs = sample(logits if batch.plain_greedy else logits.cpu(), batch)
        return {r.request_id: (t, logprobs[i] if logprobs else None)
                for i, (r, t) in enumerate(zip(requests, tokens))}

    def _prompt_logprobs(self, out: SchedulerOutput, plan: StepPlan, hidden: torch.Tensor
                         ) -> dict[str, list[TokenLogprobs]]:
        """Logprobs of the prompt tokens that this step's chunks predict (`plan.prompt_rows`),
        for the requests that asked."""
        asking = [s for s in out.scheduled if s.prompt_logprob_positions]
        if not asking:
            return {}
        targets, num_top = [], []
        for s in asking:
            positions, r = s.prompt_logprob_positions, s.request
            targets.extend(r.prompt_token_ids[positions.start + 1:positions.stop + 1])
            num_top.extend([r.sampling_params.prompt_logprobs] * len(positions))
        targets_t = torch.tensor(targets, device=self.device)
        block = self.config.scheduler.max_num_seqs
        logprobs = []
        for b, logits in zip(range(0, len(targets), block),
                             self._prompt_logit_blocks(plan, hidden)):
            logprobs += gather_logprobs(logits.log_softmax(-1), targets_t[b:b + block],
                                        num_top[b:b + block])
        result, start = {}, 0
        for s in asking:
            n = len(s.prompt_logprob_positions)
            result[s.request.request_id] = logprobs[start:start + n]
            start += n
        return result
