"""Clients that leave mid-stream leave nothing behind: hundreds of streams (chat, completions,
responses) closed after their first chunks, in waves, free every KV page and engine request,
and the server still answers. `tessera bench soak` is the long run of the same."""
import asyncio

import httpx
import pytest

from server.bench_soak import soak
from tests.conftest import metric_value, start_tiny_server, stop_server

STREAMS = 500


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    server = start_tiny_server(tmp_path_factory.mktemp("soak"), [])
    yield server
    stop_server(server)


def test_streams_dropped_after_their_first_chunks_free_every_page(tiny):
    report = asyncio.run(soak(tiny.base_url, STREAMS, concurrency=50, sample_every=250,
                              api_pid=tiny.process.pid))
    assert report.streams == STREAMS and report.errors == [] and report.leftover == []
    metrics = httpx.get(f"{tiny.base_url}/metrics").text
    assert metric_value(metrics, "tessera:kv_cache_usage_perc") == 0
    assert metric_value(metrics, "tessera:num_requests_running") == 0
    aborted = next(line for line in metrics.splitlines() if line.startswith(
        'tessera:request_success_total{finished_reason="abort"'))
    assert float(aborted.split()[-1]) >= STREAMS / 2  # most left after the engine had them
