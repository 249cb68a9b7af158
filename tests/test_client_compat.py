"""What real clients trip over: pydantic schemas with `$defs`, streamed deltas without null
fields, tool calls streamed as OpenAI streams them, JSON objects, bounded numbers under a
grammar (LangChain's structured output), every bad `logit_bias` key named. One real server,
driven by the openai client, raw SSE where the wire format is the point, and LangChain."""
import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

MODEL = "SmolLM2-135M-Instruct"


class Address(BaseModel):
    city: str
    zip_code: str


class Person(BaseModel):
    name: str
    home: Address
    work: Address | None = None


PERSON = Person.model_json_schema()  # {"$defs": {"Address": ...}, "$ref": "#/$defs/Address"...}
TOOLS = [{"type": "function", "function": {"name": "save_person", "description":
                                           "Store a person", "parameters": PERSON}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
             "required": ["a", "b"]}}}]
ASK_PERSON = [{"role": "user", "content": "Alice lives in Paris, 75001. Save her."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0,
                         timeout=120)


def sse_chunks(server, body: dict) -> list[dict]:
    """Every `data:` object of a streamed chat completion, as sent."""
    chunks = []
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", timeout=120,
                      json={"model": MODEL, "stream": True, "temperature": 0, **body}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line.removeprefix("data: ")))
    return chunks


def accumulate_tool_calls(deltas: list[dict]) -> list[dict]:
    """What a client that appends fragments by index ends with."""
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d["index"], {"id": None, "name": None, "arguments": ""})
        call["id"] = d.get("id") or call["id"]
        call["name"] = d.get("function", {}).get("name") or call["name"]
        call["arguments"] += d.get("function", {}).get("arguments", "")
    return [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("how", ["named", "required", "response_format"])
def test_a_schema_with_defs_and_refs_is_accepted_and_enforced(client, how):
    kw = {"named": {"tools": TOOLS, "tool_choice": {"type": "function",
                                                     "function": {"name": "save_person"}}},
          "required": {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
          "response_format": {"response_format": {"type": "json_schema", "json_schema": {
              "name": "person", "schema": PERSON, "strict": True}}}}[how]
    choice = client.chat.completions.create(model=MODEL, messages=ASK_PERSON, max_tokens=80,
                                            temperature=0, **kw).choices[0]
    assert choice.finish_reason in ("stop", "tool_calls"), choice
    if how == "response_format":
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        return
    [call] = choice.message.tool_calls
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    jsonschema.validate(json.loads(call.function.arguments), schema[call.function.name])


def test_streamed_deltas_carry_role_once_and_no_null_fields(server):
    chunks = sse_chunks(server, {"messages": [{"role": "user", "content": "Say hi"}],
                                 "max_tokens": 8})
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all("role" not in d and "tool_calls" not in d for d in deltas[1:])
    assert all(None not in d.values() for d in deltas)
    assert all("usage" not in c for c in chunks)  # no include_usage asked
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_streamed_tool_calls_come_as_a_header_then_argument_fragments(client, server):
    body = {"messages": ASK_PERSON, "max_tokens": 80, "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "save_person"}}}
    whole = client.chat.completions.create(model=MODEL, temperature=0, **body).choices[0]
    chunks = sse_chunks(server, body)
    tool_deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
    header, *fragments = tool_deltas
    assert header["id"].startswith("call_") and header["type"] == "function"
    assert header["function"] == {"name": "save_person", "arguments": ""}
    assert fragments and all(set(f) == {"index", "function"} for f in fragments)
    assert all(set(f["function"]) == {"arguments"} for f in fragments)
    [call] = accumulate_tool_calls(tool_deltas)
    assert call["name"] == whole.message.tool_calls[0].function.name
    assert call["arguments"] == whole.message.tool_calls[0].function.arguments
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_openai_client_stream_accumulates_to_the_same_call(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK_PERSON, max_tokens=80, temperature=0, stream=True,
        tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    deltas = [d.model_dump(exclude_none=True) for chunk in stream for choice in chunk.choices
              for d in choice.delta.tool_calls or []]
    [call] = accumulate_tool_calls(deltas)
    assert call["name"] in ("save_person", "add") and json.loads(call["arguments"])


def test_json_object_is_an_object_even_when_asked_for_an_array(client):
    out = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=60, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Reply with a JSON array of three numbers."}])
    text = out.choices[0].message.content
    assert text.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_langchain_structured_output_with_open_integers_returns_valid_json(server):
    from langchain_openai import ChatOpenAI

    class City(BaseModel):
        name: str
        population: int
        area_km2: float

    llm = ChatOpenAI(model=MODEL, base_url=f"{server.base_url}/v1", api_key="none",
                     temperature=0, max_tokens=120, max_retries=0)
    # Unbounded, the default model answers this with an area of 10000... to the length limit
    # (LangChain then raises LengthFinishReasonError).
    city = llm.with_structured_output(City, method="json_schema").invoke(
        "How many stars are in the sky?")
    assert isinstance(city, City)
    assert abs(city.population) < 10**16 and abs(city.area_km2) <= 10**15


def test_every_invalid_logit_bias_key_is_named(server):
    def error(bias: dict) -> dict:
        r = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "logit_bias": bias, "max_tokens": 1})
        assert r.status_code == 400
        return r.json()["error"]

    outside = error({"-3": 1, "5": 1, "999999": 2})
    assert outside["param"] == "logit_bias"
    assert "-3" in outside["message"] and "999999" in outside["message"]
    assert "5," not in outside["message"]
    extreme = error({"5": 101, "6": -300})
    assert "5: 101" in extreme["message"] and "6: -300" in extreme["message"]
    not_ints = error({"abc": 1, "xyz": 2})
    assert "abc" in not_ints["message"] and "xyz" in not_ints["message"]
