"""Tool calling: tools into the prompt, forced calls as a grammar, the model's calls parsed back.

Format (Hermes / Qwen style, also what SmolLM2 is told to use): a call is
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. A chat template that knows tools
(its text mentions `tools`) renders them itself; for one that does not, the tool list and this
format go into the system prompt (`TOOLS_PROMPT`), earlier assistant calls are rendered as those
blocks and `tool` messages as `<tool_response>` blocks.

`tool_choice`: `none` = plain chat (tools not even shown); `auto` = the model decides, its
output is parsed; a named function = the output is that function's arguments, forced by its
JSON schema; `required` = a JSON array of `{"name", "arguments"}` calls, forced likewise
(one item unless `parallel_tool_calls`).
"""
import json
import re
from dataclasses import dataclass

from engine.sampling_params import StructuredOutput
from engine.detokenizer import StopStringChecker
from server.errors import APIError
from server.protocol import ChatCompletionRequest, FunctionCall, Tool, ToolCall
from server.structured import json_schema_output

TOOLS_PROMPT = """You can call these functions (JSON schemas):
<tools>
{tools}
</tools>
To call a function, answer with one block per call, each holding a JSON object:
<tool_call>
{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}
</tool_call>"""

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(_CLOSE) + r"|$)", re.S)


@dataclass
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[Tool]
    parallel: bool = True
    name: str | None = None  # the named function

    @classmethod
    def from_request(cls, request: ChatCompletionRequest) -> "ToolPlan":
        tools, choice = request.tools or [], request.tool_choice
        if choice is not None and choice != "none" and not tools:
            raise APIError("tool_choice needs tools", param="tool_choice")
        if choice is None:
            choice = "auto" if tools else "none"
        if isinstance(choice, str):
            return cls(choice, tools, request.parallel_tool_calls)
        name = choice.function.get("name")
        if name not in {t.function.name for t in tools}:
            raise APIError(f"tool_choice names {name!r}, which is not among the tools",
                           param="tool_choice")
        return cls("named", tools, request.parallel_tool_calls, name)

    def structured_output(self) -> StructuredOutput | None:
        """The grammar that forces a named or required call; None for none and auto."""
        if self.mode == "named":
            tool = next(t for t in self.tools if t.function.name == self.name)
            return json_schema_output(tool.function.parameters, "tools")
        if self.mode != "required":
            return None
        # Each tool's schema moves whole under the root's $defs, so its own `$ref`s (pydantic
        # writes "#/$defs/Model") are rebased there rather than broken by the embedding.
        defs = {f"tool{i}": _rebase_refs(t.function.parameters, f"#/$defs/tool{i}")
                for i, t in enumerate(self.tools)}
        calls = [{"type": "object", "additionalProperties": False,
                  "properties": {"name": {"const": t.function.name},
                                 "arguments": {"$ref": f"#/$defs/tool{i}"}},
                  "required": ["name", "arguments"]} for i, t in enumerate(self.tools)]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}, "$defs": defs}
        if not self.parallel:
            schema["maxItems"] = 1
        return json_schema_output(schema, "tools")


def _rebase_refs(schema, root: str):
    """A copy of `schema` whose local references ("#", "#/...") point below `root`."""
    if isinstance(schema, list):
        return [_rebase_refs(item, root) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {k: root + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#")
            else _rebase_refs(v, root) for k, v in schema.items()}


def _history_message(message) -> dict:
    """One history message for a template that does not know tools."""
    text = message.text()
    if message.role == "tool":
        return {"role": "tool", "content": f"<tool_response>\n{text}\n</tool_response>"}
    for call in message.tool_calls or []:
        text += f"{_OPEN}\n" + json.dumps({"name": call.function.name,
                                           "arguments": _loads(call.function.arguments)}
                                          ) + f"\n{_CLOSE}"
    return {"role": message.role, "content": text}


def _native_message(message) -> dict:
    """One history message in transformers' tool convention (arguments as a dict)."""
    out = {"role": message.role, "content": message.text()}
    if message.tool_calls:
        out["tool_calls"] = [{"type": "function", "id": c.id, "function": {
            "name": c.function.name, "arguments": _loads(c.function.arguments)}}
            for c in message.tool_calls]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def _loads(arguments: str):
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def template_inputs(request: ChatCompletionRequest, plan: ToolPlan, chat_template: str,
                    ) -> tuple[list[dict], dict]:
    """Messages and extra `apply_chat_template` arguments for this request."""
    shown = plan.tools if plan.mode != "none" else []
    if "tools" in chat_template:
        extra = {"tools": [t.model_dump(exclude_none=True) for t in shown]} if shown else {}
        return [_native_message(m) for m in request.messages], extra
    messages = [_history_message(m) for m in request.messages]
    if shown:
        prompt = TOOLS_PROMPT.format(tools="\n".join(
            json.dumps(t.function.model_dump(exclude_none=True)) for t in shown))
        if messages[0]["role"] in ("system", "developer"):
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}"}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    return messages, {}


def _call(name, arguments) -> ToolCall | None:
    if not isinstance(name, str) or not isinstance(arguments, (dict, str)):
        return None
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ToolCall(function=FunctionCall(name=name, arguments=text))


class ToolCallParser:
    """Splits one choice's output into content and tool calls, as it streams.

    `feed` returns the content that is safe to stream now (never part of a call); `finish`
    returns the content still held back and the calls. Output that does not parse as calls is
    content after all, so nothing the model wrote is lost.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.released = 0
        self.marker = StopStringChecker([_OPEN])
        self.in_call = plan.mode in ("named", "required")

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.in_call:
            return ""
        match = self.marker.add(delta)
        self.in_call = match.stopped
        self.released += len(match.text)
        return match.text

    def finish(self) -> tuple[str, list[ToolCall]]:
        calls = self._parse()
        end = self.text.index(_OPEN) if calls and self.plan.mode == "auto" else len(self.text)
        rest = "" if calls and self.plan.mode != "auto" else self.text[self.released:end]
        return rest, calls

    def _parse(self) -> list[ToolCall]:
        try:
            if self.plan.mode == "named":
                json.loads(self.text)
                return [_call(self.plan.name, self.text)]
            if self.plan.mode == "required":
                items = json.loads(self.text)
            else:
                items = [json.loads(body) for body in _CALL.findall(self.text)]
        except json.JSONDecodeError:
            return []
        names = {t.function.name for t in self.plan.tools}
        calls = [_call(i.get("name"), i.get("arguments", {})) if isinstance(i, dict) else None
                 for i in items]
        if not calls or None in calls or any(c.function.name not in names for c in calls):
            return []
        return calls if self.plan.parallel else calls[:1]
