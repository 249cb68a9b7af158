"""KV eviction policies: which of a request's cached tokens to drop before a step.

The rule: before each step that schedules a request, its policy names what to evict, and the
step's new tokens are then appended after what is kept.

- `streaming(sinks, window)` (StreamingLLM) looks at the positions the request's KV slots hold
  and keeps the first `sinks` positions and the last `window` computed ones, the same for every
  layer and head: a query at position p in a chunk that starts at position c attends to
  positions `< sinks`, `c - window .. c - 1` and the chunk's own `c .. p`. The memory a request
  holds stays at `sinks + window` tokens plus one step's chunk.
- `snapkv(budget | percent, window, pool)` (SnapKV) asks the engine for the attention that the
  prompt's last `window` queries pay each key (summed over those queries and over the query
  heads of each KV head, chunk by chunk as the prompt is computed). Once the prompt is whole,
  each layer's KV head keeps the `window` observation tokens plus the keys with the highest
  scores max-pooled over `pool` neighbours, `budget` tokens in all (or `percent` of the prompt):
  as many for every head, so heads share the page table while each slot holds its own head's
  token. Generated tokens are all kept.

Policies are named on the command line and per request as `NAME:key=value,...`
(`streaming:sinks=4,window=1020`, `snapkv:percent=25`); `none` turns eviction off.
"""
from dataclasses import dataclass, fields

import numpy as np


@dataclass(frozen=True)
class StreamingPolicy:
    """Attention sinks plus a recent window (Xiao et al., StreamingLLM)."""
    sinks: int = 4
    window: int = 1020

    name = "streaming"

    def __post_init__(self) -> None:
        if self.sinks < 0:
            raise ValueError(f"kv_policy streaming: sinks must be >= 0, got {self.sinks}")
        if self.window < 1:
            raise ValueError(f"kv_policy streaming: window must be >= 1, got {self.window}")

    def prefix_hit_limit(self, num_prompt_tokens: int) -> int:
        """Prompt tokens a prefix-cache hit may cover: no more than are kept, so nothing is
        evicted before the first step."""
        return self.sinks + self.window

    def held_tokens(self, num_tokens: int) -> int:
        """The most of `num_tokens` computed tokens a request holds before a step."""
        return min(num_tokens, self.sinks + self.window)

    def slots_to_evict(self, kv_positions: list[int], num_computed_tokens: int) -> list[int]:
        """Slots whose position is neither a sink nor among the last `window` computed."""
        oldest_recent = num_computed_tokens - self.window
        return [slot for slot, pos in enumerate(kv_positions) if self.sinks <= pos < oldest_recent]

    def scored_queries(self, num_prompt_tokens: int, start: int, num_new: int) -> range:
        return range(0)  # decides from positions alone


@dataclass(frozen=True)
class SnapKVPolicy:
    """Prompt compression by the observation window's attention (Li et al., SnapKV)."""
    budget: int = 0  # tokens kept per KV head, the window included
    percent: int = 0  # ... or this share of the prompt
    window: int = 32
    pool: int = 7

    name = "snapkv"

    def __post_init__(self) -> None:
        if (self.budget > 0) == (self.percent > 0) or self.budget < 0 or self.percent < 0:
            raise ValueError("kv_policy snapkv: give one of budget (tokens) or percent, > 0")
        if self.percent > 100:
            raise ValueError(f"kv_policy snapkv: percent must be <= 100, got {self.percent}")
        if self.window < 1 or self.pool < 1 or self.pool % 2 == 0:
            raise ValueError("kv_policy snapkv: window must be >= 1 and pool odd and >= 1")

    def kept(self, num_prompt_tokens: int) -> int:
        """Prompt tokens each KV head keeps, never fewer than the window."""
        budget = self.budget or num_prompt_tokens * self.percent // 100
        return min(num_prompt_tokens, max(budget, self.window))

    def prefix_hit_limit(self, num_prompt_tokens: int) -> int:
        """The window's queries must be computed to be scored: they are never hits."""
        return num_prompt_tokens - self.window

    def held_tokens(self, num_tokens: int) -> int:
        return self.kept(num_tokens)

    def slots_to_evict(self, kv_positions: list[int], num_computed_tokens: int) -> list[int]:
        return []  # evicts per head, once (`head_keep`)

    def scored_queries(self, num_prompt_tokens: int, start: int, num_new: int) -> range:
        """Positions among a step's `start .. start + num_new - 1` whose attention is recorded."""
        return range(max(start, num_prompt_tokens - self.window),
                     min(start + num_new, num_prompt_tokens))

    def head_keep(self, scores: np.ndarray) -> np.ndarray:
        """`scores[L, KvH, n]` over the prompt's n keys -> each head's kept slots (sorted)
        `[L, KvH, kept(n)]`: the window's, then the best pooled scores before it."""
        n = scores.shape[-1]
        kept, window = self.kept(n), min(self.window, n)
        half = self.pool // 2
        padded = np.pad(scores[..., :n - window], [(0, 0), (0, 0), (half, half)],
                        constant_values=-np.inf)
        pooled = np.lib.stride_tricks.sliding_window_view(padded, self.pool, -1).max(-1)
        best = np.argpartition(-pooled, kept - window - 1, -1)[..., :kept - window] \
            if kept > window else np.empty(pooled.shape[:2] + (0,), dtype=np.int64)
        recent = np.broadcast_to(np.arange(n - window, n), pooled.shape[:2] + (window,))
        return np.sort(np.concatenate([best, recent], -1), -1)


KVPolicy = StreamingPolicy | SnapKVPolicy
POLICIES: dict[str, type[StreamingPolicy] | type[SnapKVPolicy]] = {
    p.name: p for p in (StreamingPolicy, SnapKVPolicy)}


def parse_kv_policy(spec: str | None) -> KVPolicy | None:
    """`NAME:key=value,...` -> a policy; `none` (or None, or "") -> no eviction. Errors name the
    policy, the key and what is allowed."""
    if spec is None or spec.strip() in ("", "none"):
        return None
    name, _, args = spec.strip().partition(":")
    if name not in POLICIES:
        raise ValueError(f"kv_policy must be none or one of {', '.join(POLICIES)} "
                         f"(NAME:key=value,...), got {spec!r}")
    cls = POLICIES[name]
    allowed = {f.name for f in fields(cls)}
    values: dict[str, int] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        if key not in allowed or not eq:
            raise ValueError(f"kv_policy {name} takes {', '.join(sorted(allowed))} as "
                             f"key=value, got {item!r}")
        try:
            values[key] = int(value)
        except ValueError:
            raise ValueError(f"kv_policy {name}: {key} must be an integer, got {value!r}") \
                from None
    return cls(**values)
