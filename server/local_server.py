"""A `tessera serve` child process on a free port, for benchmarks and tests that need a real
server: start it, wait for `/health`, find its engine-core child, stop it with Ctrl-C.

`tiny_model_args` serves `configs/tiny-llama` with dummy weights and a word-level tokenizer
(`write_tiny_tokenizer`): it starts in seconds, for runs about the server's plumbing rather
than the model.
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

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "configs" / "tiny-llama"
# ChatML with words for markers; whitespace separates every token, so counts are exact.
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} "
                      "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> "
                      "assistant {% endif %}")


class ServerFailed(Exception):
    """The server exited or never became healthy; the message ends with its log's tail."""


def engine_pid(api_pid: int) -> int:
    """The engine-core child of the API process `api_pid` (not a structured-output helper)."""
    for children in Path(f"/proc/{api_pid}/task").glob("*/children"):
        for pid in children.read_text().split():
            if b"engine.engine_process" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return int(pid)
    raise LookupError(f"no engine core process under pid {api_pid}")


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (`VmRSS` of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"no VmRSS for pid {pid}")


def metric_value(text: str, name: str) -> float:
    """One sample's value from a Prometheus exposition (first line whose name matches)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


@dataclass
class Server:
    process: subprocess.Popen
    base_url: str
    log: Path

    def engine_pid(self) -> int:
        return engine_pid(self.process.pid)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log: Path, timeout_s: float = 180,
                 env: dict[str, str] | None = None) -> Server:
    """`tessera serve ARGS` on a free port (`env` added to this process's environment), once
    `/health` answers 200; raises `ServerFailed`."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), *args]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerFailed(f"server exited with {process.returncode}:\n"
                               f"{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise ServerFailed(f"server not healthy after {timeout_s:.0f}s:\n{log.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


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


def start_tiny_server(workdir: Path, args: list[str], timeout_s: float = 180) -> Server:
    """The tiny model in fp32, eager (it serves the API and fault checks: a compile would
    only slow each start), its tokenizer and log under `workdir`, with `args` after."""
    tokenizer = write_tiny_tokenizer(workdir / "tokenizer")
    return start_server([*tiny_model_args(tokenizer), "--dtype", "float32", "--enforce-eager",
                         *args],
                        workdir / "server.log", timeout_s)
