"""`tessera bench soak`: streams dropped after their first chunks, by the thousand.

Each stream (chat, completions and responses in turn, a distinct prompt each, so the prefix
cache fills as real traffic fills it) is read for one to three `data:` events and then its
connection is closed, `--concurrency` at a time. Every `--sample-every` streams the run waits
until the server is idle, checks that no KV page and no request is left behind (`/metrics`),
and samples the resident memory of the engine core and of the API process. Growth per 1,000
streams that keeps its pace after the first samples is a leak; growth that flattens is the
allocator and the prefix cache filling up. A normal request must still be answered at the end.
"""
import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from engine.logs import Progress
from server.local_server import engine_pid, metric_value, rss_bytes

_PROGRESS_INTERVAL_S = 5.0
_IDLE_TIMEOUT_S = 60.0
_ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/responses"]
_MIB = 2**20


@dataclass
class Sample:
    streams: int
    engine_rss: int | None  # bytes; None when the pids are unknown
    api_rss: int | None


@dataclass
class SoakReport:
    streams: int = 0
    errors: list[str] = field(default_factory=list)  # streams that got no first chunk
    samples: list[Sample] = field(default_factory=list)
    leftover: list[str] = field(default_factory=list)  # pages or requests left when idle
    seconds: float = 0.0

    def growth_per_1000(self, which: str, since: int = 0) -> float | None:
        """MiB per 1,000 streams between sample `since` and the last."""
        first, last = self.samples[since], self.samples[-1]
        a, b = getattr(first, which), getattr(last, which)
        if a is None or b is None or last.streams == first.streams:
            return None
        return (b - a) / _MIB * 1000 / (last.streams - first.streams)


def _body(endpoint: str, model: str, index: int, max_tokens: int) -> dict:
    # Words w0..w299 are whole tokens of the tiny tokenizer and plain text to any other.
    words = " ".join(f"w{(index * 7 + k * 13) % 300}" for k in range(4 + index % 9))
    text = f"w{index % 300} w{index // 300 % 300} {words}"
    if endpoint == "/v1/completions":
        return {"model": model, "prompt": text, "max_tokens": max_tokens, "stream": True}
    if endpoint == "/v1/responses":
        return {"model": model, "input": text, "max_output_tokens": max_tokens, "stream": True}
    return {"model": model, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "stream": True}


async def _drop_after_first_chunks(client: httpx.AsyncClient, base_url: str, model: str,
                                   index: int, max_tokens: int) -> str | None:
    """One stream, closed after 1-3 `data:` events; what went wrong, or None."""
    endpoint = _ENDPOINTS[index % len(_ENDPOINTS)]
    chunks = 1 + index % 3
    async with client.stream("POST", base_url + endpoint,
                             json=_body(endpoint, model, index, max_tokens)) as response:
        if response.status_code != 200:
            return f"{endpoint}: {response.status_code} {(await response.aread())[:200]!r}"
        async for line in response.aiter_lines():
            chunks -= line.startswith("data: ")
            if chunks == 0:
                return None  # leaving the block closes the connection mid-stream
    return f"{endpoint}: the stream ended before its chunks"


async def _wait_idle(client: httpx.AsyncClient, base_url: str) -> list[str]:
    """Wait until no page and no request is held; what is still held after the timeout."""
    names = ["tessera:kv_cache_usage_perc", "tessera:num_requests_running",
             "tessera:num_requests_waiting"]
    deadline = time.monotonic() + _IDLE_TIMEOUT_S
    while True:
        text = (await client.get(f"{base_url}/metrics")).text
        held = [f"{n} {metric_value(text, n)}" for n in names if metric_value(text, n) != 0]
        if not held or time.monotonic() > deadline:
            return held
        await asyncio.sleep(0.2)


async def soak(base_url: str, streams: int, concurrency: int = 32, sample_every: int = 1000,
               max_tokens: int = 32, api_pid: int | None = None,
               progress: Callable[[int], None] | None = None,
               on_sample: Callable[[Sample], None] | None = None) -> SoakReport:
    """Drop `streams` streams at `base_url`; RSS samples need the API process's pid."""
    report, started = SoakReport(), time.monotonic()

    def sample(done: int) -> None:
        engine = engine_pid(api_pid) if api_pid is not None else None  # a restart moves it
        report.samples.append(Sample(done, engine and rss_bytes(engine),
                                     api_pid and rss_bytes(api_pid)))
        if on_sample is not None:
            on_sample(report.samples[-1])

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        model = (await client.get(f"{base_url}/v1/models")).json()["data"][0]["id"]
        sample(0)
        done = 0
        while done < streams:
            end = min(done + concurrency, streams, (done // sample_every + 1) * sample_every)
            outcomes = await asyncio.gather(
                *(_drop_after_first_chunks(client, base_url, model, i, max_tokens)
                  for i in range(done, end)), return_exceptions=True)
            report.errors += [o if isinstance(o, str) else f"{type(o).__name__}: {o}"
                              for o in outcomes if o is not None]
            done = end
            if progress is not None:
                progress(done)
            if done % sample_every == 0 or done == streams:
                report.leftover = await _wait_idle(client, base_url)
                if report.leftover:
                    break
                sample(done)
        report.streams = done
        answer = await client.post(f"{base_url}/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "w1 w2"}],
            "max_tokens": 4})
        if answer.status_code != 200:
            report.errors.append(f"the request after the soak: {answer.status_code} "
                                 f"{answer.text[:200]}")
    report.seconds = time.monotonic() - started
    return report


def _print_sample(s: Sample) -> None:
    if s.engine_rss is not None:
        print(f"{s.streams} streams: engine RSS {s.engine_rss / _MIB:.1f} MiB, API RSS "
              f"{s.api_rss / _MIB:.1f} MiB", file=sys.stderr)


def print_report(report: SoakReport) -> None:
    print(f"streams dropped  {report.streams} in {report.seconds:.1f} s")
    print(f"errors           {len(report.errors)}" + "".join(f"\n  {e}" for e in
                                                              report.errors[:10]))
    print(f"left when idle   {', '.join(report.leftover) or 'nothing'}")
    if report.samples[0].engine_rss is None:
        return
    print("streams  engine RSS MiB  API RSS MiB")
    for s in report.samples:
        print(f"{s.streams:>7}  {s.engine_rss / _MIB:>14.1f}  {s.api_rss / _MIB:>11.1f}")
    for label, since in (("whole run", 0), ("after the first sample", 1)):
        if since < len(report.samples) - 1:
            print(f"growth per 1,000 streams, {label}: engine "
                  f"{report.growth_per_1000('engine_rss', since):+.2f} MiB, API "
                  f"{report.growth_per_1000('api_rss', since):+.2f} MiB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tessera bench soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--server-pid", type=int,
                        help="with --url: the API process, for the RSS samples")
    parser.add_argument("--tiny", action="store_true",
                        help="start the tiny dummy model instead of SmolLM2")
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32, help="streams in flight")
    parser.add_argument("--sample-every", type=int, default=1000, help="streams per sample")
    parser.add_argument("--max-tokens", type=int, default=32, help="of each stream")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.url is not None and args.tiny:
        parser.error("--tiny starts its own server: not with --url")
    progress = Progress(args.streams, "streams", lambda line: print(line, file=sys.stderr),
                        _PROGRESS_INTERVAL_S)
    with tempfile.TemporaryDirectory(prefix="tessera-soak-") as tmp:
        server, url, pid = None, args.url, args.server_pid
        if url is None:
            from server import local_server

            print(f"starting {'the tiny model' if args.tiny else 'SmolLM2'} ...",
                  file=sys.stderr)
            flags = ["--log-level", "warning"]
            server = (local_server.start_tiny_server(Path(tmp), flags) if args.tiny else
                      local_server.start_server(flags, Path(tmp) / "server.log"))
            url, pid = server.base_url, server.process.pid
        try:
            print(f"soaking {url}: {args.streams} streams, {args.concurrency} at a time",
                  file=sys.stderr)
            report = asyncio.run(soak(url, args.streams, args.concurrency, args.sample_every,
                                      args.max_tokens, pid, progress.update, _print_sample))
        finally:
            if server is not None:
                local_server.stop_server(server)
    if args.json:
        print(json.dumps({"streams": report.streams, "seconds": round(report.seconds, 1),
                          "errors": report.errors, "leftover": report.leftover,
                          "samples": [vars(s) for s in report.samples],
                          "engine_mib_per_1000": report.growth_per_1000("engine_rss"),
                          "api_mib_per_1000": report.growth_per_1000("api_rss")}))
    else:
        print_report(report)
    sys.exit(1 if report.errors or report.leftover else 0)
