"""OpenAI's Responses API (`/v1/responses`) as a front end to the chat path.

A Responses request is translated into a `ChatCompletionRequest` (input items become chat
messages, `instructions` a system message, `text.format` a `response_format`, flat function
tools chat tools) and prepared by `prepare_chat`, so the prompt, sampling, structured output
and tool calling are exactly the chat endpoint's. Only the output differs: `ResponseBuilder`
folds the choice's deltas into a Response object and its typed stream events.

Stateless: nothing is stored, so `previous_response_id`, `conversation` and `background` are
refused, as are reasoning and built-in tools (only `function` tools exist here).
"""
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag

from engine.sampling_params import SamplingParams
from server.errors import APIError, to_api_error
from server.protocol import (ChatCompletionRequest, ChatMessage, FunctionCall,
                             FunctionDefinition, NamedToolChoice, ResponseFormat, Tool,
                             ToolCall, UsageInfo, check_text_parts, random_id)
from server.responses import ChatChoiceState
from server.serving import Delta, ServingContext, prepare_chat
from server.tools import ToolPlan


# --- request --------------------------------------------------------------------------------
# Earlier assistant turns come back as `output_text`; both are plain text to the model.
TEXT_PARTS = ("input_text", "output_text")


def _as_parts(content: Any) -> Any:
    return [{"type": "input_text", "text": content}] if isinstance(content, str) else content


# A string or a list of content parts, held as the list (no str|list union in error locations);
# parts other than text (`input_image`, `input_file`, ...) are refused by `_joined`.
Text = Annotated[list[dict[str, Any]], BeforeValidator(
    _as_parts, json_schema_input_type=str | list[dict[str, Any]])]


def _joined(parts: list[dict[str, Any]], where: str) -> str:
    check_text_parts(parts, where, TEXT_PARTS)
    return "".join(part["text"] for part in parts)


class MessageItem(BaseModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Text


class FunctionCallItem(BaseModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    type: Literal["function_call_output"]
    call_id: str
    output: Text


def _item_type(item: Any) -> str | None:
    """Message items may omit `type` (OpenAI's "easy input message")."""
    if isinstance(item, dict):
        return item.get("type", "message")
    return getattr(item, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type, custom_error_type="unsupported_item", custom_error_message=(
        "input items must be messages, function_call or function_call_output items"))]


def _as_items(value: Any) -> Any:
    """A string input is one user message."""
    return [{"role": "user", "content": value}] if isinstance(value, str) else value


class TextFormat(BaseModel):
    """`text.format`: the chat `response_format` with the `json_schema` fields inlined."""
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    def response_format(self) -> ResponseFormat:
        if self.type != "json_schema":
            return ResponseFormat(type=self.type)
        if self.schema_ is None:
            raise APIError("text.format.schema is required for type json_schema",
                           param="text.format.schema")
        spec = self.model_dump(include={"name", "description", "schema_", "strict"},
                               by_alias=True, exclude_none=True)
        return ResponseFormat(type="json_schema", json_schema=spec)


class TextConfig(BaseModel):
    format: TextFormat = TextFormat(type="text")


class FunctionTool(BaseModel):
    """Responses' flat function tool; any other tool `type` (built-in tools) is a 400."""
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def chat_tool(self) -> Tool:
        spec = self.model_dump(exclude={"type"}, exclude_none=True)
        return Tool(function=FunctionDefinition.model_validate(spec))


class FunctionChoice(BaseModel):
    type: Literal["function"]
    name: str


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    # Refused unless they carry the value that means "not used" (see `api._parse`).
    UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "previous_response_id": None, "conversation": None, "background": False,
        "reasoning": None, "prompt": None, "top_logprobs": 0}

    model: str
    input: Annotated[list[InputItem], BeforeValidator(
        _as_items, json_schema_input_type=str | list[InputItem])]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    text: TextConfig = TextConfig()
    tools: list[FunctionTool] = []
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    stream: bool = False


def _chat_messages(request: ResponsesRequest) -> list[ChatMessage]:
    """Input items as chat history: calls join the assistant turn right before them (as
    `tool_calls`), call outputs become `tool` messages."""
    messages = ([ChatMessage(role="system", content=request.instructions)]
                if request.instructions else [])
    for i, item in enumerate(request.input):
        if isinstance(item, FunctionCallItem):
            call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name,
                                                                   arguments=item.arguments))
            if messages and messages[-1].role == "assistant":
                messages[-1].tool_calls = [*(messages[-1].tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            messages.append(ChatMessage(role="tool", tool_call_id=item.call_id,
                                        content=_joined(item.output, f"input.{i}.output")))
        else:
            messages.append(ChatMessage(role=item.role,
                                        content=_joined(item.content, f"input.{i}.content")))
    return messages


def to_chat_request(request: ResponsesRequest) -> ChatCompletionRequest:
    choice = request.tool_choice
    if isinstance(choice, FunctionChoice):
        choice = NamedToolChoice(function={"name": choice.name})
    return ChatCompletionRequest(
        model=request.model, messages=_chat_messages(request),
        max_tokens=request.max_output_tokens, temperature=request.temperature,
        top_p=request.top_p, response_format=request.text.format.response_format(),
        tools=[t.chat_tool() for t in request.tools] or None, tool_choice=choice,
        parallel_tool_calls=request.parallel_tool_calls)


# The chat path names its own parameters in errors; these are their Responses names.
_RESPONSES_PARAM = {"messages": "input", "max_tokens": "max_output_tokens",
                    "response_format": "text.format"}


async def prepare_response(ctx: ServingContext, chat: ChatCompletionRequest,
                           ) -> tuple[list[int], SamplingParams, ToolPlan]:
    """`prepare_chat`, with errors naming the parameter the client actually sent."""
    try:
        return await prepare_chat(ctx, chat)
    except APIError as exc:
        exc.param = _RESPONSES_PARAM.get(exc.param, exc.param)
        raise


# --- response -------------------------------------------------------------------------------
class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list = []


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str = Field(default_factory=lambda: random_id("msg", "_"))
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"
    content: list[OutputText] = []


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str = Field(default_factory=lambda: random_id("fc", "_"))
    call_id: str
    name: str
    arguments: str = ""
    status: Literal["in_progress", "completed"] = "in_progress"


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int] = {"reasoning_tokens": 0}
    total_tokens: int

    @classmethod
    def from_chat(cls, usage: UsageInfo) -> "ResponseUsage":
        cached = (usage.prompt_tokens_details or {}).get("cached_tokens", 0)
        return cls(input_tokens=usage.prompt_tokens, input_tokens_details={
            "cached_tokens": cached}, output_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens)


class ResponseObject(BaseModel):
    id: str = Field(default_factory=lambda: random_id("resp", "_"))
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete", "failed"] = "in_progress"
    error: dict[str, str] | None = None
    incomplete_details: dict[str, str] | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputMessage | OutputFunctionCall] = []
    parallel_tool_calls: bool
    temperature: float
    top_p: float
    text: dict[str, Any]
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice
    tools: list[FunctionTool]
    usage: ResponseUsage | None = None


# finish reason -> (response status, incomplete_details, error)
_OUTCOME: dict[str, tuple[str, dict | None, dict | None]] = {
    "length": ("incomplete", {"reason": "max_output_tokens"}, None),
    "abort": ("failed", None, {"code": "server_error",
                               "message": "the engine aborted the request"}),
}
_COMPLETED = ("completed", None, None)


class ResponseBuilder:
    """One Response as its choice's deltas arrive: the typed stream events, and the object.

    The message item opens on the first text (or at the end, empty, when there are no calls),
    so it is always `output[0]`; function calls are known only when the output ends (as in the
    chat endpoint) and come as whole items after it. `whole` is the same fold over one joined
    delta, so a streamed and a non-streamed answer agree.
    """

    def __init__(self, ctx: ServingContext, request: ResponsesRequest, plan: ToolPlan) -> None:
        self.state = ChatChoiceState(plan)
        self.message: OutputMessage | None = None
        self.sequence_number = 0
        self.response = ResponseObject(
            instructions=request.instructions, max_output_tokens=request.max_output_tokens,
            model=ctx.served_model_name, parallel_tool_calls=request.parallel_tool_calls,
            temperature=request.temperature, top_p=request.top_p,
            text=request.text.model_dump(by_alias=True, exclude_none=True),
            tool_choice=request.tool_choice or "auto", tools=request.tools)

    def _event(self, type: str, **fields: Any) -> dict:
        event = {"type": type, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return event

    def dump(self) -> dict:
        return self.response.model_dump()

    def start(self) -> list[dict]:
        return [self._event("response.created", response=self.dump()),
                self._event("response.in_progress", response=self.dump())]

    def step(self, delta: Delta) -> list[dict]:
        content, calls, finish = self.state.step(delta)
        events = self._text(content) if content else []
        if finish is None:
            return events
        status, self.response.incomplete_details, self.response.error = _OUTCOME.get(
            finish, _COMPLETED)
        if self.message is None and not calls:
            events += self._open_message()
        if self.message is not None:
            events += self._close_message("completed" if status == "completed"
                                          else "incomplete")
        for call in calls:
            events += self._function_call(call)
        self.response.status = status
        self.response.usage = ResponseUsage.from_chat(delta.usage)
        return [*events, self._event(f"response.{status}", response=self.dump())]

    def whole(self, deltas: list[Delta]) -> dict:
        self.step(deltas[0])
        return self.dump()

    def error(self, exc: Exception) -> dict:
        error = to_api_error(exc)
        return self._event("error", code=error.code, message=error.message, param=error.param)

    def _open_message(self) -> list[dict]:
        self.message = OutputMessage()
        self.response.output.append(self.message)
        added = self._event("response.output_item.added", output_index=0,
                            item=self.message.model_dump())
        self.message.content.append(OutputText())
        return [added, self._event("response.content_part.added", **self._part_ref(),
                                   part=self.message.content[0].model_dump())]

    def _part_ref(self) -> dict:
        return {"item_id": self.message.id, "output_index": 0, "content_index": 0}

    def _text(self, text: str) -> list[dict]:
        events = self._open_message() if self.message is None else []
        self.message.content[0].text += text
        return [*events, self._event("response.output_text.delta", **self._part_ref(),
                                     delta=text, logprobs=[])]

    def _close_message(self, status: str) -> list[dict]:
        part = self.message.content[0]
        self.message.status = status
        return [self._event("response.output_text.done", **self._part_ref(), text=part.text,
                            logprobs=[]),
                self._event("response.content_part.done", **self._part_ref(),
                            part=part.model_dump()),
                self._event("response.output_item.done", output_index=0,
                            item=self.message.model_dump())]

    def _function_call(self, call: ToolCall) -> list[dict]:
        item = OutputFunctionCall(call_id=call.id, name=call.function.name)
        index = len(self.response.output)
        self.response.output.append(item)
        added = self._event("response.output_item.added", output_index=index,
                            item=item.model_dump())
        item.arguments, item.status = call.function.arguments, "completed"
        ref = {"item_id": item.id, "output_index": index}
        return [added,
                self._event("response.function_call_arguments.delta", **ref,
                            delta=item.arguments),
                self._event("response.function_call_arguments.done", **ref, name=item.name,
                            arguments=item.arguments),
                self._event("response.output_item.done", output_index=index,
                            item=item.model_dump())]


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


async def response_events(deltas: AsyncIterator[tuple[int, Delta]],
                          builder: ResponseBuilder) -> AsyncIterator[str]:
    """The typed event stream (no `[DONE]`: `response.completed` or its kin ends it).

    Closing this generator (the client went away) closes `deltas`, which aborts the request.
    """
    try:
        for event in builder.start():
            yield _sse(event)
        async for _, delta in deltas:
            for event in builder.step(delta):
                yield _sse(event)
    except Exception as exc:  # the 200 is already sent: report in-band
        yield _sse(builder.error(exc))
    finally:
        await deltas.aclose()
