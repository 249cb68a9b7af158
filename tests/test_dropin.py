"""What vLLM users reach for, on one tiny server: `/version`, `/ping`, `--tokenizer`,
`--chat-template` and the start-up log."""
import httpx
import openai
import pytest

from server import __version__
from tests.conftest import (TINY_CHAT_TEMPLATE, start_server, stop_server,
                            tiny_model_args, write_tiny_tokenizer)

MODEL = "SmolLM2-135M-Instruct"
# The tokenizer's own template adds a system turn (as SmolLM2's does); --chat-template drops it.
WITH_SYSTEM_TURN = "<|im_start|> system w0 <|im_end|> " + TINY_CHAT_TEMPLATE


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="module")
def tiny(tmp):
    template = tmp / "chat.jinja"
    template.write_text(TINY_CHAT_TEMPLATE)
    tokenizer = write_tiny_tokenizer(tmp / "tokenizer", WITH_SYSTEM_TURN)
    server = start_server([*tiny_model_args(tokenizer), "--chat-template", str(template),
                           "--log-level", "info"], tmp / "server.log")
    yield server
    stop_server(server)


def test_version_is_the_package_version(tiny):
    assert httpx.get(f"{tiny.base_url}/version").json() == {"version": __version__}


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_ping_answers_as_health_does(tiny, method):
    assert httpx.request(method, f"{tiny.base_url}/ping").status_code == 200


def test_the_tokenizer_flag_gives_the_vocabulary(tiny):
    out = httpx.post(f"{tiny.base_url}/tokenize", json={"prompt": "w0 w1"}).json()
    assert out["tokens"] == [7, 8]  # after 4 special tokens and 3 role words


def test_the_chat_template_flag_overrides_the_tokenizers(tiny):
    messages = [{"role": "user", "content": "w1 w2"}]
    ids = httpx.post(f"{tiny.base_url}/tokenize", json={"messages": messages}).json()["tokens"]
    text = httpx.post(f"{tiny.base_url}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text == "<|im_start|> user w1 w2 <|im_end|> <|im_start|> assistant"
    client = openai.OpenAI(base_url=f"{tiny.base_url}/v1", api_key="none", max_retries=0)
    usage = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2).usage
    assert usage.prompt_tokens == len(ids)


def test_the_start_up_log_says_loading_before_uvicorn_runs_and_ready_after(tiny):
    log = tiny.log.read_text()
    assert (log.index("loading model") < log.index("Uvicorn running on")
            < log.index("engine started in") < log.index("ready in"))
    assert "dtype     float32 (as requested)" in log
    assert "KV cache  256 pages x 16 tokens = 4096 tokens" in log

