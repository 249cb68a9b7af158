"""The OpenAI surface beyond plain chat: structured output, tools, logprobs, n, sampling
parameters, validation, auth, tokenize. One real `tessera serve` (with an API key and CORS)
driven by the openai client."""
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import torch

from engine.tokenizer import load_tokenizer
from server.protocol import Tool
from server.tools import ToolCallParser, ToolPlan
from tests import oracle

MODEL = "SmolLM2-135M-Instruct"
KEY = "test-key"
ORIGIN = "http://app.example"
SERVER_ARGS = ["--api-key", KEY, "--allowed-origins", ORIGIN]
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0,
                         timeout=120)


def post(server, path: str, body: dict, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.base_url}{path}", json=body, headers=headers, timeout=120, **kw)


def ask(client, content, **kw):
    kw.setdefault("max_tokens", 60)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                   "content": content}], **kw)


def streamed(stream) -> tuple[str, str | None, list]:
    """Text, finish reason and tool calls, with call fragments joined by index as clients do."""
    text, finish, calls = [], None, {}
    for chunk in stream:
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            for d in choice.delta.tool_calls or []:
                if d.index in calls:
                    calls[d.index].function.arguments += d.function.arguments or ""
                else:
                    calls[d.index] = d
            finish = choice.finish_reason or finish
    return "".join(text), finish, [calls[i] for i in sorted(calls)]


# --- 1. json_schema -------------------------------------------------------------------------
NAME = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0,
                                                            "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
     "required": ["color"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1,
                                               "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0,
                                                "maximum": 1000}}, "required": ["price"]},
    {"type": "object", "properties": {"city": {"type": "object", "properties": {
        "name": NAME, "population": {"type": "integer", "minimum": 0, "maximum": 10**8}},
        "required": ["name", "population"]}}, "required": ["city"]},
    {"type": "object", "properties": {"title": NAME, "subtitle": NAME}, "required": ["title"]},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2,
     "maxItems": 4},
    {"type": "object", "properties": {"points": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                         "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"]}}}, "required": ["points"]},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                      "confidence": {"type": "number", "minimum": 0,
                                                     "maximum": 1}},
     "required": ["answer", "confidence"]},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}},
     "required": ["id"]},
    {"type": "object", "properties": {"note": {"type": ["string", "null"], "maxLength": 12}},
     "required": ["note"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": NAME, "roles": {"type": "array", "items": {"enum": ["admin", "dev", "ops"]},
                                "maxItems": 2}}, "required": ["name", "roles"]},
        "active": {"type": "boolean"}}, "required": ["user", "active"]},
    {"type": "object", "properties": {"count": {"type": "integer", "minimum": 10,
                                                "maximum": 20}}, "required": ["count"]},
    {"type": "object", "properties": {"first": NAME, "last": NAME,
                                      "email": {"type": "string", "maxLength": 24}},
     "required": ["first", "last"]},
    {"enum": ["alpha", "beta", "gamma"]},
]


def _schema_answer(client, index: int) -> tuple[str, str | None]:
    schema = SCHEMAS[index]
    fmt = {"type": "json_schema", "json_schema": {"name": f"s{index}", "schema": schema,
                                                  "strict": True}}
    prompt = f"Reply with JSON matching this schema: {json.dumps(schema)}"
    if index % 2:
        text, finish, _ = streamed(ask(client, prompt, response_format=fmt, stream=True))
        return text, finish
    choice = ask(client, prompt, response_format=fmt).choices[0]
    return choice.message.content, choice.finish_reason


def test_json_schema_output_validates_for_16_schemas_streamed_and_not(client):
    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        answers = list(pool.map(lambda i: _schema_answer(client, i), range(len(SCHEMAS))))
    for schema, (text, finish) in zip(SCHEMAS, answers):
        assert finish == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_output_is_a_json_object(client):
    out = ask(client, "Describe a cat as JSON.", response_format={"type": "json_object"},
              max_tokens=100).choices[0]
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.message.content), dict)
    else:
        assert out.message.content.lstrip().startswith("{")


def test_an_unsupported_schema_is_a_400_naming_response_format(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    response = post(server, "/v1/chat/completions",
                    {"model": MODEL, "messages": HI, "response_format": fmt})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "response_format"


# --- 2. tools -------------------------------------------------------------------------------
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description":
                                           "Current weather in a city", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                           "parameters": {"type": "object", "properties": {
                                               "a": {"type": "integer"},
                                               "b": {"type": "integer"}},
                                               "required": ["a", "b"]}}}]
WEATHER_Q = "What is the weather in Paris?"


def _check_weather_call(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_named_tool_choice_yields_a_schema_valid_call(client):
    choice = ask(client, WEATHER_Q, tools=TOOLS, tool_choice={
        "type": "function", "function": {"name": "get_weather"}}).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    _check_weather_call(call)


def test_required_tool_choice_yields_a_call_streamed_and_not(client):
    kw = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
    choice = ask(client, WEATHER_Q, **kw).choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    text, finish, calls = streamed(ask(client, WEATHER_Q, stream=True, **kw))
    assert finish == "tool_calls" and text == "" and len(calls) == 1
    assert calls[0].function.arguments == call.function.arguments
    for c in (call, calls[0]):
        args = json.loads(c.function.arguments)
        assert c.function.name in ("get_weather", "add")
        if c.function.name == "get_weather":
            jsonschema.validate(args, WEATHER)


def test_tool_history_with_calls_and_results_is_accepted(client):
    messages = [{"role": "user", "content": WEATHER_Q},
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function", "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                         max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_auto_parses_tool_call_blocks_and_keeps_the_text_before_them():
    plan = ToolPlan("auto", [Tool.model_validate(t) for t in TOOLS])
    parser = ToolCallParser(plan)
    text = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Rome", "unit": "celsius"}}\n</tool_call>')
    released = "".join(parser.feed(text[i:i + 5]) for i in range(0, len(text), 5))
    rest, calls = parser.finish()
    assert released + rest == "Let me check. "
    assert [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "Rome", "unit": "celsius"}


def test_auto_output_that_is_no_valid_call_stays_content():
    parser = ToolCallParser(ToolPlan("auto", [Tool.model_validate(t) for t in TOOLS]))
    text = "Use <tool_call>{not json</tool_call>"
    assert parser.feed(text) + parser.finish()[0] == text and parser.finish()[1] == []


# --- 3. logprobs ----------------------------------------------------------------------------
def test_completion_logprobs_equal_the_oracle_log_softmax(client):
    prompt = [504, 3458, 314, 4649, 314]  # "The capital of France is" style token ids
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                    logprobs=5)
    choice = out.choices[0]
    ids = prompt + oracle.greedy_tokens(prompt, 4)  # the engine is token-exact with it
    assert choice.logprobs.tokens == [load_tokenizer(None).decode([i]) for i in ids[5:]]
    reference = oracle.logits(ids).log_softmax(-1)
    for k, (token, logprob) in enumerate(zip(choice.logprobs.tokens,
                                             choice.logprobs.token_logprobs)):
        row = reference[len(prompt) - 1 + k]
        token_id = ids[len(prompt) + k]
        assert abs(logprob - row[token_id].item()) < 1e-3
        top = choice.logprobs.top_logprobs[k]
        assert len(top) == 5
        values, _ = row.topk(5)
        assert torch.allclose(torch.tensor(sorted(top.values(), reverse=True)), values,
                              atol=1e-3)


def test_completion_logprobs_0_gives_each_token_with_itself_as_top(client):
    lp = complete(client, max_tokens=4, logprobs=0).logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.top_logprobs == [{t: v} for t, v in zip(lp.tokens, lp.token_logprobs)]


def test_completion_echo_with_logprobs_gives_prompt_then_output_tokens(client):
    prompt = [504, 3458, 314, 4649, 314]
    kw = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0, "echo": True,
          "logprobs": 2}
    choice = client.completions.create(**kw).choices[0]
    lp = choice.logprobs
    ids = prompt + oracle.greedy_tokens(prompt, 3)
    assert lp.tokens == [load_tokenizer(None).decode([i]) for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [len("".join(lp.tokens[:k])) for k in range(len(ids))]
    assert choice.text == "".join(lp.tokens)
    reference = oracle.logits(ids).log_softmax(-1)
    for k in range(1, len(ids)):
        assert abs(lp.token_logprobs[k] - reference[k - 1, ids[k]].item()) < 1e-3
        assert lp.top_logprobs[k][lp.tokens[k]] == lp.token_logprobs[k]
        assert 2 <= len(lp.top_logprobs[k]) <= 3  # the token itself and the two most likely
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [v for c in chunks for v in c.choices[0].logprobs.token_logprobs] == \
        pytest.approx(lp.token_logprobs)


def test_chat_prompt_logprobs_via_extra_body_in_vllm_shape(server, client):
    out = ask(client, "Name a fruit.", max_tokens=2, extra_body={"prompt_logprobs": 1})
    ids = post(server, "/tokenize", {"messages": [{"role": "user",
                                                   "content": "Name a fruit."}]}).json()["tokens"]
    entries = out.prompt_logprobs
    assert len(entries) == len(ids) == out.usage.prompt_tokens and entries[0] is None
    reference = oracle.logits(ids).log_softmax(-1)
    for k in range(1, len(ids)):
        entry = entries[k]
        own = entry[str(ids[k])]
        assert abs(own["logprob"] - reference[k - 1, ids[k]].item()) < 1e-3
        assert own["decoded_token"] == load_tokenizer(None).decode([ids[k]])
        best = reference[k - 1].argmax().item()
        assert entry[str(best)]["rank"] == 1 and len(entry) <= 2
    streamed = post(server, "/v1/chat/completions", {"model": MODEL, "messages": HI,
                                                     "stream": True, "prompt_logprobs": 1})
    assert streamed.status_code == 400
    assert streamed.json()["error"]["param"] == "prompt_logprobs"


def test_chat_top_logprobs_lists_5_sorted_alternatives_with_bytes(client):
    out = ask(client, "Name a fruit.", max_tokens=4, logprobs=True, top_logprobs=5)
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens
    for entry in entries:
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == 5 and values == sorted(values, reverse=True)
        assert entry.logprob == values[0]  # greedy picks the most likely token
        assert bytes(entry.bytes).decode() == entry.token
    assert "".join(e.token for e in entries) == out.choices[0].message.content


# --- 4. n -----------------------------------------------------------------------------------
def test_n_with_a_seed_is_reproducible_and_greedy_n_is_equal(client):
    def texts(**kw):
        out = ask(client, "Write a word.", n=4, max_tokens=8, **kw)
        assert [c.index for c in out.choices] == [0, 1, 2, 3]
        return [c.message.content for c in out.choices]

    seeded = texts(temperature=1.0, seed=1234)
    assert seeded == texts(temperature=1.0, seed=1234)
    assert len(set(seeded)) > 1
    assert len(set(texts(temperature=0))) == 1


def test_completion_prompt_list_gives_one_choice_per_prompt_in_order(client):
    prompts = ["The sky is", "Water is"]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, temperature=0)
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=3, temperature=0)
             .choices[0].text for p in prompts]
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == alone
    assert out.usage.completion_tokens == 6


# --- 5. sampling parameters -----------------------------------------------------------------
def complete(client, prompt="Once upon a time", **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.completions.create(model=MODEL, prompt=prompt, **kw).choices[0]


def token_id(text: str) -> int:
    [tid] = load_tokenizer(None).encode(text)
    return tid


def test_max_tokens_caps_the_output_with_finish_length(client):
    out = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3,
                                    temperature=0)
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


def test_stop_cuts_before_the_stop_string(client):
    full = complete(client, max_tokens=12).text
    stop = full.split()[2]
    out = complete(client, max_tokens=12, stop=[stop])
    assert out.finish_reason == "stop" and out.text == full[:full.index(stop)]


def test_logit_bias_forces_and_bans_a_token(client):
    banana = token_id(" banana")
    assert complete(client, max_tokens=4, logit_bias={str(banana): 100}).text == " banana" * 4
    first = complete(client, max_tokens=1, logprobs=0)
    first_id = token_id(first.logprobs.tokens[0])
    banned = complete(client, max_tokens=1, logit_bias={str(first_id): -100})
    assert banned.text != first.text


def test_penalties_reduce_repetition(client):
    """A bias toward " apple" makes greedy decoding loop on it; each penalty repeats it less."""
    bias = {"logit_bias": {str(token_id(" apple")): 10}}
    plain = complete(client, "I like to eat", **bias).text
    assert plain == " apple" * 8
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                    {"extra_body": {"repetition_penalty": 2.0}}):
        assert complete(client, "I like to eat", **bias, **penalty).text.count("apple") < 8


def test_min_tokens_defers_the_end_of_sequence(client):
    short = ask(client, "Say OK.", max_tokens=40)
    n = short.usage.completion_tokens
    assert short.choices[0].finish_reason == "stop" and n < 30
    longer = ask(client, "Say OK.", max_tokens=40, extra_body={"min_tokens": n + 5})
    assert longer.usage.completion_tokens >= n + 5


def test_kv_policy_via_extra_body_reports_the_evicted_tokens_in_usage(client):
    prompt = "Count from one to thirty in words, separated by commas: one, two, three,"
    out = ask(client, prompt, max_tokens=24,
              extra_body={"kv_policy": "streaming:sinks=4,window=16"})
    usage = out.usage.model_dump()
    # every computed token but the sinks, the window and the last one
    assert usage["kv_evicted_tokens"] == usage["total_tokens"] - 1 - 4 - 16 - 1
    assert ask(client, prompt, max_tokens=2).usage.model_dump()["kv_evicted_tokens"] is None


def test_include_usage_adds_a_final_usage_chunk_only_when_asked(client):
    def chunks(**kw):
        return list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=3,
                                              temperature=0, stream=True, **kw))

    with_usage = chunks(stream_options={"include_usage": True})
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks())


def test_echo_prepends_the_prompt(client):
    assert complete(client, "Hello there", max_tokens=2, echo=True).text.startswith("Hello there")


def test_content_parts_equal_a_plain_string(client):
    parts = [{"type": "text", "text": "Name a "}, {"type": "text", "text": "color."}]
    assert (ask(client, parts, max_tokens=6).choices[0].message.content
            == ask(client, "Name a color.", max_tokens=6).choices[0].message.content)


BAD = {
    "seed": {"seed": 2**63},
    "logit_bias": {"logit_bias": {"999999": 1}},
    "top_logprobs": {"logprobs": True, "top_logprobs": 21},
    "prompt_logprobs": {"prompt_logprobs": 21},
    "stream_options": {"stream_options": {"include_usage": True}},
    "audio": {"audio": {"voice": "alloy"}},
    "modalities": {"modalities": ["text", "audio"]},
    "n": {"n": 0},
    "tool_choice": {"tool_choice": "required"},
    "kv_policy": {"kv_policy": "streaming:window=0"},
}


@pytest.mark.parametrize("param", list(BAD))
def test_out_of_range_or_unsupported_param_is_a_400_naming_it(server, param):
    response = post(server, "/v1/chat/completions", {"model": MODEL, "messages": HI, **BAD[param]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


# --- 6. auth, headers, tokenize -------------------------------------------------------------
@pytest.mark.parametrize("key,status", [(None, 401), ("wrong", 401), (KEY, 200)])
def test_v1_routes_need_the_api_key(server, key, status):
    response = post(server, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1},
                    key=key)
    assert response.status_code == status
    if status == 401:
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_health_stays_open_and_request_ids_are_echoed(server):
    response = httpx.get(f"{server.base_url}/health", headers={"x-request-id": "req-42"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "req-42"
    assert httpx.get(f"{server.base_url}/v1/models").headers["x-request-id"]


def test_cors_preflight_allows_the_configured_origin(server):
    response = httpx.options(f"{server.base_url}/v1/chat/completions", headers={
        "origin": ORIGIN, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN


def test_tokenize_and_detokenize_round_trip(server):
    tokens = post(server, "/tokenize", {"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 1024
    assert post(server, "/detokenize", {"tokens": tokens["tokens"]}).json() == {
        "prompt": "Hello world"}
    chat = post(server, "/tokenize", {"messages": HI}).json()
    assert chat["count"] > tokens["count"]
