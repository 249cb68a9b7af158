"""`/v1/responses`: OpenAI's Responses API over the chat path, driven by the openai client
against one real `tessera serve`. Greedy answers are compared token for token with
`/v1/chat/completions`, since both must reach the engine with the same prompt. Outputs are a
few tokens and every schema is WEATHER (one grammar compile), to stay fast on a small CPU."""
import json
from functools import cache
from types import SimpleNamespace

import httpx
import jsonschema
import openai
import pytest

from server.protocol import UsageInfo
from server.responses_api import ResponseBuilder, ResponsesRequest
from server.serving import Delta
from server.tools import ToolPlan
from tests.conftest import wait_for
from tests.test_server import kv_state

MODEL = "SmolLM2-135M-Instruct"
# Small on purpose: every grammar-masked token is slow on a CPU.
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Tokyo"]}},
           "required": ["city"]}
TOOL = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
        "parameters": WEATHER}
WEATHER_Q = "What is the weather in Paris?"
TEXT_EVENTS = ["response.output_item.added", "response.content_part.added",
               "response.output_text.delta", "response.output_text.done",
               "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0,
                         timeout=120)


def respond(client, input, **kw):
    kw.setdefault("max_output_tokens", 16)
    return client.responses.create(model=MODEL, input=input, temperature=0, **kw)


@cache
def chat_answer(client, question: str, system: str | None = None, max_tokens: int = 16):
    """The chat endpoint's greedy answer (deterministic, so asked once per module)."""
    messages = [{"role": "system", "content": system}] if system else []
    return client.chat.completions.create(
        model=MODEL, messages=[*messages, {"role": "user", "content": question}],
        max_tokens=max_tokens, temperature=0)


def deduped(types: list[str]) -> list[str]:
    """Event types with runs of the same type collapsed (any number of deltas)."""
    return [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]


def test_string_input_gives_the_chat_answer_as_a_message_item(client):
    out = respond(client, "Hi")
    chat = chat_answer(client, "Hi")
    assert out.id.startswith("resp_") and out.object == "response" and out.model == MODEL
    [message] = out.output
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    [part] = message.content
    assert part.type == "output_text" and part.annotations == []
    assert part.text == out.output_text == chat.choices[0].message.content
    usage = out.usage
    assert (usage.input_tokens, usage.output_tokens) == (chat.usage.prompt_tokens,
                                                         chat.usage.completion_tokens)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens >= 0
    assert usage.output_tokens_details.reasoning_tokens == 0


def test_instructions_are_a_system_message(client):
    out = respond(client, "Hello!", instructions="You are a pirate.", max_output_tokens=6)
    chat = chat_answer(client, "Hello!", system="You are a pirate.", max_tokens=6)
    assert out.instructions == "You are a pirate."
    assert out.output_text == chat.choices[0].message.content


def test_max_output_tokens_hit_makes_the_response_incomplete(client):
    out = respond(client, "Tell me a story.", max_output_tokens=2)
    assert out.status == "incomplete"
    assert out.incomplete_details.reason == "max_output_tokens"
    assert out.usage.output_tokens == 2 and out.output[0].status == "incomplete"


def test_stream_events_come_in_order_and_build_the_final_response(client):
    events = list(respond(client, "Hi", stream=True))
    types = [e.type for e in events]
    assert deduped(types) == ["response.created", "response.in_progress", *TEXT_EVENTS,
                              "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response
    assert final.status == "completed" and final.output_text == done.text == text
    assert final.id == events[0].response.id and final.usage.output_tokens > 0
    assert final.output[0].id == done.item_id
    assert text == chat_answer(client, "Hi").choices[0].message.content


def test_stream_lines_name_each_event(server):
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 1, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/responses", json=body,
                      timeout=60) as response:
        blocks = response.read().decode().split("\n\n")
    assert blocks[-1] == ""
    for block in blocks[:-1]:
        event, data = block.split("\n")
        assert event.removeprefix("event: ") == json.loads(data.removeprefix("data: "))["type"]


def test_json_schema_text_format_output_validates(client):
    out = respond(client, WEATHER_Q, max_output_tokens=40, text={"format": {
        "type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}})
    assert out.status == "completed" and out.text.format.type == "json_schema"
    jsonschema.validate(json.loads(out.output_text), WEATHER)


FORCED = {"tools": [TOOL], "tool_choice": {"type": "function", "name": "get_weather"},
          "max_output_tokens": 40}


def test_named_tool_choice_gives_a_function_call_item(client):
    out = respond(client, WEATHER_Q, **FORCED)
    [call] = out.output
    assert call.type == "function_call" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)


def test_streamed_function_call_has_its_argument_events(client):
    events = list(respond(client, WEATHER_Q, stream=True, **FORCED))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    delta, done = events[3], events[4]
    assert delta.delta == done.arguments == events[-1].response.output[0].arguments
    jsonschema.validate(json.loads(done.arguments), WEATHER)


def test_function_call_and_output_items_render_as_chat_tool_history(client):
    """An earlier turn passed back as items (text, then a call) is one assistant message."""
    arguments = '{"city": "Paris"}'
    items = [{"role": "user", "content": WEATHER_Q},
             {"type": "message", "role": "assistant",
              "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": arguments},
             {"type": "function_call_output", "call_id": "call_1", "output": "18 degrees"}]
    messages = [items[0],
                {"role": "assistant", "content": "Let me check.", "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}]
    out = respond(client, items, max_output_tokens=4)
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                          temperature=0)
    assert out.usage.input_tokens == chat.usage.prompt_tokens
    assert out.output_text == chat.choices[0].message.content


REFUSED = {
    "previous_response_id": {"previous_response_id": "resp_123"},
    "background": {"background": True},
    "reasoning": {"reasoning": {"effort": "low"}},
    "tools.0.type": {"tools": [{"type": "web_search"}]},
    "input.0": {"input": [{"type": "reasoning", "summary": []}]},
    "text.format": {"text": {"format": {"type": "json_schema", "name": "x",
                                        "schema": {"type": "nonsense"}}}},
    "max_output_tokens": {"max_output_tokens": 5000},
}


@pytest.mark.parametrize("param", list(REFUSED))
def test_unsupported_or_bad_parameter_is_a_400_naming_it(server, param):
    body = {"model": MODEL, "input": "hi", **REFUSED[param]}
    response = httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_disconnect_mid_stream_aborts_the_request(server):
    body = {"model": MODEL, "input": "Tell a long story.", "max_output_tokens": 500,
            "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/responses", json=body,
                      timeout=60) as response:
        lines = response.iter_lines()
        while "output_text.delta" not in next(lines):
            pass
        assert kv_state(server)[0] > 0
    assert wait_for(lambda: kv_state(server) == (0.0, 0.0), timeout_s=10)


def test_an_engine_abort_fails_the_response_after_the_text_so_far():
    builder = ResponseBuilder(SimpleNamespace(served_model_name=MODEL),
                              ResponsesRequest(model=MODEL, input="hi"), ToolPlan("none", []))
    events = builder.start() + builder.step(Delta("Hel", None, UsageInfo()))
    events += builder.step(Delta("", "abort", UsageInfo(prompt_tokens=3, total_tokens=3)))
    assert deduped([e["type"] for e in events]) == [
        "response.created", "response.in_progress", *TEXT_EVENTS, "response.failed"]
    final = events[-1]["response"]
    assert final["status"] == "failed" and final["error"]["code"] == "server_error"
    assert final["output"][0]["status"] == "incomplete"
    assert final["output"][0]["content"][0]["text"] == "Hel"
