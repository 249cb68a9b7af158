"""A real `tessera serve` process on a free port, started once per test module.

A module sets `SERVER_ARGS` (extra flags) to shape its server; tests talk to it over HTTP only.
`tiny_model_args` serves `configs/tiny-llama` with dummy weights and a word-level tokenizer
(see `server/local_server.py`): it starts in seconds, for tests of the server's plumbing
rather than of the model.
"""
import time
from pathlib import Path

import pytest

# First, before anything imports triton: torch._dynamo does (the engine's kernels use
# torch.compiler), and triton builds its own jit functions (tl.sum) for the interpreter or not
# at that import.
import tests.triton_mode  # noqa: F401

from server import local_server
# Re-exported: test modules import these from here.
from server.local_server import (TINY_CHAT_TEMPLATE, TINY_MODEL, Server, ServerFailed,
                                 metric_value, stop_server, tiny_model_args,
                                 write_tiny_tokenizer)
from server.local_server import free_port as _free_port

ROOT = Path(__file__).resolve().parent.parent
# Small, dense fp32: fast to load, token-exact with the transformers oracle on any CPU.
BASE_ARGS = ["--dtype", "float32", "--quantization", "none", "--enforce-eager",
             "--max-model-len", "1024", "--num-kv-pages", "256", "--log-level", "warning"]
STARTUP_TIMEOUT_S = 180


def _or_fail(start, *args) -> Server:
    try:
        return start(*args)
    except ServerFailed as exc:
        pytest.fail(str(exc))


def start_server(args: list[str], log: Path, env: dict[str, str] | None = None) -> Server:
    """`env` adds to this process's environment."""
    return _or_fail(local_server.start_server, [*BASE_ARGS, *args], log, STARTUP_TIMEOUT_S,
                    env)


def start_tiny_server(workdir: Path, args: list[str]) -> Server:
    """The tiny model, its tokenizer and log under `workdir`; `BASE_ARGS`, then `args`."""
    return _or_fail(local_server.start_tiny_server, workdir, [*BASE_ARGS, *args],
                    STARTUP_TIMEOUT_S)


@pytest.fixture(scope="module")
def server(request, tmp_path_factory) -> Server:
    args = getattr(request.module, "SERVER_ARGS", [])
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = start_server(args, log)
    yield srv
    stop_server(srv)


def wait_for(predicate, timeout_s: float = 20.0, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()

