"""What vLLM users reach for, on one tiny server: `/version`, `/ping`, `--tokenizer`,
`--chat-template`, the start-up log, and `tessera bench serve` with `--save-result`/`--plot`."""
import json
import subprocess
import sys

import httpx
import openai
import pytest

from server import __version__
from tests.conftest import (ROOT, TINY_CHAT_TEMPLATE, start_server, stop_server,
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


@pytest.fixture(scope="module")
def bench_tokenizer(tmp):
    """The bench sizes prompts with a tokenizer whose own template is the server's."""
    return write_tiny_tokenizer(tmp / "bench-tokenizer")


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


def test_bench_serve_sizes_chat_prompts_and_saves_json_and_a_plot(tiny, bench_tokenizer,
                                                                   tmp_path):
    result, plot = tmp_path / "result.json", tmp_path / "plot.png"
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "bench", "serve", "--base-url", tiny.base_url,
         "--tokenizer", str(bench_tokenizer), "--num-prompts", "2", "--input-len", "12",
         "--output-len", "3", "--save-result", str(result), "--plot", str(plot)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "output tok/s" in out.stdout and "goodput" not in out.stdout  # no SLO given
    saved = json.loads(result.read_text())
    assert saved["completed"] == 2 and "goodput" not in saved
    assert [r["prompt_tokens"] for r in saved["requests"]] == [12, 12]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
