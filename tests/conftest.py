"""A real `tessera serve` process on a free port, started once per test module.

A module sets `SERVER_ARGS` (extra flags) to shape its server; tests talk to it over HTTP only.
`tiny_model_args` serves `configs/tiny-llama` with dummy weights and a word-level tokenizer:
it starts in seconds, for tests of the server's plumbing rather than of the model.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Small and fp32: fast to load, deterministic greedy output on any CPU.
BASE_ARGS = ["--dtype", "float32", "--max-model-len", "1024", "--num-kv-pages", "256",
             "--log-level", "warning"]
STARTUP_TIMEOUT_S = 180
TINY_MODEL = ROOT / "configs" / "tiny-llama"
# ChatML with words for markers; whitespace separates every token, so counts are exact.
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} "
                      "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> "
                      "assistant {% endif %}")


@dataclass
class Server:
    process: subprocess.Popen
    base_url: str
    log: Path

    def engine_pid(self) -> int:
        """The engine-core child (not multiprocessing's resource tracker)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        for pid in children.read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                return int(pid)
        raise LookupError("engine core process not found")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log: Path, env: dict[str, str] | None = None) -> Server:
    """`env` adds to this process's environment."""
    port = _free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), *BASE_ARGS, *args]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_server(server)
    pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="module")
def server(request, tmp_path_factory) -> Server:
    args = getattr(request.module, "SERVER_ARGS", [])
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = start_server(args, log)
    yield srv
    stop_server(srv)


def write_tiny_tokenizer(path: Path, chat_template: str = TINY_CHAT_TEMPLATE) -> Path:
    """An HF tokenizer directory of 307 whole-word tokens (`w0` ... `w299`, roles, ChatML
    markers) for `configs/tiny-llama` (vocabulary 512); built with `tokenizers` alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    special = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = special + ["user", "assistant", "system"] + [f"w{i}" for i in range(300)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.add_special_tokens(special)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>",
        "eos_token": "<|endoftext|>", "additional_special_tokens": special[2:],
        "chat_template": chat_template}))
    return path


def tiny_model_args(tokenizer: Path) -> list[str]:
    return [str(TINY_MODEL), "--load-format", "dummy", "--tokenizer", str(tokenizer)]


def metric_value(text: str, name: str) -> float:
    """One sample's value from a Prometheus exposition (first line whose name matches)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def wait_for(predicate, timeout_s: float = 20.0, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()

