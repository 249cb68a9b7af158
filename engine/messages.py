"""What crosses the wire between the API process and the engine-core process.

API -> engine (one PUSH socket): `AddRequest`, `AbortRequests` or `ReleaseKV`.
Engine -> API (one PUSH socket): `EngineReady` once the weights are loaded (or `EngineFailed`
if they cannot be), then an `EngineStep` for every step that produced output and one more
whenever the engine goes idle.
Prefill engine -> decode engine (the decode engine's KV socket): a `KVTransfer` header, then
one frame per KV pool stack holding the request's pages, or, on one host, none: the header
names the pages in the sender's shared pool (see `engine/kv_transfer.py`).

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
    # Tokens already streamed to the client: a request resumed on another engine after its
    # handoff failed recomputes prompt and these, then goes on sampling.
    output_token_ids: list[int] = []
    # On a prefill engine: after its first token, hand the request with its pages to the
    # decode engine whose KV socket is here (a request under a kv_policy stays).
    handoff_address: str | None = None


class AbortRequests(msgspec.Struct, tag=True):
    request_ids: list[str]


class ReleaseKV(msgspec.Struct, tag=True):
    """To a prefill engine: the decode engine has these handed-off requests (or gave up on
    them), so their leased pages go back to the pool."""
    request_ids: list[str]


class KVTransfer(msgspec.Struct, tag=True):
    """A request handed from a prefill engine to a decode engine with its state: tokens, the
    sampling params with the seed the prefill engine resolved (the sampler's noise depends only
    on seed and output position), and the KV of `num_computed_tokens` tokens in
    `num_pages` pages of the sender's format. A grammar's state and penalty counts follow from
    the tokens."""
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    max_tokens: int
    num_computed_tokens: int
    num_cached_tokens: int
    scheduled_time: float | None
    first_token_time: float | None
    kv_format: str  # `KVCacheSpec.storage` and page size, e.g. "bfloat16/16"; checked
    num_pages: int
    sent_time: float
    # On one host, no frames: the pages are `source_page_ids` of the sender's shared pool
    # (`KVCache.shared_path`, `source_num_pages` pages), leased until released.
    source_pool: str | None = None
    source_num_pages: int = 0
    source_page_ids: list[int] = []


class KVArrival(msgspec.Struct):
    """A decode engine's word on a transfer: "loaded" (the request runs here now),
    "recompute" (no free pages: it waits here to recompute), "failed" (no free pages under
    --kv-load-failure fail) or "dropped" (late or aborted); `seconds` from send to loaded."""
    request_id: str
    outcome: str
    num_bytes: int = 0
    seconds: float = 0.0


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
    # A prefill engine handed the request to a decode engine after this output.
    handed_off: bool = False
    # The request ended in an error of the engine's (finish_reason "abort"): said to the client.
    error: str | None = None


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
    kv_arrivals: list[KVArrival] = []
    num_lease_expiries: int = 0


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


Message = (AddRequest | AbortRequests | ReleaseKV | KVTransfer | EngineStep | EngineReady
           | EngineFailed)
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
