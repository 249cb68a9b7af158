"""`/metrics` after a known set of requests: sums match the responses' usage, gauges settle."""
import shutil
import subprocess

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import metric_value, wait_for

MODEL = "SmolLM2-135M-Instruct"
PER_REQUEST_HISTOGRAMS = [
    "tessera:time_to_first_token_seconds", "tessera:e2e_request_latency_seconds",
    "tessera:time_per_output_token_seconds", "tessera:request_queue_time_seconds",
    "tessera:request_prefill_time_seconds", "tessera:request_decode_time_seconds",
    "tessera:request_prompt_tokens", "tessera:request_generation_tokens",
]


@pytest.fixture(scope="module")
def usages(server) -> list:
    """Four requests of different kinds; their `usage` as the client saw it."""
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)
    hi = [{"role": "user", "content": "Say hi."}]
    out = [client.chat.completions.create(model=MODEL, messages=hi, max_tokens=6,
                                          temperature=0).usage,
           client.completions.create(model=MODEL, prompt="One, two,", max_tokens=5,
                                     temperature=0).usage]
    stream = client.chat.completions.create(model=MODEL, messages=hi, max_tokens=7,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    out.append([c for c in stream if c.usage][-1].usage)
    stopped = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=8,
                                        temperature=0, stop=[","])
    out.append(stopped.usage)
    return out


@pytest.fixture(scope="module")
def scrape(server, usages):
    def get() -> str:
        return httpx.get(f"{server.base_url}/metrics").text
    wait_for(lambda: metric_value(get(), "tessera:num_requests_running") == 0)
    return get()


def test_token_counters_equal_the_sums_of_usage(scrape, usages):
    assert metric_value(scrape, "tessera:prompt_tokens_total") == sum(
        u.prompt_tokens for u in usages)
    assert metric_value(scrape, "tessera:generation_tokens_total") == sum(
        u.completion_tokens for u in usages)


@pytest.mark.parametrize("name", PER_REQUEST_HISTOGRAMS)
def test_each_request_histogram_counts_every_request(scrape, usages, name):
    assert metric_value(scrape, f"{name}_count") == len(usages)


def test_finished_requests_are_counted_by_reason(scrape, usages):
    families = {f.name: f for f in text_string_to_metric_families(scrape)}
    samples = families["tessera:request_success"].samples
    by_reason = {s.labels["finished_reason"]: s.value for s in samples
                 if s.name.endswith("_total")}
    assert sum(by_reason.values()) == len(usages) and by_reason.get("stop", 0) >= 1


def test_gauges_return_to_zero_when_idle(scrape):
    for name in ("tessera:num_requests_running", "tessera:num_requests_waiting",
                 "tessera:kv_cache_usage_perc"):
        assert metric_value(scrape, name) == 0, name
    assert metric_value(scrape, "tessera:kv_cache_pages_total") == 256


def test_every_tessera_metric_carries_the_model_name(scrape):
    families = [f for f in text_string_to_metric_families(scrape)
                if f.name.startswith("tessera:")]
    assert len(families) >= 20
    for family in families:
        for sample in family.samples:
            assert sample.labels.get("model_name") == MODEL, sample


def test_engine_info_describes_the_engine(scrape):
    info = next(f for f in text_string_to_metric_families(scrape)
                if f.name == "tessera:engine_info").samples[0].labels
    assert info["dtype"] == "float32" and info["device"] == "cpu" and info["page_size"] == "16"


def test_no_created_series(scrape):
    assert [line for line in scrape.splitlines() if "_created" in line] == []


def test_prefix_cache_hits_never_exceed_queries(scrape):
    assert 0 <= metric_value(scrape, "tessera:prefix_cache_hits_total") <= metric_value(
        scrape, "tessera:prefix_cache_queries_total")


# Lint rules the names that the metrics issue fixes (vLLM's convention) necessarily break:
# the `tessera:` prefix and the `iteration_tokens_total` histogram.
_EXPECTED_LINT = ("metric names should not contain ':'",
                  'non-counter metrics should not have "_total" suffix')


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_exposition_passes_promtool(scrape):
    check = subprocess.run(["promtool", "check", "metrics"], input=scrape.encode(),
                           capture_output=True, text=False)
    problems = [line for line in (check.stdout + check.stderr).decode().splitlines()
                if line.strip() and not line.endswith(_EXPECTED_LINT)]
    assert problems == []
