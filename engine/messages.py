"""What crosses the wire between the API process and the engine-core process (pickled).

API -> engine (one PUSH socket): `AddRequest` or `AbortRequests`.
Engine -> API (one PUSH socket): `EngineReady` once the weights are loaded (or `EngineFailed`
if they cannot be), then an `EngineStep` for every step that produced output and one more
whenever the engine goes idle.
"""
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float


@dataclass
class AbortRequests:
    request_ids: list[str]


@dataclass
class TokenLogprobs:
    """Log-probability of one token (sampled, or a prompt token given the tokens before it),
    its rank in the distribution (1 = most likely) and the top alternatives (token id, logprob),
    most likely first."""
    logprob: float
    rank: int
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """New tokens of one request since its last output; `finish_reason` set on the last one."""
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    new_logprobs: list[TokenLogprobs] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # Timestamps (time.time()) the engine saw, for the API process's latency metrics.
    scheduled_time: float | None = None  # first scheduled (end of queueing)
    first_token_time: float | None = None
    # On the first output of a request that asked for prompt logprobs: those of prompt tokens
    # 1, 2, ... (token 0 has no context, so none).
    prompt_logprobs: list[TokenLogprobs] | None = None
    # Under a kv_policy: the tokens it has evicted from the request's KV so far.
    num_evicted_tokens: int | None = None


@dataclass
class StepStats:
    num_running: int
    num_waiting: int
    num_kv_pages_total: int
    num_kv_pages_used: int  # held by live requests; cached-but-free pages count as free
    num_scheduled_tokens: int
    num_prompt_tokens: int  # of this step
    num_generation_tokens: int
    num_preemptions: int  # of this step
    prefix_cache_queries: int  # tokens looked up in this step's admissions
    prefix_cache_hits: int


@dataclass
class EngineStep:
    outputs: list[RequestOutput]
    stats: StepStats


@dataclass
class EngineReady:
    model_name: str
    max_model_len: int
    dtype: str
    device: str
    page_size: int
    kv_cache_dtype: str
    num_kv_pages: int
    vocab_size: int
    quantization: str  # the linear method serving the weights ("none", "gguf", ...)
    kernels: dict[str, str]  # quantized layer shape -> which CPU kernel runs which step size


@dataclass
class EngineFailed:
    """Sent instead of `EngineReady` by an engine that cannot start; then it exits."""
    reason: str  # one line: `Type: message`
