"""OpenAI request and response shapes (pydantic), plus the extras vLLM clients send.

Requests ignore unknown fields, as OpenAI's SDKs send fields newer than any server, except the
ones in `UNSUPPORTED`: features we lack, refused with a 400 rather than silently dropped (as are
content parts other than text: `check_text_parts`). Types are checked here, floats finite
(`1e309` parses as infinity); value ranges once by `SamplingParams`.
"""
import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from engine.sampling_params import SamplingParams, StructuredOutput
from server.errors import APIError


def random_id(prefix: str, sep: str = "-") -> str:
    """`chatcmpl-...` for Chat Completions; the Responses API spells its ids `resp_...`."""
    return f"{prefix}{sep}{uuid.uuid4().hex}"


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


def check_text_parts(parts: list, where: str, kinds: tuple[str, ...]) -> None:
    """Content parts must be text parts of `kinds`: an image, audio or file part is a 400
    naming it (`where.j.type`), not silently dropped; the models served here read text only."""
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in kinds:
            raise APIError(f"content part type {kind!r} is not supported: this server takes "
                           f"text only ({', '.join(kinds)} parts)", param=f"{where}.{j}.type")
        if not isinstance(part.get("text"), str):
            raise APIError(f"a {kind} part needs a string `text`", param=f"{where}.{j}.text")


class SamplingRequest(BaseModel):
    """Fields both endpoints share; `max_tokens` None = up to the model length."""
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    # Fields we refuse unless they carry the value that means "not used".
    UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "audio": None, "modalities": ["text"], "prediction": None, "web_search_options": None,
        "functions": None, "function_call": None, "reasoning_effort": None, "suffix": None,
        "best_of": 1, "guided_json": None, "guided_regex": None, "guided_grammar": None,
        "guided_choice": None}

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # Extras of vLLM and llama.cpp (`extra_body` in the openai client).
    top_k: int = 0
    min_p: float = 0.0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    kv_policy: str | None = None  # Tessera's: KV eviction, e.g. "streaming:sinks=4,window=1020"

    def sampling_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                        structured: StructuredOutput | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=stop,
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=dict(self.logit_bias or {}),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, structured_output=structured,
            kv_policy=self.kv_policy,
        )


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: dict[str, str]  # {"name": ...}


CHAT_TEXT_PARTS = ("text", "input_text")  # input_text: the Responses API's name


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """Content as a string; array content joins its text parts (`check_text_parts` has
        refused any other)."""
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content
                           if part.get("type") in CHAT_TEXT_PARTS)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize`: a raw `prompt` or chat `messages` (with the template applied)."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None
    kv_evicted_tokens: int | None = None  # Tessera's: tokens a kv_policy evicted (else null)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: dict | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict | None] | None = None  # vLLM's, shared by the choices


class OmitNone(BaseModel):
    """Serializes without its unset (None) fields, as OpenAI's streamed objects come: a client
    may test `"role" in delta`, and `"tool_calls": null` is not a list to iterate."""

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionDelta(OmitNone):
    name: str | None = None
    arguments: str


class ToolCallDelta(OmitNone):
    """A call's first delta has `id`, `type`, `function.name` and empty arguments; the next
    ones carry argument fragments only."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class DeltaMessage(OmitNone):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: dict | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(OmitNone):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: dict | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[dict | None] | None = None  # vLLM's


class CompletionResponse(BaseModel):
    """Both the whole answer and each streamed chunk: OpenAI uses one shape for both."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tessera"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
