"""One prefill and one decode engine behind the router, on real server processes.

Greedy, seeded and grammar-constrained output through the handoff equals the colocated
engine's (the default model, fp32); faults (SIGKILLed engines, a transfer that never arrives,
a decode engine without pages, a client gone mid-transfer) end with the requests finished with
the right tokens under `--kv-load-failure recompute`, or with a 503 under `fail`, and every
engine's pages back in its pool. Faults run on the tiny model, which restarts in seconds.
Timeouts are hang guards.
"""
import asyncio
import json
import os
import signal
from pathlib import Path

import httpx
import openai
import pytest

from engine.core import DROP_KV_TRANSFERS_ENV, REFUSE_KV_LOADS_ENV
from tests.conftest import (metric_value, start_server, stop_server, tiny_model_args, wait_for,
                            write_tiny_tokenizer)

MODEL = "SmolLM2-135M-Instruct"
PD_ARGS = ["--prefill-engines", "1", "--decode-engines", "1", "--cpus-per-engine", "1"]
HANG_GUARD_S = 120
GPL = Path("/usr/share/common-licenses/GPL-3").read_text()
PROMPTS = ["Hi", "The capital of France is", "Write a haiku about the sea.",
           "Summarise this: " + GPL[:1500], "Translate to French: " + GPL[4000:5200]]


@pytest.fixture(scope="module")
def hooks(tmp_path_factory) -> dict[str, Path]:
    """Files whose existence turns a test hook on in the engines (see engine/core.py)."""
    base = tmp_path_factory.mktemp("hooks")
    return {"drop": base / "drop-transfers", "refuse": base / "refuse-loads"}


def _pd_with_hooks(tmp_path_factory, hooks, *args: str):
    return start_server([*PD_ARGS, "--max-engine-restarts", "20", *args],
                        tmp_path_factory.mktemp("pd") / "server.log",
                        env={DROP_KV_TRANSFERS_ENV: str(hooks["drop"]),
                             REFUSE_KV_LOADS_ENV: str(hooks["refuse"])})


@pytest.fixture(scope="module")
def servers(tmp_path_factory, hooks):
    """The colocated engine and 1 prefill + 1 decode engine, each on a core of its own; the
    latter, with its test hooks off, serves the identity tests, then the faults: recompute on
    failure, a transfer not confirmed in 5 s has failed."""
    colocated = start_server(["--max-waiting-requests", "256"],
                             tmp_path_factory.mktemp("colocated") / "server.log")
    pd = _pd_with_hooks(tmp_path_factory, hooks, "--max-waiting-requests", "256",
                        "--kv-transfer-timeout", "5", "--kv-lease-timeout", "60")
    yield colocated, pd
    stop_server(pd)
    stop_server(colocated)


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none",
                         timeout=HANG_GUARD_S, max_retries=0)


def _chat(server, prompt: str, stream: bool = False, **extra) -> str:
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
              "max_tokens": 24, "temperature": 0, **extra}
    if not stream:
        return _client(server).chat.completions.create(**kwargs).choices[0].message.content
    chunks = _client(server).chat.completions.create(stream=True, **kwargs)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _metric(server, name: str) -> float:
    return metric_value(httpx.get(f"{server.base_url}/metrics").text, name)


def _failures(server) -> dict[str, float]:
    """`tessera:kv_transfer_failures_total` by cause."""
    out = {}
    for line in httpx.get(f"{server.base_url}/metrics").text.splitlines():
        if line.startswith("tessera:kv_transfer_failures_total{"):
            out[line.split('cause="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


def _engines(server) -> list[dict]:
    return httpx.get(f"{server.base_url}/health").json()["engines"]


def _all_pages_free(server) -> bool:
    engines = _engines(server)
    return all(e["state"] == "ready" and e["kv_pages_used"] == 0
               and e["requests_in_flight"] == 0 for e in engines)


def test_greedy_output_through_the_handoff_equals_the_colocated_engine(servers):
    colocated, pd = servers
    before = _metric(pd, "tessera:kv_transfer_bytes_total")
    for prompt in PROMPTS:
        want = _chat(colocated, prompt)
        assert _chat(pd, prompt) == want
        assert _chat(pd, prompt, stream=True) == want
    assert _metric(pd, "tessera:kv_transfer_bytes_total") > before  # pages did travel
    assert [e["role"] for e in _engines(pd)] == ["prefill", "decode"]
    assert wait_for(lambda: _all_pages_free(pd), 10)


def test_prefix_hits_on_either_side_keep_the_output(servers):
    """The second prompt shares a long prefix with the first: the prefill engine's cache holds
    it, and so does the decode engine's, from the first handoff."""
    colocated, pd = servers
    shared = "Read this carefully. " + GPL[9000:10500]
    for suffix in ("What is it about?", "Who wrote it?"):
        want = _chat(colocated, shared + suffix)
        response = _client(pd).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": shared + suffix}],
            max_tokens=24, temperature=0)
        assert response.choices[0].message.content == want
    assert response.usage.prompt_tokens_details.cached_tokens > 0


def test_seeded_sampling_and_a_json_schema_survive_the_handoff(servers):
    colocated, pd = servers
    sampled = dict(temperature=0.9, seed=1234)
    assert _chat(pd, PROMPTS[2], **sampled) == _chat(colocated, PROMPTS[2], **sampled)
    schema = {"type": "object", "properties": {"city": {"type": "string"},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"]}
    constrained = dict(max_tokens=40, response_format={
        "type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    prompt = "Give the largest city of Japan and its population as JSON."
    got = _client(pd).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0,
        **constrained).choices[0].message.content
    assert got == _client(colocated).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0,
        **constrained).choices[0].message.content
    assert set(json.loads(got)) == {"city", "population"}


def test_prompt_and_sampled_logprobs_survive_the_handoff(servers):
    """Prompt logprobs come from the prefill engine with the first token, sampled ones from
    both engines. Values agree to float rounding: one thread per engine here, two colocated,
    sum in different orders."""
    body = {"model": MODEL, "prompt": PROMPTS[3][:300], "max_tokens": 6, "temperature": 0,
            "logprobs": 2, "prompt_logprobs": 2}
    got, want = (httpx.post(f"{s.base_url}/v1/completions", json=body,
                            timeout=HANG_GUARD_S).json()["choices"][0] for s in servers[::-1])
    assert got["text"] == want["text"]
    assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
    assert got["logprobs"]["token_logprobs"] == pytest.approx(
        want["logprobs"]["token_logprobs"], abs=1e-4)
    assert len(got["prompt_logprobs"]) == len(want["prompt_logprobs"])
    for mine, theirs in zip(got["prompt_logprobs"], want["prompt_logprobs"]):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            assert mine.keys() == theirs.keys()
            assert [v["logprob"] for v in mine.values()] == pytest.approx(
                [v["logprob"] for v in theirs.values()], abs=1e-4)


def test_200_concurrent_requests_all_complete_and_equal_their_colocated_results(servers):
    colocated, pd = servers
    prompts = [f"Count from {i} to {i + 5}:" for i in range(10)]
    want = {p: _client(colocated).completions.create(model=MODEL, prompt=p, max_tokens=8,
                                                     temperature=0).choices[0].text
            for p in prompts}

    async def flood() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{pd.base_url}/v1", api_key="none",
                                    timeout=HANG_GUARD_S, max_retries=0,
                                    http_client=openai.DefaultAsyncHttpxClient(
                                        limits=httpx.Limits(max_connections=256)))
        calls = [client.completions.create(model=MODEL, prompt=prompts[i % 10], max_tokens=8,
                                           temperature=0) for i in range(200)]
        return [r.choices[0].text for r in await asyncio.gather(*calls)]

    got = asyncio.run(flood())
    assert got == [want[prompts[i % 10]] for i in range(200)]
    assert wait_for(lambda: _all_pages_free(pd), 20)


def test_the_api_process_loads_no_torch_with_several_engines(servers):
    _, pd = servers
    _chat(pd, "Hi")
    assert "libtorch" not in Path(f"/proc/{pd.process.pid}/maps").read_text()


# Faults, after the identity tests on the same server. Recomputed tokens are compared on the
# default model: the tiny model's random weights leave near-ties that a recomputation's
# different sums can flip.

@pytest.fixture(scope="module")
def faulty(servers):
    return servers[1]


def _completion(prompt: str, max_tokens: int, stream: bool = False) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}


def _texts(server, prompts: list[str], max_tokens: int) -> list[str]:
    url = f"{server.base_url}/v1/completions"

    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=HANG_GUARD_S) as client:
            responses = await asyncio.gather(*(client.post(url, json=_completion(p, max_tokens))
                                               for p in prompts))
        assert [r.status_code for r in responses] == [200] * len(prompts)
        return [r.json()["choices"][0]["text"] for r in responses]

    return asyncio.run(run())


def _stream_text(events: list[str]) -> str:
    """The text of a completion stream that ended well."""
    assert events[-1] == "[DONE]"
    return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]
                   if json.loads(e)["choices"])


def _kill_in_flight(server, role: str, ready_to_kill, hook: Path | None = None) -> None:
    """4 streams run; once `ready_to_kill()` holds, the engine of `role` is SIGKILLed (with
    `hook` on until then). Each stream still ends with the right text, the engine comes
    back, and no engine holds a page."""
    url = f"{server.base_url}/v1/completions"
    prompts = [f"Tell story {i} about a fox." for i in range(4)]
    want = _texts(server, prompts, 48)
    pid = next(e["pid"] for e in _engines(server) if e["role"] == role)
    restarts = _metric(server, "tessera:engine_restarts_total")

    async def stream(client: httpx.AsyncClient, prompt: str) -> list[str]:
        async with client.stream("POST", url, json=_completion(prompt, 48, True)) as r:
            assert r.status_code == 200
            return [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]

    async def run() -> list[list[str]]:
        async with httpx.AsyncClient(timeout=HANG_GUARD_S) as client:
            streams = [asyncio.create_task(stream(client, p)) for p in prompts]
            assert await asyncio.to_thread(wait_for, ready_to_kill, HANG_GUARD_S, 0.05)
            os.kill(pid, signal.SIGKILL)
            if hook is not None:
                hook.unlink()
            return await asyncio.gather(*streams)

    if hook is not None:
        hook.touch()
    assert [_stream_text(events) for events in asyncio.run(run())] == want
    assert wait_for(lambda: _metric(server, "tessera:engine_restarts_total") > restarts, 30)
    assert wait_for(lambda: _all_pages_free(server), 60)


def test_sigkill_of_the_prefill_engine_mid_transfer_recomputes(faulty, hooks):
    """Transfers held back, the prefill engine dies with all 4 requests between engines:
    each resumes on the decode engine at once, not after the 5 s transfer timeout."""
    before = _failures(faulty)
    _kill_in_flight(faulty, "prefill",
                    lambda: _metric(faulty, "tessera:kv_transfers_in_flight") == 4,
                    hooks["drop"])
    after = _failures(faulty)
    assert after.get("prefill_died", 0) == before.get("prefill_died", 0) + 4
    assert after.get("timeout", 0) == before.get("timeout", 0)


def test_sigkill_of_the_decode_engine_mid_stream_recomputes(faulty):
    """All 4 requests decoding on the decode engine when it dies: each resumes on the
    prefill engine with the tokens it has."""
    def all_on_decode() -> bool:
        held = {e["role"]: e["requests_in_flight"] for e in _engines(faulty)}
        return held == {"prefill": 0, "decode": 4}

    before = _failures(faulty).get("decode_died", 0)
    _kill_in_flight(faulty, "decode", all_on_decode)
    assert _failures(faulty)["decode_died"] == before + 4


def test_a_transfer_that_never_arrives_times_out_and_recomputes(faulty, hooks):
    prompts = [f"w{i} w{i + 2}" for i in range(3)]
    want = _texts(faulty, prompts, 12)
    before = _failures(faulty).get("timeout", 0)
    hooks["drop"].touch()
    try:
        assert _texts(faulty, prompts, 12) == want
    finally:
        hooks["drop"].unlink()
    assert _failures(faulty)["timeout"] == before + 3
    assert wait_for(lambda: _all_pages_free(faulty), 10)  # the leases were released


def test_a_decode_engine_out_of_pages_recomputes_the_request(faulty, hooks):
    prompts = [f"w{i} w{i + 5} w{i + 7}" for i in range(3)]
    want = _texts(faulty, prompts, 12)
    hooks["refuse"].touch()
    try:
        assert _texts(faulty, prompts, 12) == want
    finally:
        hooks["refuse"].unlink()
    assert _failures(faulty)["load_failed"] >= 3
    assert wait_for(lambda: _all_pages_free(faulty), 10)


def test_a_client_gone_mid_transfer_frees_every_page(faulty, hooks):
    url = f"{faulty.base_url}/v1/completions"

    async def leave_after_first_token() -> None:
        async with httpx.AsyncClient(timeout=HANG_GUARD_S) as client:
            async with client.stream("POST", url, json=_completion("w1 w2 w3", 40, True)) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        return  # the first token came from the prefill engine

    hooks["drop"].touch()
    try:
        asyncio.run(leave_after_first_token())
        assert wait_for(lambda: _all_pages_free(faulty), 10)
    finally:
        hooks["drop"].unlink()


def test_under_fail_a_failed_handoff_is_a_503_and_frees_every_page(tmp_path_factory, hooks):
    tokenizer = write_tiny_tokenizer(tmp_path_factory.mktemp("tiny") / "tokenizer")
    server = _pd_with_hooks(tmp_path_factory, hooks, *tiny_model_args(tokenizer),
                            "--kv-load-failure", "fail", "--kv-transfer-timeout", "1")
    try:
        url = f"{server.base_url}/v1/completions"
        for hook in ("drop", "refuse"):
            hooks[hook].touch()
            try:
                r = httpx.post(url, json=_completion("w1 w2", 12), timeout=HANG_GUARD_S)
            finally:
                hooks[hook].unlink()
            assert r.status_code == 503
            assert r.json()["error"]["type"] == "service_unavailable_error"
            assert wait_for(lambda: _all_pages_free(server), 10)
        assert httpx.post(url, json=_completion("w1 w2", 12)).status_code == 200
    finally:
        stop_server(server)
