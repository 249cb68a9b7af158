"""A real `tessera serve` process on a free port, started once per test module.

A module sets `SERVER_ARGS` (extra flags) to shape its server; tests talk to it over HTTP only.
"""
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


def start_server(args: list[str], log: Path) -> Server:
    port = _free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), *BASE_ARGS, *args]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
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

