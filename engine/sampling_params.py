"""Per-request sampling parameters, validated at construction with errors that name the field."""
from dataclasses import dataclass, field

from scheduler.kv_policy import parse_kv_policy


_WHOLE_VOCABULARY = 2**31


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the output, enforced by a token mask while decoding."""
    kind: str  # "json_schema" | "json_object" | "regex" | "grammar" (EBNF)
    spec: str = ""  # the schema as JSON text, the regex, or the grammar

    def __post_init__(self) -> None:
        if self.kind not in ("json_schema", "json_object", "regex", "grammar"):
            raise ValueError(f"structured_output kind {self.kind!r} is not supported")


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = whole vocabulary
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to the model length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # number of top alternatives; 0 = only the sampled token's
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    structured_output: StructuredOutput | None = None
    # KV eviction for this request (scheduler/kv_policy.py), e.g. "streaming:sinks=4,window=1020";
    # None = the engine's --kv-policy, "none" = no eviction
    kv_policy: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1 or self.top_k >= _WHOLE_VOCABULARY:
            self.top_k = 0  # any top_k past every vocabulary keeps it whole (and fits the wire)
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be -1, 0 or positive"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be >= 1"),
            ("min_tokens", self.min_tokens >= 0, "must be >= 0"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens,
             "must be <= max_tokens"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             "must be in [0, 20]"),
            ("seed", self.seed is None or -2**63 <= self.seed < 2**63, "must fit in int64"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")
        parse_kv_policy(self.kv_policy)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
