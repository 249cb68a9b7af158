"""KV eviction policies: which of a request's cached tokens to drop before a step.

The rule: a policy looks at the positions a request's KV slots hold just before each step
that schedules it and names the slots to evict; the step's new tokens are then appended after
what is kept. `streaming(sinks, window)` (StreamingLLM) keeps the first `sinks` positions and
the last `window` computed ones, so a query at position p in a chunk that starts at position c
attends to positions `< sinks`, `c - window .. c - 1` and the chunk's own `c .. p`. The
memory a request holds stays at `sinks + window` tokens plus one step's chunk.

Policies are named on the command line and per request as `NAME:key=value,...`
(`streaming:sinks=4,window=1020`); `none` turns eviction off.
"""
from dataclasses import dataclass, fields


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

    @property
    def max_kept_tokens(self) -> int:
        """The most tokens a request keeps before a step (a prefix-cache hit longer than this
        would have to be evicted at once; it is matched only this far)."""
        return self.sinks + self.window

    def slots_to_evict(self, kv_positions: list[int], num_computed_tokens: int) -> list[int]:
        """Slots whose position is neither a sink nor among the last `window` computed."""
        oldest_recent = num_computed_tokens - self.window
        return [slot for slot, pos in enumerate(kv_positions) if self.sinks <= pos < oldest_recent]

    def spec(self) -> str:
        return f"{self.name}:sinks={self.sinks},window={self.window}"


KVPolicy = StreamingPolicy
POLICIES: dict[str, type[KVPolicy]] = {StreamingPolicy.name: StreamingPolicy}


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
