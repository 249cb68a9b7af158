"""From a validated OpenAI request to engine requests, and their outputs back as text deltas.

`prepare_*` turn a request into prompt ids and `SamplingParams` (raising `APIError` for a
user's mistake); `fan_out` starts one engine request per prompt and choice (`n`) and
interleaves their `Delta`s, each tagged with its choice index; `generate` runs one engine
request through the detokenizer and the stop strings.
"""
import asyncio
import ctypes
import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from engine.messages import TokenLogprobs
from engine.sampling_params import SamplingParams, StructuredOutput
from server.admission import Admission, Slot
from engine.detokenizer import IncrementalDetokenizer, StopStringChecker
from server.errors import APIError
from server.logprobs import TokenTexts
from server.metrics import Metrics, RequestTracker
from server.protocol import (CHAT_TEXT_PARTS, ChatCompletionRequest, CompletionRequest,
                             SamplingRequest, TokenizeRequest, UsageInfo, check_text_parts)
from server.structured import response_format_output
from server.supervisor import EngineSupervisor
from server.tools import ToolPlan, template_inputs

# Work on more items than this (prompt characters, token ids) runs in a worker thread, so a
# big prompt never stalls the event loop, and with it `/health` and every stream; below it the
# thread hop costs more than the work.
_INLINE_WORK_ITEMS = 2000
# After work this big the freed memory goes back to the OS. Tokenizing keeps ~200 bytes of
# scratch a token (offsets, token strings) that glibc otherwise holds in the worker thread's
# arena: measured, a 1.7M-token prompt left the process 370 MB larger; malloc_trim returned it.
_TRIM_AFTER_ITEMS = 2**20
_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 100


@dataclass
class ServingContext:
    engine: EngineSupervisor
    admission: Admission
    tokenizer: object
    metrics: Metrics
    served_model_name: str
    max_model_len: int
    vocab_size: int
    log_prompts: bool = False
    chat_template: str | None = None  # --chat-template, else the tokenizer's
    takes_kv_policy: bool = True  # False under --kv-head-config: its streaming heads evict

    def __post_init__(self) -> None:
        self.token_texts = TokenTexts(self.tokenizer)


@dataclass
class Delta:
    """New text of one choice, with the tokens (and their logprobs) it came from."""
    text: str
    finish_reason: str | None
    usage: UsageInfo
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # Prompt tokens 1.. (see `RequestOutput.prompt_logprobs`), on a choice's first delta.
    prompt_logprobs: list[TokenLogprobs] | None = None


def _check_common(ctx: ServingContext, request: SamplingRequest) -> StructuredOutput | None:
    """Checks both endpoints share; returns the `response_format` constraint."""
    if request.model != ctx.served_model_name:
        raise APIError(f"The model `{request.model}` does not exist; this server serves "
                       f"`{ctx.served_model_name}`.", status=404, param="model",
                       code="model_not_found")
    if request.stream_options is not None and not request.stream:
        raise APIError("stream_options is only allowed with stream: true",
                       param="stream_options")
    if request.prompt_logprobs is not None and request.stream:  # as vLLM
        raise APIError("prompt_logprobs is not available with stream: true",
                       param="prompt_logprobs")
    bias = request.logit_bias or {}
    outside = [str(t) for t in bias if not 0 <= t < ctx.vocab_size]
    if outside:
        raise APIError(f"logit_bias tokens {', '.join(outside)} are outside the vocabulary "
                       f"[0, {ctx.vocab_size})", param="logit_bias")
    extreme = [f"{t}: {b}" for t, b in bias.items() if not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS]
    if extreme:
        raise APIError(f"logit_bias values must be in [-100, 100], got {', '.join(extreme)}",
                       param="logit_bias")
    if request.kv_policy not in (None, "none") and not ctx.takes_kv_policy:
        raise APIError("kv_policy cannot be combined with this server's --kv-head-config (its "
                       "streaming heads already evict)", param="kv_policy")
    if any(not 0 <= t < ctx.vocab_size for t in request.stop_token_ids or []):
        raise APIError(f"stop_token_ids must be in [0, {ctx.vocab_size})",
                       param="stop_token_ids")
    return response_format_output(request.response_format)


def _sampling_params(ctx: ServingContext, request: SamplingRequest, prompt_len: int,
                     max_tokens: int | None, prompt_param: str, logprobs: int | None,
                     prompt_logprobs: int | None, structured: StructuredOutput | None
                     ) -> SamplingParams:
    room = ctx.max_model_len - prompt_len
    if room < 1:
        raise APIError(f"the prompt has {prompt_len} tokens; this model's maximum context "
                       f"length is {ctx.max_model_len}", param=prompt_param)
    if max_tokens is not None and max_tokens > room:
        raise APIError(f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceed "
                       f"the maximum context length {ctx.max_model_len}", param="max_tokens")
    return _checked(lambda: request.sampling_params(
        room if max_tokens is None else max_tokens, logprobs, prompt_logprobs, structured))


def _checked(make: Callable[[], SamplingParams]) -> SamplingParams:
    try:
        return make()
    except ValueError as exc:  # SamplingParams names the field first
        raise APIError(str(exc), param=str(exc).split()[0]) from exc


async def run_off_loop(fn: Callable, size: int):
    """`fn()` (tokenizing, templating, rendering `size` items), in a thread when it is big."""
    if size <= _INLINE_WORK_ITEMS:
        return fn()
    try:
        return await asyncio.to_thread(fn)
    finally:
        if size > _TRIM_AFTER_ITEMS and _malloc_trim is not None:
            await asyncio.to_thread(_malloc_trim, 0)


async def chat_prompt_ids(ctx: ServingContext, request: ChatCompletionRequest | TokenizeRequest,
                          plan: ToolPlan | None = None) -> list[int]:
    """The chat template applied to the messages (and the tools `plan` shows)."""
    if not request.messages:
        raise APIError("messages must not be empty", param="messages")
    for i, message in enumerate(request.messages):
        if isinstance(message.content, list):
            check_text_parts(message.content, f"messages.{i}.content", CHAT_TEXT_PARTS)
    plan = plan or ToolPlan("none", [])
    messages, extra = template_inputs(request, plan, ctx.chat_template or "")
    size = sum(len(str(m["content"])) for m in messages)
    try:
        return await run_off_loop(lambda: list(ctx.tokenizer.apply_chat_template(
            messages, chat_template=ctx.chat_template,
            add_generation_prompt=request.add_generation_prompt, tokenize=True,
            return_dict=False, **extra)), size)
    except Exception as exc:  # a template may reject e.g. the order of roles
        raise APIError(f"chat template failed: {exc}", param="messages") from exc


async def prepare_chat(ctx: ServingContext, request: ChatCompletionRequest,
                       ) -> tuple[list[int], SamplingParams, ToolPlan]:
    structured = _check_common(ctx, request)
    if request.top_logprobs is not None:
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]",
                           param="top_logprobs")
        if not request.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
    plan = ToolPlan.from_request(request)
    if (forced := plan.structured_output()) is not None:
        if structured is not None:
            raise APIError("response_format cannot be combined with a forced tool_choice",
                           param="response_format")
        structured = forced
    ids = await chat_prompt_ids(ctx, request, plan)
    max_tokens = request.max_completion_tokens or request.max_tokens
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return ids, _sampling_params(ctx, request, len(ids), max_tokens, "messages", logprobs,
                                 request.prompt_logprobs, structured), plan


def _completion_prompts(request: CompletionRequest) -> list[str | list[int]]:
    prompt = request.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise APIError("prompt must not be empty", param="prompt")
    return list(prompt)


async def prepare_completion(ctx: ServingContext, request: CompletionRequest,
                             ) -> list[tuple[list[int], SamplingParams]]:
    """Prompt ids and params of each prompt, in order."""
    structured = _check_common(ctx, request)
    prompt_logprobs = request.prompt_logprobs
    if request.echo and request.logprobs is not None:  # the echoed prompt shows its logprobs
        prompt_logprobs = max(prompt_logprobs or 0, request.logprobs)
    prepared = []
    vocab = len(ctx.tokenizer)
    for prompt in _completion_prompts(request):
        if isinstance(prompt, str):
            ids = await run_off_loop(lambda: ctx.tokenizer.encode(prompt), len(prompt))
        # An over-long id list fails the length check below without a scan on the loop.
        elif len(prompt) < ctx.max_model_len and any(not 0 <= t < vocab for t in prompt):
            raise APIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        else:
            ids = list(prompt)
        if not ids:
            raise APIError("prompt must not be empty", param="prompt")
        prepared.append((ids, _sampling_params(ctx, request, len(ids), request.max_tokens,
                                               "prompt", request.logprobs, prompt_logprobs,
                                               structured)))
    return prepared


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """One params per choice; with a seed, choice i uses seed + i (reproducible, distinct)."""
    if params.seed is None:
        return [params] * n
    return [_checked(lambda i=i: dataclasses.replace(params, seed=params.seed + i))
            for i in range(n)]


def fan_out(ctx: ServingContext, request_id: str,
            prompts: list[tuple[list[int], SamplingParams]], n: int, arrival: float,
            prompt_text: str | None = None) -> AsyncIterator[tuple[int, Delta]]:
    """All choices' deltas as they come; choice `p * n + i` is prompt p's i-th sample.

    Admission happens here, before anything reaches the engine: it raises 429 or 503."""
    slots = iter(ctx.admission.admit([len(ids) for ids, _ in prompts for _ in range(n)]))
    streams = [generate(ctx, f"{request_id}-{p * n + i}", ids, child, arrival, next(slots),
                        prompt_text)
               for p, (ids, params) in enumerate(prompts)
               for i, child in enumerate(choice_params(params, n))]
    return _interleave(streams)


async def _interleave(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """Closing this cancels every stream still running, which aborts its engine request."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Delta]) -> None:
        try:
            async with aclosing(stream):
                async for delta in stream:
                    queue.put_nowait((index, delta))
        except Exception as exc:
            queue.put_nowait((index, exc))
        else:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                running -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def generate(ctx: ServingContext, request_id: str, prompt_ids: list[int],
                   params: SamplingParams, arrival: float, slot: Slot,
                   prompt_text: str | None = None) -> AsyncIterator[Delta]:
    """Text deltas of one request; a stop string ends it here and aborts it in the engine."""
    detok = IncrementalDetokenizer(ctx.tokenizer, prompt_ids)
    stops = StopStringChecker(params.stop, params.include_stop_str_in_output)
    tracker = RequestTracker(ctx.metrics, request_id, arrival,
                             prompt_text if ctx.log_prompts else None)
    usage = UsageInfo(prompt_tokens=len(prompt_ids), total_tokens=len(prompt_ids))
    finish_reason = "abort"  # until the engine or a stop string says otherwise
    token_ids: list[int] = []  # since the last delta: text held back keeps them here
    logprobs: list[TokenLogprobs] = []
    prompt_logprobs: list[TokenLogprobs] | None = None
    try:
        async with aclosing(ctx.engine.generate(request_id, prompt_ids, params,
                                                arrival)) as outputs:
            async for output in outputs:
                slot.started()
                tracker.on_output(output)
                token_ids += output.new_token_ids
                logprobs += output.new_logprobs or []
                if output.prompt_logprobs is not None:
                    prompt_logprobs = output.prompt_logprobs
                usage.completion_tokens += len(output.new_token_ids)
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                if output.num_prompt_tokens:
                    usage.prompt_tokens_details = {"cached_tokens": output.num_cached_tokens}
                if output.num_evicted_tokens is not None:
                    usage.kv_evicted_tokens = output.num_evicted_tokens
                finished = output.finish_reason is not None
                match = stops.add(detok.add(output.new_token_ids, finished), finished)
                if match.stopped or finished:
                    finish_reason = "stop" if match.stopped else output.finish_reason
                    yield Delta(match.text, finish_reason, usage, token_ids, logprobs,
                                prompt_logprobs)
                    return
                if match.text:
                    yield Delta(match.text, None, usage, token_ids, logprobs, prompt_logprobs)
                    token_ids, logprobs, prompt_logprobs = [], [], None
    finally:
        slot.release()
        tracker.finish(finish_reason, usage.completion_tokens)


async def collect(deltas: AsyncIterator[tuple[int, Delta]], count: int) -> list[Delta]:
    """Each choice's deltas joined into one, in choice order."""
    whole = [Delta("", None, UsageInfo()) for _ in range(count)]
    async with aclosing(deltas):
        async for index, delta in deltas:
            acc = whole[index]
            acc.text += delta.text
            acc.token_ids += delta.token_ids
            acc.logprobs += delta.logprobs
            acc.finish_reason, acc.usage = delta.finish_reason, delta.usage
            if delta.prompt_logprobs is not None:
                acc.prompt_logprobs = delta.prompt_logprobs
    return whole


def total_usage(usages: list[UsageInfo], n: int) -> UsageInfo:
    """Completion tokens of every choice; prompt tokens once per prompt (every n-th choice)."""
    prompts = usages[::n]
    total = UsageInfo(prompt_tokens=sum(u.prompt_tokens for u in prompts),
                      completion_tokens=sum(u.completion_tokens for u in usages))
    total.total_tokens = total.prompt_tokens + total.completion_tokens
    if any(u.prompt_tokens_details for u in prompts):
        total.prompt_tokens_details = {"cached_tokens": sum(
            (u.prompt_tokens_details or {}).get("cached_tokens", 0) for u in prompts)}
    if any(u.kv_evicted_tokens is not None for u in usages):
        total.kv_evicted_tokens = sum(u.kv_evicted_tokens or 0 for u in usages)
    return total
