"""A request as the scheduler sees it: tokens, how many are computed, which pages hold them."""
import enum
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from scheduler.kv_policy import KVPolicy


class SamplingRules(Protocol):
    """What the scheduler reads of a request's sampling parameters (engine/ passes its
    `SamplingParams`; engine/ imports scheduler/, never the other way round)."""
    min_tokens: int
    stop_token_ids: list[int]
    ignore_eos: bool
    prompt_logprobs: int | None


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # pages freed; waits again and recomputes its tokens
    FINISHED = "finished"


@dataclass(eq=False)
class HeldKV:
    """What a request holds in a second page pool: its streaming heads' sinks and window under
    a head config (scheduler/head_config.py). The block manager takes it as it takes a request."""
    request_id: str
    page_ids: list[int] = field(default_factory=list)
    num_kv_tokens: int = 0
    kv_positions: np.ndarray = field(default_factory=lambda: np.empty((1, 1, 0), np.int64))

    def set_computed(self, num_tokens: int) -> None:
        self.num_kv_tokens = num_tokens
        self.kv_positions = np.arange(num_tokens)[None, None]

    def advance(self, start: int, num_tokens: int) -> None:
        """Tokens `start .. start + num_tokens - 1` were written after the held ones."""
        self.kv_positions = np.concatenate(
            [self.kv_positions, np.arange(start, start + num_tokens)[None, None]], -1)
        self.num_kv_tokens += num_tokens


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingRules
    arrival_time: float = 0.0
    eos_token_ids: tuple[int, ...] = ()
    max_tokens: int = 16  # resolved against the model length at admission
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V were computed: the next one's position
    # Tokens held in KV slots (the first `num_kv_tokens` slots of `page_ids`): fewer than
    # the computed ones once a `kv_policy` evicts, equal otherwise.
    num_kv_tokens: int = 0
    kv_policy: KVPolicy | None = None
    # Under a kv_policy, the position each KV slot holds, `[1, 1, slots]` while every layer and
    # head holds the same, `[layers, kv_heads, slots]` after a per-head eviction. Eviction moves
    # tokens into the slots it empties, so slot order is not position order (attention does
    # not depend on it).
    kv_positions: np.ndarray = field(default_factory=lambda: np.empty((1, 1, 0), np.int64))
    # Under snapkv and h2o: the attention the policy's scored queries paid each held slot,
    # `[layers, kv_heads, slots]`, summed step by step (moved with the tokens it scores).
    attention_scores: np.ndarray | None = None
    page_ids: list[int] = field(default_factory=list)
    # Under a head config: the streaming heads' tokens, in their own pool
    streaming: HeldKV | None = None
    num_cached_tokens: int = -1  # prompt tokens hit in the prefix cache; -1 until first admitted
    # Prompt positions < this have had their next token's logprob computed (prompt_logprobs);
    # kept across preemption, so a recomputed chunk does not produce them twice.
    num_prompt_logprobs: int = 0
    finish_reason: str | None = None
    scheduled_time: float | None = None
    first_token_time: float | None = None

    @property
    def num_evicted_tokens(self) -> int:
        return self.num_computed_tokens - self.num_kv_tokens

    @property
    def reported_evictions(self) -> int | None:
        """What usage reports as evicted: the tokens its kv_policy evicted, or those its
        streaming heads did under a head config (each of them); None when nothing evicts."""
        if self.streaming is not None:
            return self.num_computed_tokens - self.streaming.num_kv_tokens
        return self.num_evicted_tokens if self.kv_policy else None

    def set_computed(self, num_tokens: int) -> None:
        """Start over from `num_tokens` computed and held tokens (admission, preemption)."""
        self.num_computed_tokens = self.num_kv_tokens = num_tokens
        self.kv_positions = np.arange(num_tokens if self.kv_policy else 0)[None, None]
        self.attention_scores = None
        if self.streaming is not None:
            self.streaming.set_computed(num_tokens)

    def add_attention_scores(self, scores: np.ndarray) -> None:
        """Add a step's scores; the slots grow by the step's tokens."""
        old = self.attention_scores
        if old is not None:
            scores = scores.copy()
            scores[..., :old.shape[-1]] += old
        self.attention_scores = scores

    def advance(self, num_tokens: int) -> None:
        """`num_tokens` more were computed and written after the held ones."""
        if self.kv_policy:
            new = np.arange(self.num_computed_tokens, self.num_computed_tokens + num_tokens)
            self.kv_positions = np.concatenate([self.kv_positions, np.broadcast_to(
                new, self.kv_positions.shape[:2] + new.shape)], -1)
        if self.streaming is not None:
            self.streaming.advance(self.num_computed_tokens, num_tokens)
        self.num_computed_tokens += num_tokens
        self.num_kv_tokens += num_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens `start:end` of prompt + output, without copying the whole history."""
        p = len(self.prompt_token_ids)
        return (self.prompt_token_ids[start:min(end, p)]
                + self.output_token_ids[max(start - p, 0):max(end - p, 0)])

    @property
    def skip_reading_prefix_cache(self) -> bool:
        """Prompt logprobs need the logits of every prompt position; a cache hit has none."""
        return self.sampling_params.prompt_logprobs is not None

    def prompt_logprob_positions(self, num_new_tokens: int) -> range:
        """Positions among the next `num_new_tokens` to compute whose logits give a prompt
        token's logprob (position p predicts token p + 1), not given before; empty unless
        prompt logprobs were asked for."""
        if self.sampling_params.prompt_logprobs is None:
            return range(0)
        return range(max(self.num_computed_tokens, self.num_prompt_logprobs),
                     min(self.num_computed_tokens + num_new_tokens, self.num_prompt_tokens - 1))

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def check_finished(self) -> bool:
        """Apply stop token ids, EOS and max_tokens after a token was appended."""
        params, n = self.sampling_params, len(self.output_token_ids)
        last = self.output_token_ids[-1]
        if n >= params.min_tokens and (last in params.stop_token_ids or (
                not params.ignore_eos and last in self.eos_token_ids)):
            self.finish_reason = "stop"
        elif n >= self.max_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None
