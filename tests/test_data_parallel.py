"""Two replicas placed by Ray behind one API process, driven by the real `openai` client.

The server starts a local Ray cluster (2 CPUs here: a bundle of 1 CPU per replica), the
router balances calls over both replicas, and a SIGKILLed replica actor fails only the calls
it held while the other replica keeps serving; its supervisor then starts it again.
"""
import asyncio
import os
import signal
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import start_server, stop_server, tiny_model_args, wait_for, \
    write_tiny_tokenizer

pytest.importorskip("ray")

MODEL = "SmolLM2-135M-Instruct"
HANG_GUARD_S = 120


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dp")
    tokenizer = write_tiny_tokenizer(workdir / "tokenizer")
    server = start_server([*tiny_model_args(tokenizer), "--data-parallel-size", "2",
                           "--distributed-executor-backend", "ray", "--max-model-len", "1024"],
                          workdir / "server.log")
    yield server
    stop_server(server)


def _routed(server) -> dict[str, float]:
    """Calls the router sent to each replica (`tessera:engine_requests_total`)."""
    text = httpx.get(f"{server.base_url}/metrics").text
    return {s.labels["engine"]: s.value for family in text_string_to_metric_families(text)
            if family.name == "tessera:engine_requests" for s in family.samples
            if s.name.endswith("_total")}


def _replicas(server) -> dict[str, dict]:
    engines = httpx.get(f"{server.base_url}/health").json()["engines"]
    return {e["name"]: e for e in engines}


def test_replicas_are_ray_actors_and_calls_are_balanced_over_both(server):
    replicas = _replicas(server)
    assert set(replicas) == {"replica-0", "replica-1"}
    for r in replicas.values():  # each in its own Ray actor process
        assert r["state"] == "ready"
        assert Path(f"/proc/{r['pid']}/cmdline").read_bytes().startswith(b"ray::_EngineActor")
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="none")

    async def calls():
        return await asyncio.gather(*(client.completions.create(
            model=MODEL, prompt=f"w{i} w{i + 1}", max_tokens=16, temperature=0)
            for i in range(8)))

    outs = asyncio.run(calls())
    assert all(o.usage.completion_tokens == 16 for o in outs)
    routed = _routed(server)
    assert routed["replica-0"] >= 2 and routed["replica-1"] >= 2, routed
    assert sum(routed.values()) == 8


def test_a_killed_replica_fails_only_its_calls_and_the_other_serves_on(server):
    before = _routed(server)
    victim = _replicas(server)["replica-0"]["pid"]
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="none",
                                max_retries=0, timeout=HANG_GUARD_S)

    async def stream(i: int, first: asyncio.Event) -> str:
        """'done', or 'failed' when the stream ends in an error."""
        try:
            chunks = await client.completions.create(
                model=MODEL, prompt=f"w{i}", max_tokens=900, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
            async for _ in chunks:
                first.set()
            return "done"
        except openai.APIError:
            return "failed"

    async def in_flight():
        firsts = [asyncio.Event() for _ in range(6)]
        streams = [asyncio.create_task(stream(i, firsts[i])) for i in range(6)]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), HANG_GUARD_S)
        os.kill(victim, signal.SIGKILL)
        assert await asyncio.to_thread(
            wait_for, lambda: _replicas(server)["replica-0"]["state"] == "down", 30)
        # While replica-0 is down, calls go to replica-1 and finish.
        during = await client.completions.create(model=MODEL, prompt="w5 w6", max_tokens=8,
                                                 temperature=0)
        return await asyncio.gather(*streams), during

    results, during = asyncio.run(in_flight())
    after = _routed(server)
    on_victim = after["replica-0"] - before["replica-0"]
    assert 0 < on_victim < 6
    assert results.count("failed") == on_victim and results.count("done") == 6 - on_victim
    assert during.usage.completion_tokens == 8
    assert after["replica-1"] - before["replica-1"] == 6 - on_victim + 1
    # The replica's supervisor starts a new actor.
    assert wait_for(lambda: _replicas(server)["replica-0"]["state"] == "ready"
                    and _replicas(server)["replica-0"]["pid"] != victim, HANG_GUARD_S)
