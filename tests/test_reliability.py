"""Overload, engine crashes and shutdown, on real server processes (the tiny model).

Each behaviour is driven as an operator meets it: many concurrent calls, a SIGKILLed engine,
a failing output-routing task, SIGTERM with calls in flight. Timeouts here are hang guards.
"""
import asyncio
import json
import os
import signal

import httpx
import pytest

from server.supervisor import ROUTING_FAULT_ENV
from tests.conftest import (metric_value, start_server, stop_server, tiny_model_args, wait_for,
                            write_tiny_tokenizer)

MODEL = "SmolLM2-135M-Instruct"
HANG_GUARD_S = 120


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny") / "tokenizer")


@pytest.fixture
def start(tokenizer, tmp_path):
    """Start tiny servers with extra flags; each is stopped after the test."""
    servers = []

    def _start(*args: str, env: dict[str, str] | None = None):
        server = start_server([*tiny_model_args(tokenizer), *args],
                              tmp_path / f"server{len(servers)}.log", env)
        servers.append(server)
        return server

    yield _start
    for server in servers:
        stop_server(server)


def _completion(prompt: str, max_tokens: int, stream: bool = False) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}


def _kv_pages_used(server) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    return metric_value(text, "tessera:kv_cache_usage_perc")


def _is_error_json(response: httpx.Response, status: int) -> bool:
    error = response.json()["error"]
    return response.status_code == status and isinstance(error["message"], str) and error["type"]


async def _stream_events(client: httpx.AsyncClient, url: str, body: dict,
                         first: asyncio.Event | None = None) -> list[str]:
    """The `data:` payloads of one streamed call; `first` is set on its first token."""
    events = []
    async with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if first is not None and len(events) >= 2:
                    first.set()
    return events


@pytest.fixture(scope="module")
def small_server(tokenizer, tmp_path_factory):
    """Room for 4 running and 8 waiting engine requests; one call may start 16."""
    server = start_server([*tiny_model_args(tokenizer), "--max-num-seqs", "4",
                           "--max-waiting-requests", "8", "--max-choices-per-request", "16"],
                          tmp_path_factory.mktemp("small") / "server.log")
    yield server
    stop_server(server)


def test_overload_answers_429_and_every_admitted_call_is_exact(small_server):
    server = small_server
    url = f"{server.base_url}/v1/completions"
    prompts = [f"w{i} w{i + 1} w{i + 2}" for i in range(5)]
    solo = {p: httpx.post(url, json=_completion(p, 8)).json()["choices"][0]["text"]
            for p in prompts}

    async def flood() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(timeout=HANG_GUARD_S, limits=limits) as client:
            return await asyncio.gather(*(client.post(url, json=_completion(prompts[i % 5], 8))
                                          for i in range(300)))

    responses = asyncio.run(flood())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}
    assert statuses.count(429) > 0 and statuses.count(200) >= 12
    for i, r in enumerate(responses):
        if r.status_code == 200:
            assert r.json()["choices"][0]["text"] == solo[prompts[i % 5]]
        else:
            assert _is_error_json(r, 429) and r.headers["retry-after"] == "1"
    assert wait_for(lambda: _kv_pages_used(server) == 0)
    rejected = metric_value(httpx.get(f"{server.base_url}/metrics").text,
                            "tessera:requests_rejected_total")
    assert rejected == statuses.count(429)


def test_one_call_may_not_fan_out_past_the_cap(small_server):
    r = httpx.post(f"{small_server.base_url}/v1/completions",
                   json={**_completion(["w1"] * 13, 4), "n": 2})
    assert _is_error_json(r, 400) and r.json()["error"]["param"] == "n"


def _crash_under_streams(server, crash) -> None:
    """16 streams and one plain call are in flight when `crash()` runs: each ends with a 503
    (an `error` event then `[DONE]` when streamed), `/health` turns 503, then 200 after the
    restart, and greedy output is what it was before the crash."""
    url = f"{server.base_url}/v1/completions"
    before = httpx.post(url, json=_completion("w3 w4", 8)).json()["choices"][0]["text"]

    async def in_flight():
        async with httpx.AsyncClient(timeout=HANG_GUARD_S) as client:
            firsts = [asyncio.Event() for _ in range(16)]
            streams = [asyncio.create_task(_stream_events(
                client, url, _completion(f"w{i}", 900, stream=True), firsts[i]))
                for i in range(16)]
            plain = asyncio.create_task(client.post(url, json=_completion("w9", 900)))
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), HANG_GUARD_S)
            crash()
            return await asyncio.gather(*streams), await plain

    streams, plain = asyncio.run(in_flight())
    for events in streams:
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["type"] == "service_unavailable_error"
    assert _is_error_json(plain, 503)
    assert wait_for(lambda: httpx.get(f"{server.base_url}/health").status_code == 503, 5)
    assert wait_for(lambda: httpx.get(f"{server.base_url}/health").status_code == 200,
                    HANG_GUARD_S)
    assert httpx.post(url, json=_completion("w3 w4", 8)).json()["choices"][0]["text"] == before
    assert metric_value(httpx.get(f"{server.base_url}/metrics").text,
                        "tessera:engine_restarts_total") == 1


def test_a_killed_engine_fails_its_requests_and_is_restarted(start):
    server = start("--max-model-len", "1024")
    _crash_under_streams(server, lambda: os.kill(server.engine_pid(), signal.SIGKILL))


def test_a_failed_routing_task_fails_its_requests_and_restarts_the_engine(start):
    # The fault fires on the engine's 40th step: after the 8-token warm-up call and the idle
    # steps, while the 16 streams are running.
    server = start("--max-model-len", "1024", env={ROUTING_FAULT_ENV: "40"})
    _crash_under_streams(server, lambda: None)


def _sigterm_under_eight_calls(server, max_tokens: int) -> tuple[list[httpx.Response], int]:
    """SIGTERM while 8 calls run; also one call made during the drain. Returns the 8
    responses and the drain-time call's status."""
    url = f"{server.base_url}/v1/completions"
    engine = server.engine_pid()

    async def in_flight():
        async with httpx.AsyncClient(timeout=HANG_GUARD_S) as client:
            calls = [asyncio.create_task(client.post(url, json=_completion(f"w{i}", max_tokens)))
                     for i in range(8)]
            assert await asyncio.to_thread(
                wait_for, lambda: metric_value(httpx.get(f"{server.base_url}/metrics").text,
                                               "tessera:num_requests_running") == 8)
            server.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(  # the drain has begun
                wait_for, lambda: httpx.get(f"{server.base_url}/health").status_code == 503,
                5, 0.02)
            late = await client.post(url, json=_completion("w1", 4))
            return await asyncio.gather(*calls), late.status_code

    responses, late = asyncio.run(in_flight())
    assert server.process.wait(timeout=HANG_GUARD_S) == 0
    assert wait_for(lambda: not os.path.exists(f"/proc/{engine}"), 5)
    return responses, late


def test_sigterm_lets_calls_in_flight_finish_and_exits_0(start):
    server = start("--shutdown-timeout", "120")  # on a slow machine too, all 8 fit
    responses, late = _sigterm_under_eight_calls(server, 400)
    assert late == 503
    assert [r.json()["choices"][0]["finish_reason"] for r in responses] == ["length"] * 8


def test_sigterm_past_the_shutdown_timeout_ends_calls_with_an_error(start):
    server = start("--max-model-len", "4096", "--shutdown-timeout", "0.5")
    responses, _ = _sigterm_under_eight_calls(server, 4000)
    assert all(_is_error_json(r, 503) for r in responses)
    assert "shutting down" in responses[0].json()["error"]["message"]


def test_an_idle_engine_exits_when_the_api_process_is_killed(start):
    server = start()
    engine = server.engine_pid()
    server.process.kill()
    server.process.wait()
    assert wait_for(lambda: not os.path.exists(f"/proc/{engine}")
                    or b"Z" in open(f"/proc/{engine}/stat", "rb").read().split()[2], 10)


def test_an_engine_that_keeps_dying_stops_the_server_with_exit_1(start):
    server = start("--max-engine-restarts", "0")
    os.kill(server.engine_pid(), signal.SIGKILL)
    assert server.process.wait(timeout=HANG_GUARD_S) == 1
    assert "died again after 0 restarts" in server.log.read_text()
