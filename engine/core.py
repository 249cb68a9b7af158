"""The engine core: schedule -> run model -> sample -> update, one step at a time.

`EngineCore` is used in-process by the offline `LLM`; `engine/engine_process.py` runs it in its
own process behind ZeroMQ sockets (see `engine/messages.py`) for the API server.
"""
import dataclasses
import logging
import os
import random
import time

import torch

from engine.config import EngineConfig
from engine.messages import (AddRequest, EngineReady, EngineStep, KVArrival, KVTransfer,
                             RequestOutput, StepStats, TokenLogprobs)
from engine.kv_cache import KVCache
from engine.kv_transfer import load_pages
from engine.executor import Executor
from engine.model_runner import RunnerOutput
from engine.structured_output import StructuredOutputManager
from engine.tokenizer import load_tokenizer, model_format, resolve_model_path
from scheduler.block_manager import BlockManager
from scheduler.kv_policy import KVPolicy, parse_kv_policy
from scheduler.request import Request
from scheduler.scheduler import Scheduler, SchedulerOutput, StreamingHeads

logger = logging.getLogger(__name__)

# Test hooks (real processes), each on while the file its variable names exists: a prefill
# engine that leases handed-off pages but never sends them; a decode engine that finds no free
# pages for any transfer.
DROP_KV_TRANSFERS_ENV = "TESSERA_TEST_DROP_KV_TRANSFERS"
REFUSE_KV_LOADS_ENV = "TESSERA_TEST_REFUSE_KV_LOADS"


def _hook_on(env: str) -> bool:
    path = os.environ.get(env)
    return path is not None and os.path.exists(path)


class EngineCore:
    def __init__(self, config: EngineConfig):
        start = time.monotonic()
        self.config = config
        self.executor = Executor(config)
        self.runner = self.executor.runner  # rank 0's: the model, KV pool and sampling
        self.max_model_len = self.runner.max_model_len
        # Under a head config the streaming heads' tokens of a prompt prefix are not in the
        # pages a prefix hit would take: no prefix caching. A second pool of sliding layers
        # hits the pages of its window (`Scheduler._prefix_hits`).
        r, page_size = self.runner, config.cache.page_size
        caching = config.cache.enable_prefix_caching and r.head_config is None
        self.block_manager = BlockManager(r.kv_cache.num_pages, page_size, caching)
        streaming = r.streaming_cache and StreamingHeads(
            BlockManager(r.streaming_cache.num_pages, page_size, caching),
            r.head_config and r.head_config.policy, r.second_pool_window())
        self.scheduler = Scheduler(config.scheduler, self.block_manager, streaming,
                                   self._sliding_window())
        self.structured: StructuredOutputManager | None = None  # built on first use
        # Seeds of sampled requests that bring none (vLLM's --seed): drawn in arrival order.
        self.seeds = random.Random(config.model.seed)
        # Prompt logprobs gathered chunk by chunk, sent whole with the request's first token.
        self.prompt_logprobs: dict[str, list[TokenLogprobs]] = {}
        # Disaggregation: requests to hand off after their first token (id -> the decode
        # engine's KV address), those handed off this step, and the pages of handed-off
        # requests, held until the decode engine has them or the lease runs out.
        self.handoffs: dict[str, str] = {}
        self.handed_off: list[tuple[Request, str]] = []
        self.leases: dict[str, tuple[Request, float]] = {}
        # Transfers that must not load when they arrive (aborted, timed out): id -> when.
        self.dropped_transfers: dict[str, float] = {}
        self._source_pools: dict[str, KVCache] = {}  # prefill engines' shared pools, mapped
        self._kv_policy(None)  # a default the model cannot take stops the start
        logger.info("%s", self.startup_summary(time.monotonic() - start))

    def _sliding_window(self) -> int | None:
        """The window past which requests give back their pages: every layer's, when all have
        the same one. A prefill engine keeps its pages, to hand them all to a decode engine."""
        windows = set(self.runner.arch.layer_windows or [None])
        if len(windows) > 1 or self.config.disagg.role == "prefill":
            return None
        return windows.pop()

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
            *([f"  compiled  decode steps of {r.compiled.describe()} (torch.compile, "
               f"{r.compiled.compile_s:.1f} s)"] if r.compiled else []),
            f"  KV cache  {pages} pages x {page_size} tokens = {pages * page_size} tokens, "
            f"{_size(pages * r.kv_spec.page_bytes)} ({r.kv_spec.storage}, "
            f"{r.kv_spec.token_bytes:,} bytes per token), prefix caching "
            f"{'on' if self.block_manager.enable_prefix_caching else 'off'}",
            *([f"  streaming {len(r.head_config.streaming)} KV heads keep sinks "
               f"{r.head_config.sinks} + window {r.head_config.window}: "
               f"{r.streaming_cache.num_pages} pages of their own, "
               f"{_size(r.streaming_cache.num_pages * r.streaming_cache.spec.page_bytes)} "
               f"({r.streaming_cache.spec.token_bytes:,} bytes per token)"]
              if r.head_config else []),
            *([f"  sliding   {int(r.streaming_heads[:, 0].sum())} sliding layers read the last "
               f"{w} tokens, in {r.streaming_cache.num_pages} pages of their own "
               f"({r.streaming_cache.spec.token_bytes:,} bytes per token); a request's pages "
               "before its window go back to the pool"]
              if (w := self.scheduler.streaming and self.scheduler.streaming.sliding_window)
              else []),
            *([f"  sliding   every layer reads the last {w} tokens: a request's pages before "
               "them go back to the pool"] if (w := self.scheduler.sliding_window) else []),
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
        if req.request_id in self.scheduler.requests or req.request_id in self.leases:
            raise ValueError(f"duplicate request id {req.request_id}")
        if params.seed is None and not params.greedy:
            params = dataclasses.replace(params, seed=self.seeds.getrandbits(63))
        if params.prompt_logprobs is not None and not req.output_token_ids:
            self.prompt_logprobs[req.request_id] = []
        request = Request(
            req.request_id, list(req.prompt_token_ids), params, req.arrival_time,
            eos_token_ids=tuple(self.runner.arch.eos_token_ids),
            max_tokens=params.max_tokens or room, output_token_ids=list(req.output_token_ids),
            kv_policy=self._kv_policy(params.kv_policy))
        if req.output_token_ids:  # resumed: its prompt logprobs went out with its first token
            request.num_prompt_logprobs = request.num_prompt_tokens
        self._follow_grammar(request)
        if req.handoff_address is not None and request.kv_policy is None:
            self.handoffs[req.request_id] = req.handoff_address
        self.scheduler.add_request(request)

    def _follow_grammar(self, request: Request) -> None:
        """Start the request's grammar matcher, past the tokens it already has."""
        spec = request.sampling_params.structured_output
        if spec is not None:
            self._structured().add(request.request_id, spec)
            for token in request.output_token_ids:
                self.structured.accept(request.request_id, token)

    def _kv_policy(self, spec: str | None) -> KVPolicy | None:
        """The request's policy, else the engine's. Sliding-window layers mask by KV slot,
        which is no longer the position once tokens are evicted: such models refuse one."""
        policy = parse_kv_policy(self.config.cache.kv_policy if spec is None else spec)
        if policy is not None and any(self.runner.arch.layer_windows):
            raise ValueError("kv_policy is not supported on models with sliding-window layers")
        if policy is not None and self.runner.tp.size > 1:
            raise ValueError("kv_policy is not supported under tensor parallelism yet: a "
                             "rank's attention scores cover its own heads")
        if policy is not None and self.runner.head_config is not None:
            raise ValueError("kv_policy cannot be combined with the server's --kv-head-config "
                             "(its streaming heads already evict)")
        return policy

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        outputs = []
        for rid in request_ids:
            request = self.scheduler.abort(rid)
            if request is None and rid not in self.release_kv([rid]):
                self.dropped_transfers[rid] = time.monotonic()  # if it is still on its way
            self.handoffs.pop(rid, None)
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
        result = (self.executor.execute(sched, self.scheduler.requests, self.structured)
                  if sched.scheduled else RunnerOutput())
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
            address = self.handoffs.pop(r.request_id, None)
            if address is not None and r.finish_reason is None:
                self._lease(r)
                self.handed_off.append((r, address))
            outputs.append(RequestOutput(
                r.request_id, [r.output_token_ids[-1]], r.finish_reason,
                None if r.sampling_params.logprobs is None else [lp],
                r.num_prompt_tokens, r.num_cached_tokens, r.scheduled_time,
                r.first_token_time, self.prompt_logprobs.pop(r.request_id, None),
                r.reported_evictions, address is not None
                and r.finish_reason is None))
        num_prompt = sum(max(0, min(s.request.num_computed_tokens, s.request.num_prompt_tokens)
                             - (s.request.num_computed_tokens - s.num_new_tokens))
                         for s in sched.scheduled)
        return EngineStep(outputs, self._stats(sched, num_prompt, len(outputs)))

    def _lease(self, request: Request) -> None:
        self.scheduler.detach(request)
        if self.structured is not None:
            self.structured.remove(request.request_id)
        self.leases[request.request_id] = (
            request, time.monotonic() + self.config.disagg.kv_lease_timeout)

    def release_kv(self, request_ids: list[str]) -> list[str]:
        """Free the leased pages of these handed-off requests; returns those that had some."""
        released = []
        for rid in request_ids:
            lease = self.leases.pop(rid, None)
            if lease is not None:
                self.block_manager.free(lease[0])
                released.append(rid)
        return released

    def expire_leases(self) -> int:
        """Free the pages of handed-off requests whose lease ran out; also forget dropped
        transfers older than a lease (one that late is not coming)."""
        now = time.monotonic()
        expired = [rid for rid, (_, deadline) in self.leases.items() if deadline <= now]
        for rid in expired:
            logger.warning("the KV lease of request %s expired before the decode engine "
                           "confirmed its pages; they are freed", rid)
        self.release_kv(expired)
        old = now - self.config.disagg.kv_lease_timeout
        for rid in [r for r, t in self.dropped_transfers.items() if t < old]:
            del self.dropped_transfers[rid]
        return len(expired)

    def seconds_to_next_expiry(self) -> float | None:
        if not self.leases:
            return None
        return max(0.0, min(d for _, d in self.leases.values()) - time.monotonic())

    def take_handoffs(self) -> list[tuple[KVTransfer, list, str]]:
        """This step's handed-off requests: header, page bytes and where to send them (the
        pages stay leased here until released). To a decode engine on this host (an `ipc://`
        address) with a shared pool, no bytes: the header names the pages. Under the drop test
        hook, none is sent."""
        handed_off, self.handed_off = self.handed_off, []
        if not handed_off or _hook_on(DROP_KV_TRANSFERS_ENV):
            return []
        out = []
        cache = self.runner.kv_cache
        for r, address in handed_off:
            header = KVTransfer(
                r.request_id, r.prompt_token_ids, r.output_token_ids, r.sampling_params,
                r.arrival_time, r.max_tokens, r.num_computed_tokens,
                max(r.num_cached_tokens, 0), r.scheduled_time, r.first_token_time,
                self.kv_format, len(r.page_ids), time.time())
            if cache.shared_path is not None and address.startswith("ipc://"):
                header.source_pool, header.source_num_pages = cache.shared_path, cache.num_pages
                header.source_page_ids = list(r.page_ids)
                out.append((header, [], address))
            else:
                out.append((header, cache.read_pages(r.page_ids), address))
        return out

    @property
    def kv_format(self) -> str:
        return f"{self.runner.kv_spec.storage}/{self.runner.kv_spec.page_size}"

    def load_handoff(self, header: KVTransfer, frames: list) -> tuple[KVArrival,
                                                                      RequestOutput | None]:
        """Take over a request a prefill engine handed off: its pages are written into this
        cache (past what the prefix cache already holds) and it runs from its next token. No
        free pages (or pages of another format, or unreadable ones): under `kv_load_failure`
        recompute it waits to recompute its tokens here, under fail it ends with an error (the
        returned output). A transfer for a request this
        engine knows or has dropped is ignored."""
        rid, params = header.request_id, header.sampling_params
        if (rid in self.scheduler.requests or self.dropped_transfers.pop(rid, None)
                is not None):
            return KVArrival(rid, "dropped"), None
        request = Request(rid, header.prompt_token_ids, params, header.arrival_time,
                          eos_token_ids=tuple(self.runner.arch.eos_token_ids),
                          max_tokens=header.max_tokens,
                          output_token_ids=list(header.output_token_ids),
                          num_cached_tokens=header.num_cached_tokens,
                          scheduled_time=header.scheduled_time,
                          first_token_time=header.first_token_time,
                          num_prompt_logprobs=len(header.prompt_token_ids))
        if header.kv_format != self.kv_format:
            return self._not_loaded(request, f"its KV pages are {header.kv_format}, this "
                                             f"engine's {self.kv_format}")
        n, ps = header.num_computed_tokens, self.block_manager.page_size
        hits = self.block_manager.match_prefix(request)[:n // ps]
        request.set_computed(len(hits) * ps)
        if _hook_on(REFUSE_KV_LOADS_ENV) or not self.block_manager.allocate(
                request, n - len(hits) * ps, hits):
            return self._not_loaded(request, "the decode engine has no free KV pages for it")
        try:
            num_bytes = load_pages(self.runner.kv_cache, header, frames, request.page_ids,
                                   len(hits), self._source_pools)
        except (OSError, ValueError) as exc:
            self.block_manager.free(request)
            return self._not_loaded(request, f"its KV pages could not be read: {exc}")
        request.set_computed(n)
        self.scheduler.add_running(request)
        self.block_manager.cache_full_pages(request)
        self._follow_grammar(request)
        return KVArrival(rid, "loaded", num_bytes, time.time() - header.sent_time), None

    def _not_loaded(self, request: Request, why: str) -> tuple[KVArrival,
                                                               RequestOutput | None]:
        """A handed-off request whose pages could not be loaded: recomputed here, or ended
        with an error under `--kv-load-failure fail`."""
        request.set_computed(0)
        fail = self.config.disagg.kv_load_failure == "fail"
        logger.warning("request %s: %s; it %s", request.request_id, why,
                       "fails" if fail else "is recomputed")
        if fail:
            return KVArrival(request.request_id, "failed"), RequestOutput(
                request.request_id, [], "abort", error=f"KV handoff failed: {why} "
                                                       f"(--kv-load-failure fail)")
        self._follow_grammar(request)
        self.scheduler.add_request(request)
        return KVArrival(request.request_id, "recompute"), None

    def _stats(self, sched: SchedulerOutput, num_prompt: int, num_generation: int) -> StepStats:
        pools = self._pools()
        total = sum(bm.num_pages for bm in pools)
        return StepStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_kv_pages_total=total, num_kv_pages_used=total - sum(bm.num_free_pages
                                                                   for bm in pools),
            num_scheduled_tokens=sched.num_tokens, num_prompt_tokens=num_prompt,
            num_generation_tokens=num_generation, num_preemptions=sched.num_preemptions,
            prefix_cache_queries=sched.prefix_cache_queries,
            prefix_cache_hits=sched.prefix_cache_hits)

    def _pools(self) -> list[BlockManager]:
        """The page pools the metrics count: under a head config both (the streaming heads'
        pages are narrower)."""
        streaming = self.scheduler.streaming
        return [self.block_manager] + ([streaming.block_manager] if streaming else [])

    def ready_message(self, model_name: str) -> EngineReady:
        r = self.runner
        return EngineReady(model_name, self.max_model_len, str(r.dtype).removeprefix("torch."),
                           self.config.device, r.kv_spec.page_size,
                           r.kv_spec.storage, sum(bm.num_pages for bm in self._pools()),
                           r.arch.vocab_size, r.linear_method.name, r.kernels_chosen())

    def idle_stats(self) -> EngineStep:
        return EngineStep([], self._stats(SchedulerOutput(), 0, 0))


def _size(num_bytes: int) -> str:
    return (f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30
            else f"{num_bytes / 2**20:.1f} MiB")
