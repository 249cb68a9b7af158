"""The engine core: schedule -> run model -> sample -> update, one step at a time.

`EngineCore` is used in-process by the offline `LLM`; `engine/engine_process.py` runs it in its
own process behind ZeroMQ sockets (see `engine/messages.py`) for the API server.
"""
import dataclasses
import logging
import random
import time

import torch

from engine.config import EngineConfig
from engine.messages import (AddRequest, EngineReady, EngineStep, RequestOutput, StepStats,
                             TokenLogprobs)
from engine.model_runner import ModelRunner, RunnerOutput
from engine.structured_output import StructuredOutputManager
from engine.tokenizer import load_tokenizer, model_format, resolve_model_path
from scheduler.block_manager import BlockManager
from scheduler.kv_policy import KVPolicy, parse_kv_policy
from scheduler.request import Request
from scheduler.scheduler import Scheduler, SchedulerOutput

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig):
        start = time.monotonic()
        self.config = config
        self.runner = ModelRunner(config)
        self.max_model_len = self.runner.max_model_len
        self.block_manager = BlockManager(self.runner.kv_cache.num_pages, config.cache.page_size,
                                          config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.structured: StructuredOutputManager | None = None  # built on first use
        # Seeds of sampled requests that bring none (vLLM's --seed): drawn in arrival order.
        self.seeds = random.Random(config.model.seed)
        # Prompt logprobs gathered chunk by chunk, sent whole with the request's first token.
        self.prompt_logprobs: dict[str, list[TokenLogprobs]] = {}
        self._kv_policy(None)  # a default the model cannot take stops the start
        logger.info("%s", self.startup_summary(time.monotonic() - start))

    def startup_summary(self, started_s: float) -> str:
        """One readable block: what was loaded, in which dtype and why, and the KV pool."""
        r, c, arch = self.runner, self.config, self.runner.arch
        path = resolve_model_path(c.model.model)
        params = sum(p.numel() for p in r.model.parameters())
        device = (f"{c.device}, {torch.get_num_threads()} threads" if r.device.type == "cpu"
                  else f"{c.device} ({torch.cuda.get_device_name(r.device)})")
        pages, page_size = r.kv_cache.num_pages, r.kv_spec.page_size
        return "\n".join([
            f"engine started in {started_s:.1f} s (weights loaded in {r.load_s:.1f} s)",
            f"  model     {path}",
            f"  weights   {model_format(path, c.model.load_format)}"
            f", linears {r.linear_method.name}: {params:,} parameters, "
            f"{arch.num_layers} layers, vocab {arch.vocab_size}",
            f"  dtype     {str(r.dtype).removeprefix('torch.')} ({r.dtype_reason})",
            f"  device    {device}",
            *(f"  kernels   {shape}: {plan}" for shape, plan in r.kernels_chosen().items()),
            *([f"  note      {note}"] if (note := r.linear_method.dtype_note(r.dtype)) else []),
            *([f"  compiled  one-request decode steps (torch.compile, "
               f"{r.compiled.compile_s:.1f} s)"] if r.compiled else []),
            f"  KV cache  {pages} pages x {page_size} tokens = {pages * page_size} tokens, "
            f"{_size(pages * r.kv_spec.page_bytes)} ({r.kv_spec.storage}, "
            f"{r.kv_spec.token_bytes:,} bytes per token), prefix caching "
            f"{'on' if c.cache.enable_prefix_caching else 'off'}",
            f"  limits    max_model_len {self.max_model_len}, max_num_seqs "
            f"{c.scheduler.max_num_seqs}, max_num_batched_tokens "
            f"{c.scheduler.max_num_batched_tokens}"])

    def _structured(self) -> StructuredOutputManager:
        if self.structured is None:
            self.structured = StructuredOutputManager(
                load_tokenizer(self.config.model.tokenizer_path), self.runner.arch.vocab_size)
        return self.structured

    def add_request(self, req: AddRequest) -> None:
        n = len(req.prompt_token_ids)
        params = req.sampling_params
        if n == 0:
            raise ValueError("the prompt is empty")
        room = self.max_model_len - n
        if room < 1 or (params.max_tokens or 0) > room:
            raise ValueError(f"prompt ({n} tokens) plus max_tokens ({params.max_tokens}) "
                             f"exceeds max_model_len={self.max_model_len}")
        vocab = self.runner.arch.vocab_size
        for name, ids in (("prompt", req.prompt_token_ids),
                          ("stop_token_ids", params.stop_token_ids),
                          ("logit_bias", params.logit_bias)):
            if any(not 0 <= t < vocab for t in ids):
                raise ValueError(f"{name} holds token ids outside the vocabulary [0, {vocab})")
        if req.request_id in self.scheduler.requests:
            raise ValueError(f"duplicate request id {req.request_id}")
        if params.structured_output is not None:
            self._structured().add(req.request_id, params.structured_output)
        if params.seed is None and not params.greedy:
            params = dataclasses.replace(params, seed=self.seeds.getrandbits(63))
        if params.prompt_logprobs is not None:
            self.prompt_logprobs[req.request_id] = []
        self.scheduler.add_request(Request(
            req.request_id, list(req.prompt_token_ids), params, req.arrival_time,
            eos_token_ids=tuple(self.runner.arch.eos_token_ids),
            max_tokens=params.max_tokens or room,
            kv_policy=self._kv_policy(params.kv_policy)))

    def _kv_policy(self, spec: str | None) -> KVPolicy | None:
        """The request's policy, else the engine's. Sliding-window layers mask by KV slot,
        which is no longer the position once tokens are evicted: such models refuse one."""
        policy = parse_kv_policy(self.config.cache.kv_policy if spec is None else spec)
        if policy is not None and any(self.runner.arch.layer_windows):
            raise ValueError("kv_policy is not supported on models with sliding-window layers")
        return policy

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        outputs = []
        for rid in request_ids:
            request = self.scheduler.abort(rid)
            self.prompt_logprobs.pop(rid, None)
            if self.structured is not None:
                self.structured.remove(rid)
            if request is not None:
                outputs.append(RequestOutput(rid, [], "abort", None, request.num_prompt_tokens,
                                             max(request.num_cached_tokens, 0)))
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> EngineStep:
        sched = self.scheduler.schedule()
        result = self.runner.execute(sched, self.structured) if sched.scheduled else RunnerOutput()
        for rid, logprobs in result.prompt_logprobs.items():
            self.prompt_logprobs[rid] += logprobs
        sampled = result.sampled
        tokens = {rid: t for rid, (t, _) in sampled.items()}
        finished = self.scheduler.update(sched, tokens, result.attention_scores)
        if self.structured is not None:
            for rid, token in tokens.items():
                self.structured.accept(rid, token)
            for r in finished:
                self.structured.remove(r.request_id)
        outputs = []
        for s in sched.scheduled:
            r = s.request
            if r.request_id not in sampled:
                continue
            lp = sampled[r.request_id][1]
            outputs.append(RequestOutput(
                r.request_id, [r.output_token_ids[-1]], r.finish_reason,
                None if r.sampling_params.logprobs is None else [lp],
                r.num_prompt_tokens, r.num_cached_tokens, r.scheduled_time,
                r.first_token_time, self.prompt_logprobs.pop(r.request_id, None),
                r.num_evicted_tokens if r.kv_policy else None))
        num_prompt = sum(max(0, min(s.request.num_computed_tokens, s.request.num_prompt_tokens)
                             - (s.request.num_computed_tokens - s.num_new_tokens))
                         for s in sched.scheduled)
        return EngineStep(outputs, self._stats(sched, num_prompt, len(outputs)))

    def _stats(self, sched: SchedulerOutput, num_prompt: int, num_generation: int) -> StepStats:
        bm = self.block_manager
        return StepStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_kv_pages_total=bm.num_pages, num_kv_pages_used=bm.num_pages - bm.num_free_pages,
            num_scheduled_tokens=sched.num_tokens, num_prompt_tokens=num_prompt,
            num_generation_tokens=num_generation, num_preemptions=sched.num_preemptions,
            prefix_cache_queries=sched.prefix_cache_queries,
            prefix_cache_hits=sched.prefix_cache_hits)

    def ready_message(self, model_name: str) -> EngineReady:
        r = self.runner
        return EngineReady(model_name, self.max_model_len, str(r.dtype).removeprefix("torch."),
                           self.config.device, r.kv_spec.page_size,
                           r.kv_spec.storage, r.kv_cache.num_pages,
                           r.arch.vocab_size, r.linear_method.name, r.kernels_chosen())

    def idle_stats(self) -> EngineStep:
        return EngineStep([], self._stats(SchedulerOutput(), 0, 0))


def _size(num_bytes: int) -> str:
    return (f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30
            else f"{num_bytes / 2**20:.1f} MiB")
