"""Iteration-level scheduling with no prefill or decode phase (vLLM v1's rule).

Every request carries `num_computed_tokens`; a step gives each request the tokens that let it
catch up with `num_tokens` (prompt plus output so far), under `max_num_batched_tokens` and
`max_num_seqs`. Running requests go first, in admission order, so every one of them advances
(a decode token each, or the next prompt chunk); waiting requests are then admitted first come,
first served with what budget is left. Prefill, chunked prefill, decode, prefix-cache hits and
recomputation after preemption are all this one rule. A request that asks for prompt logprobs
takes no prefix-cache hit (cached tokens have no logits) and each of its chunks names the prompt
positions whose logits the runner turns into logprobs.

When pages run out, the most recently admitted running request is preempted: its pages are
freed and it goes back to the front of the queue to recompute its tokens later.

A request under a KV policy (scheduler/kv_policy.py) first evicts what the policy names, before
its pages for the step are counted; the step plan carries the page copies and token moves that
the engine runs before the step writes. Under a head config (scheduler/head_config.py) each
request also holds its streaming heads' tokens in a pool of their own (`StreamingHeads`):
they evict by the streaming rule before every step, and a step's pages are taken from both
pools or from neither. A sliding window gives back a request's pages wholly before it before
each step (`BlockManager.release_before`): the main pool's when every layer has the same window
(Mistral), the second pool's when it holds a model's sliding layers (Gemma).
"""
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from scheduler.block_manager import BlockManager, KVCompaction
from scheduler.kv_policy import StreamingPolicy
from scheduler.request import HeldKV, Request, RequestStatus

logger = logging.getLogger(__name__)


class StepLimits(Protocol):
    """The scheduler's limits (engine/ passes its `SchedulerConfig`; engine/ imports
    scheduler/, never the other way round)."""
    max_num_seqs: int
    max_num_batched_tokens: int


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    samples: bool = False  # this step reaches the request's last known token, so it samples
    prompt_logprob_positions: range = range(0)  # see `Request.prompt_logprob_positions`
    # positions whose attention to the request's held slots the engine returns (snapkv)
    scored_queries: range = range(0)

    @classmethod
    def of(cls, request: Request, num_new_tokens: int) -> "ScheduledRequest":
        start = request.num_computed_tokens
        done = start + num_new_tokens == request.num_tokens
        scored = (request.kv_policy.scored_queries(request.num_prompt_tokens, start,
                                                   num_new_tokens)
                  if request.kv_policy else range(0))
        return cls(request, num_new_tokens, done,
                   request.prompt_logprob_positions(num_new_tokens), scored)


@dataclass
class StreamingHeads:
    """The second page pool and the rule of the heads it holds: a head config's streaming
    heads evict all but sinks + window (`policy`); a model's sliding layers, when others have
    none, give back the pages before their `sliding_window`."""
    block_manager: BlockManager
    policy: StreamingPolicy | None = None
    sliding_window: int | None = None


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up at first admission
    prefix_cache_hits: int = 0
    kv_compaction: KVCompaction = field(default_factory=KVCompaction)
    streaming_compaction: KVCompaction = field(default_factory=KVCompaction)  # its own pool

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: StepLimits, block_manager: BlockManager,
                 streaming: StreamingHeads | None = None, sliding_window: int | None = None):
        self.config = config
        self.block_manager = block_manager
        self.streaming = streaming
        self.sliding_window = sliding_window
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.requests: dict[str, Request] = {}

    def add_request(self, request: Request) -> None:
        if self.streaming is not None:
            request.streaming = HeldKV(request.request_id)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """Admit a request whose KV is already in its pages (handed over by another engine)."""
        request.status = RequestStatus.RUNNING
        self.requests[request.request_id] = request
        self.running.append(request)

    def detach(self, request: Request) -> None:
        """Take a running request out, its pages still held (handed to another engine)."""
        self.running.remove(request)
        request.status = RequestStatus.FINISHED
        del self.requests[request.request_id]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            while not (self._evict(request, out) and self._allocate(request, n)):
                victim = self.running[-1]
                self._preempt(victim)
                out.num_preemptions += 1
                if victim is request:
                    break
            if request.status is RequestStatus.RUNNING:
                out.scheduled.append(ScheduledRequest.of(request, n))
                budget -= n
        while (self.waiting and budget > 0 and not out.num_preemptions
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            first_admission = request.num_cached_tokens < 0
            hits, window_hits = self._prefix_hits(request)
            num_cached = len(hits) * self.block_manager.page_size
            n = min(request.num_tokens - num_cached, budget)
            request.set_computed(num_cached)
            if not self._allocate(request, n, hits, window_hits):
                request.set_computed(0)
                break
            self.waiting.popleft()
            self._release_before_window(request)  # hit pages it will not read
            if first_admission:
                request.num_cached_tokens = num_cached
                request.scheduled_time = time.time()
                out.prefix_cache_queries += request.num_tokens
                out.prefix_cache_hits += num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest.of(request, n))
            budget -= n
        return out

    def _prefix_hits(self, request: Request) -> tuple[list[int], list[int]]:
        """The cached pages of the request's longest prefix in the main pool, and those in the
        second pool when it holds sliding layers: the pages the window of the first query
        after the prefix reads (RELEASED before them). The prefix shrinks until both hit."""
        hits = self.block_manager.match_prefix(request)
        pool = self.streaming
        if pool is None or not hits:
            return hits, []
        page, chain = self.block_manager.page_size, self.block_manager.prefix_chain(request,
                                                                                  len(hits))
        for n in range(len(hits), 0, -1):
            first = max(n * page + 1 - pool.sliding_window, 0) // page
            window_hits = pool.block_manager.match_window(chain[:n], first)
            if window_hits is not None:
                return hits[:n], window_hits
        return [], []

    def _allocate(self, request: Request, n: int, hits: list[int] = (),
                  window_hits: list[int] = ()) -> bool:
        """Pages for `n` more tokens in every pool the request holds tokens in, or none."""
        held = request.streaming
        if held is not None and not self.streaming.block_manager.allocate(held, n, window_hits):
            return False
        if self.block_manager.allocate(request, n, hits):
            return True
        if held is not None:
            self.streaming.block_manager.release_unheld(held)
        return False

    def _evict(self, request: Request, out: SchedulerOutput) -> bool:
        """Evict what the request's policy names; False when a page it must copy first finds
        no free page (nothing changed)."""
        self._release_before_window(request)
        pool = self.streaming
        if (held := request.streaming) is not None and pool.policy is not None:
            slots = pool.policy.slots_to_evict(held.kv_positions[0, 0],
                                               request.num_computed_tokens)
            if slots:  # its pages are its own (no prefix hits): nothing to copy
                out.streaming_compaction.extend(pool.block_manager.evict(held, slots))
        policy = request.kv_policy
        if policy is None:
            return True
        plan = KVCompaction()
        if policy.per_head:
            keep = policy.head_keep(request.attention_scores, request.kv_positions,
                                    request.num_computed_tokens, request.num_prompt_tokens)
            if keep is not None:
                plan = self.block_manager.evict_heads(request, keep)
        elif slots := policy.slots_to_evict(request.kv_positions[0, 0],
                                            request.num_computed_tokens):
            plan = self.block_manager.evict(request, slots)
        if plan is None:
            return False
        if not policy.keeps_scores and request.num_computed_tokens >= request.num_prompt_tokens:
            request.attention_scores = None  # decided once
        out.kv_compaction.extend(plan)
        return True

    def _release_before_window(self, request: Request) -> None:
        """Give back the pages wholly before the window of the step's first query, which
        reads from slot `num_computed + 1 - W` on: the main pool's when every layer has the
        window W, the second pool's when it holds the sliding layers."""
        if self.sliding_window is not None:
            self.block_manager.release_before(
                request, request.num_computed_tokens + 1 - self.sliding_window)
        pool = self.streaming
        if request.streaming is not None and pool.sliding_window is not None:
            pool.block_manager.release_before(
                request.streaming, request.num_computed_tokens + 1 - pool.sliding_window)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        logger.warning("preempted request %s: %d computed tokens lost, will recompute",
                       request.request_id, request.num_computed_tokens)
        self._free(request)
        request.set_computed(0)
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)

    def update(self, out: SchedulerOutput, sampled: dict[str, int],
               attention_scores: dict[str, np.ndarray] | None = None) -> list[Request]:
        """Advance computed tokens, append sampled tokens, add the attention scores the engine
        returned; return requests that finished."""
        finished = []
        for s in out.scheduled:
            request = s.request
            request.advance(s.num_new_tokens)
            if s.scored_queries:
                request.add_attention_scores(attention_scores[request.request_id])
            if s.prompt_logprob_positions:
                request.num_prompt_logprobs = s.prompt_logprob_positions.stop
            named = self.block_manager.cache_full_pages(request)
            if named and request.streaming is not None:
                self.streaming.block_manager.name_pages(request.streaming, named)
            token = sampled.get(request.request_id)
            if token is None:
                continue
            request.output_token_ids.append(token)
            if request.first_token_time is None:
                request.first_token_time = time.time()
            if request.check_finished():
                self._finish(request, request.finish_reason)
                finished.append(request)
        return finished

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, "abort")
        return request

    def _finish(self, request: Request, reason: str) -> None:
        if request in self.running:
            self.running.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self._free(request)
        del self.requests[request.request_id]

    def _free(self, request: Request) -> None:
        self.block_manager.free(request)
        if request.streaming is not None:
            self.streaming.block_manager.free(request.streaming)
