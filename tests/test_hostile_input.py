"""What an operator probing the server sends: bodies too big or too deep, `NaN`, infinite
sampling values, the wrong content type, image parts, wrong methods, no key. One table of
requests against one real tiny server (with an API key); each row is the answer it must get,
and after each the engine must still be alive."""
import json
import re
import threading
from dataclasses import dataclass, field

import httpx
import pytest

from tests.conftest import start_server, stop_server, tiny_model_args, write_tiny_tokenizer

MODEL = "SmolLM2-135M-Instruct"
KEY = "hostile-key"
AUTH = {"authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "content-type": "application/json"}
MB = 10**6
HI = [{"role": "user", "content": "w1"}]
# 5 MB of one unknown word repeated: 250,000 tokens for the word-level tokenizer.
BIG_PROMPT = ("x" * 19 + " ") * 250_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    srv = start_server([*tiny_model_args(write_tiny_tokenizer(tmp / "tokenizer")),
                        "--max-model-len", "64", "--api-key", KEY], tmp / "server.log")
    yield srv
    stop_server(srv)


def chat(**fields) -> bytes:
    return json.dumps({"model": MODEL, "messages": HI, "max_tokens": 1, **fields}).encode()


def with_literal(name: str, literal: str) -> bytes:
    """A chat body whose `name` is a bare JSON-ish literal such as NaN (json.dumps cannot)."""
    return chat(**{name: "@"}).replace(b'"@"', literal.encode())


def chunks(total: int, size: int = MB):
    """A body without Content-Length (httpx sends a generator chunked)."""
    for _ in range(total // size):
        yield b" " * size


@dataclass
class Row:
    method: str
    path: str
    body: bytes | None
    status: int
    param: str | None = None
    headers: dict = field(default_factory=lambda: JSON)
    answer_headers: dict = field(default_factory=dict)  # expected headers of the answer
    message: str = ""  # a substring of the error message

    def send(self, base_url: str, body=None) -> httpx.Response:
        return httpx.request(self.method, base_url + self.path, headers=self.headers,
                             content=self.body if body is None else body, timeout=120)


def image_chat(part: dict) -> bytes:
    return chat(messages=[{"role": "user", "content": [{"type": "text", "text": "w1"}, part]}])


def responses_body(part: dict) -> bytes:
    return json.dumps({"model": MODEL, "max_output_tokens": 1, "input": [
        {"role": "user", "content": [part]}]}).encode()


ROWS = {
    # 1. body size: over 8 MiB is refused before parsing; 5 MB is parsed (and too long here)
    "20 MB with Content-Length": Row("POST", "/v1/completions", b" " * (20 * MB), 413,
                                     message="--max-request-body-size"),
    "5 MB prompt is parsed, not refused": Row(
        "POST", "/v1/completions",
        json.dumps({"model": MODEL, "prompt": BIG_PROMPT, "max_tokens": 1}).encode(), 400,
        param="prompt", message="maximum context length"),
    # 2. content type
    "text/plain": Row("POST", "/v1/chat/completions", chat(), 415,
                      headers={**AUTH, "content-type": "text/plain"}, message="application/json"),
    "form": Row("POST", "/v1/chat/completions", chat(), 415,
                headers={**AUTH, "content-type": "application/x-www-form-urlencoded"}),
    "no content type": Row("POST", "/tokenize", b'{"prompt": "w1"}', 415, headers={}),
    "json with charset": Row("POST", "/v1/chat/completions", chat(), 200,
                             headers={**AUTH, "content-type": "application/json; charset=utf-8"}),
    "ping without a body": Row("POST", "/ping", None, 200, headers={}),
    # 3. JSON
    "10,000 deep": Row("POST", "/v1/chat/completions",
                       b'{"x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", 400, message="deep"),
    "500 deep, under the parser's limit": Row(
        "POST", "/v1/chat/completions", chat(response_format={"type": "json_schema",
            "json_schema": {"schema": json.loads('{"items": ' * 500 + "{}" + "}" * 500)}}),
        400, message="deep"),
    "NaN": Row("POST", "/v1/chat/completions", with_literal("temperature", "NaN"), 400,
               message="NaN"),
    "Infinity": Row("POST", "/v1/chat/completions", with_literal("top_p", "Infinity"), 400),
    "-Infinity": Row("POST", "/tokenize", b'{"prompt": "w1", "x": -Infinity}', 400),
    "temperature 1e309": Row("POST", "/v1/chat/completions",
                             with_literal("temperature", "1e309"), 400, param="temperature"),
    "frequency_penalty -1e309": Row("POST", "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "w1", "frequency_penalty": "@"}).encode().replace(
        b'"@"', b"-1e309"), 400, param="frequency_penalty"),
    "logit_bias 1e309": Row("POST", "/v1/chat/completions",
                            with_literal("logit_bias", '{"7": 1e309}'), 400,
                            param="logit_bias.7"),
    "responses temperature 1e309": Row(
        "POST", "/v1/responses", b'{"model": "%s", "input": "w1", "temperature": 1e309}'
        % MODEL.encode(), 400, param="temperature"),
    "integer of 5000 digits": Row("POST", "/v1/chat/completions",
                                  with_literal("seed", "9" * 5000), 400),
    "top_k 1e30 leaves the engine alive": Row("POST", "/v1/chat/completions",
                                              chat(top_k=10**30), 200),
    # 5. content parts other than text
    "image_url part": Row("POST", "/v1/chat/completions",
                          image_chat({"type": "image_url", "image_url": {"url": "http://x"}}), 400,
                          param="messages.0.content.1.type", message="'image_url'"),
    "input_audio part": Row("POST", "/v1/chat/completions",
                            image_chat({"type": "input_audio", "input_audio": {}}), 400,
                            param="messages.0.content.1.type", message="'input_audio'"),
    "file part in /tokenize": Row("POST", "/tokenize", json.dumps({"messages": [
        {"role": "user", "content": [{"type": "file", "file": {}}]}]}).encode(), 400,
        param="messages.0.content.0.type", message="'file'"),
    "text parts": Row("POST", "/v1/chat/completions", image_chat({"type": "text", "text": "w2"}),
                      200),
    "responses input_image": Row("POST", "/v1/responses", responses_body(
        {"type": "input_image", "image_url": "http://x"}), 400,
        param="input.0.content.0.type", message="'input_image'"),
    "responses input_file": Row("POST", "/v1/responses",
                                responses_body({"type": "input_file", "file_id": "f"}), 400,
                                param="input.0.content.0.type", message="'input_file'"),
    # 6. method and key
    "DELETE a POST route": Row("DELETE", "/v1/chat/completions", None, 405,
                               answer_headers={"allow": "POST"}),
    "PUT /ping": Row("PUT", "/ping", None, 405, headers={},
                     answer_headers={"allow": "GET, POST"}),
    "GET /tokenize": Row("GET", "/tokenize", None, 405, headers={},
                         answer_headers={"allow": "POST"}),
    "no key": Row("POST", "/v1/chat/completions", chat(), 401,
                  headers={"content-type": "application/json"},
                  answer_headers={"www-authenticate": "Bearer"}),
    "wrong key": Row("GET", "/v1/models", None, 401, headers={"authorization": "Bearer no"},
                     answer_headers={"www-authenticate": "Bearer"}),
    # 7. xgrammar's complaint without its source paths
    "schema xgrammar rejects": Row("POST", "/v1/chat/completions", chat(response_format={
        "type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}), 400,
        param="response_format", message='Unsupported type "foo"'),
    "tool schema xgrammar rejects": Row("POST", "/v1/chat/completions", chat(
        tools=[{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}}}],
        tool_choice="required"), 400, param="tools", message="parenthesis is not closed"),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_hostile_request_gets_its_answer_and_the_engine_lives(server, name):
    row = ROWS[name]
    response = row.send(server.base_url)
    assert response.status_code == row.status, response.text[:300]
    for header, value in row.answer_headers.items():
        assert response.headers.get(header) == value
    if row.status >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert error["param"] == row.param
        assert row.message in error["message"]
        assert not re.search(r"\.cc:\d+|/cpp/|\[\d\d:\d\d:\d\d\]", error["message"])
    assert httpx.get(f"{server.base_url}/health", timeout=30).status_code == 200


def test_a_chunked_body_is_refused_once_it_passes_the_limit(server):
    row = Row("POST", "/v1/completions", None, 413)
    response = row.send(server.base_url, body=chunks(20 * MB))
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_health_answers_while_a_5_mb_prompt_is_tokenized(server):
    answers, done = [], threading.Event()

    def poll() -> None:
        while not done.is_set():
            answers.append(httpx.get(f"{server.base_url}/health", timeout=30).status_code)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        response = httpx.post(f"{server.base_url}/tokenize", json={"prompt": BIG_PROMPT},
                              timeout=120)  # the hang guard
    finally:
        done.set()
        poller.join()
    assert response.status_code == 200 and response.json()["count"] == 250_000
    # Tokenized on the event loop, only the polls before and after it are answered (3 seen).
    assert answers.count(200) >= 10, answers
