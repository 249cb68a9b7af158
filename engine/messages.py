"""What crosses the wire between the API process and the engine-core process.

API -> engine (one PUSH socket): `AddRequest` or `AbortRequests`.
Engine -> API (one PUSH socket): `EngineReady` once the weights are loaded (or `EngineFailed`
if they cannot be), then an `EngineStep` for every step that produced output and one more
whenever the engine goes idle.

Messages are typed msgspec structs in MessagePack behind a version prefix (`encode`, `decode`),
not pickle, which runs whatever it loads: a message of another version, of an unknown type or
with a wrong field decodes to a `WireError`, which the receiver logs and drops.
"""
import msgspec

from engine.sampling_params import SamplingParams

WIRE_VERSION = 1
_PREFIX = b"tessera/%d " % WIRE_VERSION


class WireError(ValueError):
    """Bytes that are not a message of this version."""


class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float


class AbortRequests(msgspec.Struct, tag=True):
    request_ids: list[str]


class TokenLogprobs(msgspec.Struct):
    """Log-probability of one token (sampled, or a prompt token given the tokens before it),
    its rank in the distribution (1 = most likely) and the top alternatives (token id, logprob),
    most likely first."""
    logprob: float
    rank: int
    top: list[tuple[int, float]] = []


class RequestOutput(msgspec.Struct):
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


class StepStats(msgspec.Struct):
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


class EngineStep(msgspec.Struct, tag=True):
    outputs: list[RequestOutput]
    stats: StepStats


class EngineReady(msgspec.Struct, tag=True):
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


class EngineFailed(msgspec.Struct, tag=True):
    """Sent instead of `EngineReady` by an engine that cannot start; then it exits."""
    reason: str  # one line: `Type: message`


Message = AddRequest | AbortRequests | EngineStep | EngineReady | EngineFailed
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _PREFIX + _encoder.encode(message)


def decode(data: bytes) -> Message:
    if not data.startswith(_PREFIX):
        raise WireError(f"not a tessera/{WIRE_VERSION} message: {bytes(data[:16])!r}")
    try:
        return _decoder.decode(memoryview(data)[len(_PREFIX):])
    except (msgspec.DecodeError, ValueError, TypeError) as exc:
        raise WireError(f"malformed message: {exc}") from exc
