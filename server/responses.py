"""OpenAI response bodies from choice deltas: whole, or as server-sent events.

One responder per endpoint turns each choice's `Delta`s into chunks (streamed) or one choice
(whole); the whole answer is the same fold over one joined delta, so both paths agree.
"""
from collections.abc import AsyncIterator

from server.errors import sse_error
from server.logprobs import chat_logprobs, completion_logprobs, vllm_prompt_logprobs
from server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice,
                             ChatCompletionChunk, ChatCompletionResponse, CompletionChoice,
                             CompletionResponse, DeltaMessage, FunctionDelta, ToolCall,
                             ToolCallDelta, UsageInfo)
from server.serving import Delta, ServingContext, total_usage
from server.tools import ToolCallParser, ToolPlan


class ChatChoiceState:
    """One chat choice as it streams: content, tool calls at the end, logprobs."""

    def __init__(self, plan: ToolPlan) -> None:
        self.parser = ToolCallParser(plan) if plan.mode != "none" else None

    def step(self, delta: Delta) -> tuple[str, list[ToolCall], str | None]:
        content = self.parser.feed(delta.text) if self.parser else delta.text
        calls, finish = [], delta.finish_reason
        if finish is not None and self.parser is not None:
            rest, calls = self.parser.finish()
            content += rest
            if calls and finish == "stop":
                finish = "tool_calls"
        return content, calls, finish


def _prompt_logprobs(ctx: ServingContext, prompt_ids: list[int], delta: Delta,
                     num_top: int | None) -> list[dict | None] | None:
    if num_top is None or delta.prompt_logprobs is None:
        return None
    return vllm_prompt_logprobs(ctx.token_texts, prompt_ids, delta.prompt_logprobs, num_top)


class ChatResponder:
    def __init__(self, ctx: ServingContext, request_id: str, n: int, plan: ToolPlan,
                 logprobs: bool, prompt_ids: list[int], prompt_logprobs: int | None) -> None:
        self.ctx, self.request_id, self.n, self.plan = ctx, request_id, n, plan
        self.logprobs = logprobs
        self.prompt_ids, self.prompt_logprobs = prompt_ids, prompt_logprobs
        self.states: dict[int, ChatChoiceState] = {}

    def _logprobs(self, delta: Delta) -> dict | None:
        if not self.logprobs:
            return None
        return chat_logprobs(self.ctx.token_texts, delta.token_ids, delta.logprobs)

    def whole(self, deltas: list[Delta]) -> dict:
        choices = []
        for index, delta in enumerate(deltas):
            content, calls, finish = ChatChoiceState(self.plan).step(delta)
            message = AssistantMessage(content=(content.strip() or None) if calls else content,
                                       tool_calls=calls or None)
            choices.append(ChatChoice(index=index, message=message, finish_reason=finish,
                                      logprobs=self._logprobs(delta)))
        return ChatCompletionResponse(
            id=self.request_id, model=self.ctx.served_model_name, choices=choices,
            usage=total_usage([d.usage for d in deltas], self.n),
            prompt_logprobs=_prompt_logprobs(self.ctx, self.prompt_ids, deltas[0],
                                             self.prompt_logprobs)).model_dump()

    def _chunk(self, choices: list, usage: UsageInfo | None = None) -> str:
        return ChatCompletionChunk(id=self.request_id, model=self.ctx.served_model_name,
                                   choices=choices, usage=usage).model_dump_json()

    def first(self, count: int) -> list[str]:
        return [self._chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                          content=""))])
                for i in range(count)]

    def chunks(self, index: int, delta: Delta) -> list[str]:
        """Content first; then, once the output is complete, each call as OpenAI streams it:
        a delta with its id, type, name and empty arguments, then one with the arguments."""
        state = self.states.setdefault(index, ChatChoiceState(self.plan))
        content, calls, finish = state.step(delta)
        logprobs = self._logprobs(delta) if delta.token_ids else None
        deltas = []
        if content or logprobs:
            deltas.append((DeltaMessage(content=content), logprobs))
        for k, call in enumerate(calls):
            name, arguments = call.function.name, call.function.arguments
            deltas += [(DeltaMessage(tool_calls=[ToolCallDelta(
                index=k, id=call.id, type="function",
                function=FunctionDelta(name=name, arguments=""))]), None),
                (DeltaMessage(tool_calls=[ToolCallDelta(
                    index=k, function=FunctionDelta(arguments=arguments))]), None)]
        if finish is not None:
            deltas.append((DeltaMessage(), None))
        last = len(deltas) - 1
        return [self._chunk([ChatChunkChoice(index=index, delta=message, logprobs=lp,
                                             finish_reason=finish if k == last else None)])
                for k, (message, lp) in enumerate(deltas)]

    def usage(self, usage: UsageInfo) -> str:
        return self._chunk([], usage)


class CompletionResponder:
    def __init__(self, ctx: ServingContext, request_id: str, n: int, prompts: list[list[int]],
                 echo: bool, logprobs: int | None, prompt_logprobs: int | None) -> None:
        self.ctx, self.request_id, self.n, self.prompts = ctx, request_id, n, prompts
        self.echoes = [ctx.tokenizer.decode(ids) if echo else "" for ids in prompts]
        self.logprobs, self.prompt_logprobs = logprobs, prompt_logprobs
        # Echo with logprobs: the prompt's tokens need its logprobs, which come with the first
        # delta, so a streamed echo waits for it instead of leading the stream.
        self.echo_logprobs = echo and logprobs is not None
        self.offsets: dict[int, int] = {}  # text length streamed so far, per choice

    def _echo(self, index: int) -> str:
        return self.echoes[index // self.n]

    def _logprobs(self, index: int, delta: Delta, offset: int) -> dict | None:
        """The delta's tokens from `offset` on; echoed, the prompt's tokens come first."""
        if self.logprobs is None:
            return None
        texts = self.ctx.token_texts
        out = completion_logprobs(texts, delta.token_ids, delta.logprobs, offset, self.logprobs)
        if not self.echo_logprobs or delta.prompt_logprobs is None:
            return out
        prompt = completion_logprobs(texts, self.prompts[index // self.n],
                                     [None, *delta.prompt_logprobs], 0, self.logprobs)
        return {key: prompt[key] + out[key] for key in out}

    def whole(self, deltas: list[Delta]) -> dict:
        choices = [CompletionChoice(
            index=i, text=self._echo(i) + d.text, finish_reason=d.finish_reason,
            logprobs=self._logprobs(i, d, len(self._echo(i))),
            prompt_logprobs=_prompt_logprobs(self.ctx, self.prompts[i // self.n], d,
                                             self.prompt_logprobs))
            for i, d in enumerate(deltas)]
        return CompletionResponse(
            id=self.request_id, model=self.ctx.served_model_name, choices=choices,
            usage=total_usage([d.usage for d in deltas], self.n)).model_dump()

    def _chunk(self, choices: list, usage: UsageInfo | None = None) -> str:
        return CompletionResponse(id=self.request_id, model=self.ctx.served_model_name,
                                  choices=choices, usage=usage).model_dump_json()

    def first(self, count: int) -> list[str]:
        return [self._chunk([CompletionChoice(index=i, text=self._echo(i))])
                for i in range(count) if self._echo(i) and not self.echo_logprobs]

    def chunks(self, index: int, delta: Delta) -> list[str]:
        echo = self._echo(index) if self.echo_logprobs and index not in self.offsets else ""
        offset = self.offsets.get(index, len(self._echo(index)))
        self.offsets[index] = offset + sum(len(self.ctx.token_texts.text(t))
                                           for t in delta.token_ids)
        return [self._chunk([CompletionChoice(index=index, text=echo + delta.text,
                                              finish_reason=delta.finish_reason,
                                              logprobs=self._logprobs(index, delta, offset))])]

    def usage(self, usage: UsageInfo) -> str:
        return self._chunk([], usage)


async def sse_stream(deltas: AsyncIterator[tuple[int, Delta]],
                     responder: ChatResponder | CompletionResponder, count: int,
                     include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's event stream: `data: {chunk}` events, then `data: [DONE]`.

    Closing this generator (the client went away) closes `deltas`, which aborts the requests.
    """
    try:
        for first in responder.first(count):
            yield f"data: {first}\n\n"
        usages = [UsageInfo() for _ in range(count)]
        async for index, delta in deltas:
            usages[index] = delta.usage
            for chunk in responder.chunks(index, delta):
                yield f"data: {chunk}\n\n"
        if include_usage:
            yield f"data: {responder.usage(total_usage(usages, responder.n))}\n\n"
    except Exception as exc:  # the 200 is already sent: report in-band
        yield sse_error(exc)
    finally:
        await deltas.aclose()
    yield "data: [DONE]\n\n"
