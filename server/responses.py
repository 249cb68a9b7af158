"""OpenAI response bodies from choice deltas: whole, or as server-sent events.

One responder per endpoint turns each choice's `Delta`s into chunks (streamed) or one choice
(whole); the whole answer is the same fold over one joined delta, so both paths agree.
"""
from collections.abc import AsyncIterator

from server.errors import sse_error
from server.logprobs import chat_logprobs, completion_logprobs
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


class ChatResponder:
    def __init__(self, ctx: ServingContext, request_id: str, n: int, plan: ToolPlan,
                 logprobs: bool) -> None:
        self.ctx, self.request_id, self.n, self.plan = ctx, request_id, n, plan
        self.logprobs = logprobs
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
            usage=total_usage([d.usage for d in deltas], self.n)).model_dump()

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
    def __init__(self, ctx: ServingContext, request_id: str, n: int, echoes: list[str],
                 logprobs: bool) -> None:
        """`echoes[p]`: prompt p's text when `echo`, else ""."""
        self.ctx, self.request_id, self.n, self.echoes = ctx, request_id, n, echoes
        self.logprobs = logprobs
        self.offsets: dict[int, int] = {}  # text length streamed so far, per choice

    def _echo(self, index: int) -> str:
        return self.echoes[index // self.n]

    def _logprobs(self, delta: Delta, offset: int) -> dict | None:
        if not self.logprobs:
            return None
        return completion_logprobs(self.ctx.token_texts, delta.token_ids, delta.logprobs,
                                   offset)

    def whole(self, deltas: list[Delta]) -> dict:
        choices = [CompletionChoice(
            index=i, text=self._echo(i) + d.text, finish_reason=d.finish_reason,
            logprobs=self._logprobs(d, len(self._echo(i)))) for i, d in enumerate(deltas)]
        return CompletionResponse(
            id=self.request_id, model=self.ctx.served_model_name, choices=choices,
            usage=total_usage([d.usage for d in deltas], self.n)).model_dump()

    def _chunk(self, choices: list, usage: UsageInfo | None = None) -> str:
        return CompletionResponse(id=self.request_id, model=self.ctx.served_model_name,
                                  choices=choices, usage=usage).model_dump_json()

    def first(self, count: int) -> list[str]:
        return [self._chunk([CompletionChoice(index=i, text=self._echo(i))])
                for i in range(count) if self._echo(i)]

    def chunks(self, index: int, delta: Delta) -> list[str]:
        offset = self.offsets.get(index, len(self._echo(index)))
        self.offsets[index] = offset + sum(len(self.ctx.token_texts.text(t))
                                           for t in delta.token_ids)
        return [self._chunk([CompletionChoice(index=index, text=delta.text,
                                              finish_reason=delta.finish_reason,
                                              logprobs=self._logprobs(delta, offset))])]

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
