"""The server as a client sees it: a real `tessera serve` process driven by the openai client."""
import asyncio
import json

import httpx
import openai
import pytest

from tests.conftest import metric_value, wait_for

MODEL = "SmolLM2-135M-Instruct"
QUESTIONS = ["What is the capital of France?", "Name three colors.",
             "Count from one to five.", "Say hello in Spanish."]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)


def chat(client, question: str, max_tokens: int = 10, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
        temperature=0, **kw)


def streamed_text(stream) -> tuple[str, str | None]:
    text, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish


def test_chat_streamed_and_not_give_the_same_greedy_text(client):
    whole = chat(client, QUESTIONS[0])
    text, finish = streamed_text(chat(client, QUESTIONS[0], stream=True))
    assert whole.choices[0].message.content and text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert whole.usage.completion_tokens <= 10
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_completion_returns_text_and_usage(client):
    out = client.completions.create(model=MODEL, prompt="The capital of France is",
                                    max_tokens=5, temperature=0)
    assert out.object == "text_completion" and out.choices[0].text
    assert out.usage.prompt_tokens == 5 and 1 <= out.usage.completion_tokens <= 5


def test_streamed_completion_ends_with_done_and_usage(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body,
                      timeout=60) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines()
                  if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_the_request_and_never_reaches_the_stream(client):
    full = chat(client, QUESTIONS[0]).choices[0].message.content
    stop = full.split()[2]  # a word from the middle of the greedy answer
    text, finish = streamed_text(chat(client, QUESTIONS[0], stop=[stop], stream=True))
    assert finish == "stop" and text == full[:full.index(stop)]


def test_models_lists_the_served_name_with_max_model_len(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == 1024


def test_16_concurrent_streamed_chats_each_equal_their_result_alone(server, client):
    alone = {q: chat(client, q, max_tokens=8).choices[0].message.content for q in QUESTIONS}
    aclient = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="none",
                                 max_retries=0)

    async def one(question: str) -> str:
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=8,
            temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def all16():
        return await asyncio.gather(*(one(QUESTIONS[i % 4]) for i in range(16)))

    results = asyncio.run(all16())
    assert results == [alone[QUESTIONS[i % 4]] for i in range(16)]


def kv_state(server) -> tuple[float, float]:
    text = httpx.get(f"{server.base_url}/metrics").text
    return (metric_value(text, "tessera:kv_cache_usage_perc"),
            metric_value(text, "tessera:num_requests_running"))


def test_disconnect_mid_stream_frees_the_engine_pages(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 500, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body,
                      timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(6):  # a few tokens in: the request holds pages now
            next(lines)
        assert kv_state(server)[0] > 0
    assert wait_for(lambda: kv_state(server) == (0.0, 0.0), timeout_s=10)


def test_non_streamed_request_whose_client_left_is_aborted(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 500, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=2)
    assert wait_for(lambda: kv_state(server) == (0.0, 0.0), timeout_s=10)


HI = [{"role": "user", "content": "hi"}]
ERROR_CASES = {
    "unknown model": ({"model": "gpt-9", "messages": HI}, 404, "not_found_error", "model"),
    "negative temperature": ({"model": MODEL, "messages": HI, "temperature": -0.5}, 400,
                             "invalid_request_error", "temperature"),
    "max_tokens below 1": ({"model": MODEL, "messages": HI, "max_tokens": 0}, 400,
                           "invalid_request_error", "max_tokens"),
    "empty messages": ({"model": MODEL, "messages": []}, 400, "invalid_request_error",
                       "messages"),
    "prompt plus max_tokens too long": ({"model": MODEL, "messages": HI, "max_tokens": 1020},
                                        400, "invalid_request_error", "max_tokens"),
    "wrong type": ({"model": MODEL, "messages": HI, "max_tokens": "many"}, 400,
                   "invalid_request_error", "max_tokens"),
    "missing field": ({"model": MODEL}, 400, "invalid_request_error", "messages"),
    "bad role": ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400,
                 "invalid_request_error", "messages.0.role"),
    "stop token outside the vocabulary": ({"model": MODEL, "messages": HI,
                                           "stop_token_ids": [10**7]}, 400,
                                          "invalid_request_error", "stop_token_ids"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_invalid_chat_request_is_an_openai_error(server, case):
    body, status, kind, param = ERROR_CASES[case]
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body)
    assert response.status_code == status
    assert response.json()["error"]["type"] == kind
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\"text\"", b"\xff\xfe"])
def test_malformed_body_is_a_400(server, raw):
    response = httpx.post(f"{server.base_url}/v1/chat/completions", content=raw,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_too_long_completion_prompt_names_the_prompt(server):
    response = httpx.post(f"{server.base_url}/v1/completions",
                          json={"model": MODEL, "prompt": "word " * 1100, "max_tokens": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=HI)
    with pytest.raises(openai.BadRequestError):
        chat(client, "hi", max_tokens=0)


def test_the_api_process_loads_no_torch_and_the_cpu_engine_no_triton(server, client):
    """Torch (hundreds of MB, seconds to import) stays in the engine: after serving a request
    the API process has no torch library mapped, while its engine child does. Triton, installed
    for GPUs, is not loaded by a CPU engine (its library alone is 66 MiB resident)."""
    client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=2,
                                   messages=[{"role": "user", "content": "Hi"}])

    def maps(pid: int) -> str:
        return open(f"/proc/{pid}/maps").read()

    assert "libtorch" not in maps(server.process.pid)
    assert "libtorch" in maps(server.engine_pid())
    assert "libtriton" not in maps(server.engine_pid())
