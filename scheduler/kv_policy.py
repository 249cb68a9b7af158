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
- `h2o(budget | percent, recent)` (H2O) asks for the attention every query pays each held key
  and accumulates it per slot. A request holding more than `budget` tokens keeps, per layer and
  KV head, its `recent` most recent positions (default half the budget) and then the slots with
  the most attention so far, `budget` in all (again as many for every head).

A policy answers `slots_to_evict` (the same for every layer and head) or, when `per_head`,
`head_keep` (the slots each layer's KV head keeps, from the scores the engine returned for its
`scored_queries`; `keeps_scores` when it decides again at later steps), and says how much of a
prompt a prefix-cache hit may cover.

Policies are named on the command line and per request as `NAME:key=value,...`
(`streaming:sinks=4,window=1020`, `snapkv:percent=25`, `h2o:budget=512`); `none` turns eviction
off.
"""
from dataclasses import dataclass, fields

import numpy as np


@dataclass(frozen=True)
class StreamingPolicy:
    """Attention sinks plus a recent window (Xiao et al., StreamingLLM)."""
    sinks: int = 4
    window: int = 1020

    name = "streaming"
    per_head = False
    keeps_scores = False

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

    def slots_to_evict(self, positions: np.ndarray, num_computed_tokens: int) -> list[int]:
        """Slots whose position (`positions[slots]`) is neither a sink nor among the last
        `window` computed."""
        recent = num_computed_tokens - self.window
        return np.nonzero((positions >= self.sinks) & (positions < recent))[0].tolist()

    def scored_queries(self, num_prompt_tokens: int, start: int, num_new: int) -> range:
        return range(0)  # decides from positions alone


def _budget(budget: int, percent: int, num_prompt_tokens: int) -> int:
    return budget or num_prompt_tokens * percent // 100


def _check_budget(name: str, budget: int, percent: int) -> None:
    if (budget > 0) == (percent > 0) or budget < 0 or percent < 0:
        raise ValueError(f"kv_policy {name}: give one of budget (tokens) or percent, > 0")
    if percent > 100:
        raise ValueError(f"kv_policy {name}: percent must be <= 100, got {percent}")


def _top(priority: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` highest values along the last axis, sorted."""
    if count >= priority.shape[-1]:
        return np.broadcast_to(np.arange(priority.shape[-1]), priority.shape).copy()
    return np.sort(np.argpartition(-priority, count - 1, -1)[..., :count], -1)


@dataclass(frozen=True)
class SnapKVPolicy:
    """Prompt compression by the observation window's attention (Li et al., SnapKV)."""
    budget: int = 0  # tokens kept per KV head, the window included
    percent: int = 0  # ... or this share of the prompt
    window: int = 32
    # SnapKV's 7 loses the end of a five-digit passkey on SmolLM2 (digits are single tokens,
    # and the window's queries look at the needle's start): 15 keeps it (bench kv-quality)
    pool: int = 15

    name = "snapkv"
    per_head = True
    keeps_scores = False  # decides once, when the prompt is whole

    def __post_init__(self) -> None:
        _check_budget(self.name, self.budget, self.percent)
        if self.window < 1 or self.pool < 1 or self.pool % 2 == 0:
            raise ValueError("kv_policy snapkv: window must be >= 1 and pool odd and >= 1")

    def kept(self, num_prompt_tokens: int) -> int:
        """Prompt tokens each KV head keeps, never fewer than the window."""
        budget = _budget(self.budget, self.percent, num_prompt_tokens)
        return min(num_prompt_tokens, max(budget, self.window))

    def prefix_hit_limit(self, num_prompt_tokens: int) -> int:
        """The window's queries must be computed to be scored: they are never hits."""
        return num_prompt_tokens - self.window

    def held_tokens(self, num_tokens: int) -> int:
        return self.kept(num_tokens)

    def slots_to_evict(self, positions: np.ndarray, num_computed_tokens: int) -> list[int]:
        return []  # evicts per head (`head_keep`)

    def scored_queries(self, num_prompt_tokens: int, start: int, num_new: int) -> range:
        """Positions among a step's `start .. start + num_new - 1` whose attention is recorded."""
        return range(max(start, num_prompt_tokens - self.window),
                     min(start + num_new, num_prompt_tokens))

    def head_keep(self, scores: np.ndarray | None, positions: np.ndarray,
                  num_computed_tokens: int, num_prompt_tokens: int) -> np.ndarray | None:
        """Once the prompt is whole, `scores[L, KvH, n]` over its n held keys -> each head's
        slots to keep (sorted) `[L, KvH, kept(n)]`: the window's, then the best pooled scores
        before it. None while there is nothing to decide."""
        if scores is None or num_computed_tokens < num_prompt_tokens:
            return None
        n = scores.shape[-1]
        kept, window = self.kept(n), min(self.window, n)
        if kept >= n:
            return None
        half = self.pool // 2
        padded = np.pad(scores[..., :n - window], [(0, 0), (0, 0), (half, half)],
                        constant_values=-np.inf)
        pooled = np.lib.stride_tricks.sliding_window_view(padded, self.pool, -1).max(-1)
        best = _top(pooled, kept - window)
        recent = np.broadcast_to(np.arange(n - window, n), pooled.shape[:2] + (window,))
        return np.concatenate([best, recent], -1)


@dataclass(frozen=True)
class H2OPolicy:
    """Heavy hitters plus recent tokens (Zhang et al., H2O)."""
    budget: int = 0  # tokens kept per KV head
    percent: int = 0  # ... or this share of the prompt
    recent: int = 0  # of them the most recent; 0 = half

    name = "h2o"
    per_head = True
    keeps_scores = True

    def __post_init__(self) -> None:
        _check_budget(self.name, self.budget, self.percent)
        if self.recent < 0 or (self.budget and self.recent > self.budget):
            raise ValueError("kv_policy h2o: recent must be >= 0 and <= budget")

    def kept(self, num_prompt_tokens: int) -> int:
        return max(_budget(self.budget, self.percent, num_prompt_tokens), self.recent, 1)

    def prefix_hit_limit(self, num_prompt_tokens: int) -> int:
        return 0  # every query's attention counts: none may be skipped

    def held_tokens(self, num_tokens: int) -> int:
        return min(num_tokens, self.kept(num_tokens))

    def slots_to_evict(self, positions: np.ndarray, num_computed_tokens: int) -> list[int]:
        return []  # evicts per head (`head_keep`)

    def scored_queries(self, num_prompt_tokens: int, start: int, num_new: int) -> range:
        return range(start, start + num_new)  # all of them

    def head_keep(self, scores: np.ndarray | None, positions: np.ndarray,
                  num_computed_tokens: int, num_prompt_tokens: int) -> np.ndarray | None:
        """Past the budget, each head's slots to keep: its most recent positions, then the
        highest attention accumulated so far. None within the budget."""
        kept = self.kept(num_prompt_tokens)
        if scores is None or scores.shape[-1] <= kept:
            return None
        recent = self.recent or kept // 2
        is_recent = np.broadcast_to(positions, scores.shape) >= num_computed_tokens - recent
        return _top(np.where(is_recent, np.inf, scores), kept)


KVPolicy = StreamingPolicy | SnapKVPolicy | H2OPolicy
POLICIES: dict[str, type[KVPolicy]] = {p.name: p for p in (StreamingPolicy, SnapKVPolicy,
                                                            H2OPolicy)}


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
