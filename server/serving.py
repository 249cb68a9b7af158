"""From a validated OpenAI request to engine tokens and back to OpenAI responses.

`prepare_*` turn a request into prompt ids and `SamplingParams` (raising `APIError` for a
user's mistake); `generate` runs it through the engine, the detokenizer and the stop strings;
`respond` answers whole or as server-sent events with one chunk builder per endpoint.
"""
import asyncio
from contextlib import aclosing
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from engine.sampling_params import SamplingParams
from server.detokenizer import IncrementalDetokenizer, StopStringChecker
from server.engine_client import EngineClient
from server.errors import APIError, sse_error
from server.metrics import Metrics, RequestTracker
from server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice,
                             ChatCompletionChunk, ChatCompletionRequest,
                             ChatCompletionResponse, CompletionChoice, CompletionRequest,
                             CompletionResponse, DeltaMessage, SamplingRequest, UsageInfo)

# Prompts longer than this many characters are tokenized in a worker thread.
_INLINE_TOKENIZE_CHARS = 2000


@dataclass
class ServingContext:
    client: EngineClient
    tokenizer: object
    metrics: Metrics
    served_model_name: str
    max_model_len: int
    log_prompts: bool = False


@dataclass
class Delta:
    text: str
    finish_reason: str | None
    usage: UsageInfo


def _check_model(ctx: ServingContext, request: SamplingRequest) -> None:
    if request.model != ctx.served_model_name:
        raise APIError(f"The model `{request.model}` does not exist; this server serves "
                       f"`{ctx.served_model_name}`.", status=404, param="model",
                       code="model_not_found")
    if request.n != 1:
        raise APIError("only n=1 is supported", param="n")


def _sampling_params(ctx: ServingContext, request: SamplingRequest, prompt_len: int,
                     max_tokens: int | None, prompt_param: str) -> SamplingParams:
    room = ctx.max_model_len - prompt_len
    if room < 1:
        raise APIError(f"the prompt has {prompt_len} tokens; this model's maximum context "
                       f"length is {ctx.max_model_len}", param=prompt_param)
    if max_tokens is not None and max_tokens > room:
        raise APIError(f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceed "
                       f"the maximum context length {ctx.max_model_len}", param="max_tokens")
    try:
        return request.sampling_params(max_tokens=room if max_tokens is None else max_tokens)
    except ValueError as exc:  # SamplingParams names the field first
        raise APIError(str(exc), param=str(exc).split()[0]) from exc


async def _run_tokenizer(fn: Callable, size: int):
    return await asyncio.to_thread(fn) if size > _INLINE_TOKENIZE_CHARS else fn()


async def prepare_chat(ctx: ServingContext, request: ChatCompletionRequest,
                       ) -> tuple[list[int], SamplingParams]:
    _check_model(ctx, request)
    if not request.messages:
        raise APIError("messages must not be empty", param="messages")
    messages = [{"role": m.role, "content": m.text()} for m in request.messages]
    size = sum(len(m["content"]) for m in messages)
    try:
        ids = await _run_tokenizer(lambda: list(ctx.tokenizer.apply_chat_template(
            messages, add_generation_prompt=request.add_generation_prompt, tokenize=True,
            return_dict=False)), size)
    except Exception as exc:  # a template may reject e.g. the order of roles
        raise APIError(f"chat template failed: {exc}", param="messages") from exc
    max_tokens = request.max_completion_tokens or request.max_tokens
    return ids, _sampling_params(ctx, request, len(ids), max_tokens, "messages")


async def prepare_completion(ctx: ServingContext, request: CompletionRequest,
                             ) -> tuple[list[int], SamplingParams]:
    _check_model(ctx, request)
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise APIError("only one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = await _run_tokenizer(lambda: ctx.tokenizer.encode(prompt), len(prompt))
    else:
        vocab = len(ctx.tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        ids = list(prompt)
    if not ids:
        raise APIError("prompt must not be empty", param="prompt")
    return ids, _sampling_params(ctx, request, len(ids), request.max_tokens, "prompt")


async def generate(ctx: ServingContext, request_id: str, prompt_ids: list[int],
                   params: SamplingParams, arrival: float, prompt_text: str | None = None,
                   ) -> AsyncIterator[Delta]:
    """Text deltas of one request; a stop string ends it here and aborts it in the engine."""
    detok = IncrementalDetokenizer(ctx.tokenizer, prompt_ids)
    stops = StopStringChecker(params.stop, params.include_stop_str_in_output)
    tracker = RequestTracker(ctx.metrics, request_id, arrival,
                             prompt_text if ctx.log_prompts else None)
    usage = UsageInfo(prompt_tokens=len(prompt_ids), total_tokens=len(prompt_ids))
    finish_reason = "abort"  # until the engine or a stop string says otherwise
    try:
        async with aclosing(ctx.client.generate(request_id, prompt_ids, params,
                                                arrival)) as outputs:
            async for output in outputs:
                tracker.on_output(output)
                usage.completion_tokens += len(output.new_token_ids)
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                if output.num_prompt_tokens:
                    usage.prompt_tokens_details = {"cached_tokens": output.num_cached_tokens}
                finished = output.finish_reason is not None
                match = stops.add(detok.add(output.new_token_ids, finished), finished)
                if match.stopped or finished:
                    finish_reason = "stop" if match.stopped else output.finish_reason
                    yield Delta(match.text, finish_reason, usage)
                    return
                if match.text:
                    yield Delta(match.text, None, usage)
    finally:
        tracker.finish(finish_reason, usage.completion_tokens)


async def collect(deltas: AsyncIterator[Delta]) -> Delta:
    text, last = [], None
    async with aclosing(deltas):
        async for last in deltas:
            text.append(last.text)
    return Delta("".join(text), last.finish_reason, last.usage)


def chat_response(ctx: ServingContext, request_id: str, whole: Delta) -> dict:
    return ChatCompletionResponse(
        id=request_id, model=ctx.served_model_name, usage=whole.usage,
        choices=[ChatChoice(message=AssistantMessage(content=whole.text),
                            finish_reason=whole.finish_reason)]).model_dump()


def completion_response(ctx: ServingContext, request_id: str, whole: Delta,
                        echo: str = "") -> dict:
    return CompletionResponse(
        id=request_id, model=ctx.served_model_name, usage=whole.usage,
        choices=[CompletionChoice(text=echo + whole.text, finish_reason=whole.finish_reason)],
    ).model_dump()


class ChatChunks:
    """Chunk builder for chat: a role-only first chunk, then content deltas."""

    def __init__(self, ctx: ServingContext, request_id: str) -> None:
        self.ctx, self.request_id = ctx, request_id

    def _chunk(self, choices: list, usage: UsageInfo | None = None) -> str:
        return ChatCompletionChunk(id=self.request_id, model=self.ctx.served_model_name,
                                   choices=choices, usage=usage).model_dump_json()

    def first(self) -> str:
        return self._chunk([ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))])

    def delta(self, delta: Delta) -> str:
        return self._chunk([ChatChunkChoice(delta=DeltaMessage(content=delta.text),
                                            finish_reason=delta.finish_reason)])

    def usage(self, usage: UsageInfo) -> str:
        return self._chunk([], usage)


class CompletionChunks:
    def __init__(self, ctx: ServingContext, request_id: str, echo: str = "") -> None:
        self.ctx, self.request_id, self.echo = ctx, request_id, echo

    def _chunk(self, choices: list, usage: UsageInfo | None = None) -> str:
        return CompletionResponse(id=self.request_id, model=self.ctx.served_model_name,
                                  choices=choices, usage=usage).model_dump_json()

    def first(self) -> str | None:
        return self._chunk([CompletionChoice(text=self.echo)]) if self.echo else None

    def delta(self, delta: Delta) -> str:
        return self._chunk([CompletionChoice(text=delta.text,
                                             finish_reason=delta.finish_reason)])

    def usage(self, usage: UsageInfo) -> str:
        return self._chunk([], usage)


async def sse_stream(deltas: AsyncIterator[Delta], chunks: ChatChunks | CompletionChunks,
                     include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's event stream: `data: {chunk}` events, then `data: [DONE]`.

    Closing this generator (the client went away) closes `deltas`, which aborts the request.
    """
    try:
        if (first := chunks.first()) is not None:
            yield f"data: {first}\n\n"
        last = None
        async for last in deltas:
            yield f"data: {chunks.delta(last)}\n\n"
        if include_usage and last is not None:
            yield f"data: {chunks.usage(last.usage)}\n\n"
    except Exception as exc:  # the 200 is already sent: report in-band
        yield sse_error(exc)
    finally:
        await deltas.aclose()
    yield "data: [DONE]\n\n"
