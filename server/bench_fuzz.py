"""`tessera bench fuzz`: schemathesis over the server's own `/openapi.json`.

Each operation of the document gets cases drawn from its request schema, half positive (bodies
the schema allows: they reach the tokenizer and the engine) and half negative (wrong types,
missing fields, bytes that are not JSON); the `HOSTILE` bodies below go first. Most bodies
carry the served model's name, since a random one only ever reaches the 404. The server
passes when no case gets a 5xx or no answer,
every JSON answer matches the document (OpenAI's error object for every 4xx), no stream
carries an error event, and no answer ends with `abort` (the engine refused a request the API
accepted). The same seed and case count draw the same cases.

Cases are sent while the next ones are drawn, `--concurrency` at a time, so the engine batches
them as it would real traffic.
"""
import argparse
import json
import shlex
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from engine.logs import Progress

# Bodies schemathesis does not write (its strings are valid Unicode; its numbers are finite and
# independent), each once a run: the regression rows of what fuzzing by hand found. `{model}`
# is the served model. Each must be answered, by a 200 or by OpenAI's error object.
HOSTILE = [
    # A lone UTF-16 surrogate escape decodes to a str no UTF-8 encoder takes (was a 500).
    ("/v1/chat/completions", '{"model": "{model}", "messages": [{"role": "user", '
                             '"content": "hi \\ud800"}], "max_tokens": 2}'),
    ("/v1/completions", '{"model": "{model}", "prompt": ["hi", "\\udfff"], "max_tokens": 2}'),
    ("/v1/chat/completions", '{"model": "\\ud800", "messages": [{"role": "user", '
                             '"content": "hi"}]}'),  # the 404's message echoed it (was a 500)
    ("/tokenize", '{"prompt": "\\udc00"}'),
    ("/v1/responses", '{"model": "{model}", "input": "hi", "instructions": "\\ud83d", '
                      '"max_output_tokens": 2, "stream": true}'),
    # A well-formed pair (an emoji, as clients that escape all non-ASCII send it) is text.
    ("/v1/chat/completions", '{"model": "{model}", "messages": [{"role": "user", '
                             '"content": "hi \\ud83d\\ude00"}], "max_tokens": 2}'),
    # Each seed is in int64; choice i samples with seed + i, which is not.
    ("/v1/chat/completions", '{"model": "{model}", "messages": [{"role": "user", '
                             '"content": "hi"}], "seed": 9223372036854775807, "n": 2, '
                             '"max_tokens": 2}'),
    # A top_k past int64 crashed the engine core building its tensor (found by the fuzz).
    ("/v1/completions", '{"model": "{model}", "prompt": "hi", "top_k": 9223372036854775808, '
                        '"max_tokens": 2}'),
    # Infinite and subnormal sampling numbers, an empty stop string.
    ("/v1/chat/completions", '{"model": "{model}", "messages": [{"role": "user", '
                             '"content": "hi"}], "temperature": 1e400, "max_tokens": 2}'),
    ("/v1/completions", '{"model": "{model}", "prompt": "hi", "temperature": 5e-324, '
                        '"top_p": 5e-324, "repetition_penalty": 1e-300, "max_tokens": 2}'),
    ("/v1/completions", '{"model": "{model}", "prompt": "hi", "stop": [""], "max_tokens": 2, '
                        '"stream": true}'),
    # Routes and methods the document does not have: 404 and 405, as error objects too.
    ("/v1/no-such-route", "{}"),
    ("/v1/models", "{}"),
    # Grammars xgrammar cannot build: a dangling $ref, a type that is not a string.
    ("/v1/chat/completions", '{"model": "{model}", "messages": [{"role": "user", '
                             '"content": "hi"}], "response_format": {"type": "json_schema", '
                             '"json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}}'),
    ("/v1/chat/completions", '{"model": "{model}", "messages": [{"role": "user", '
                             '"content": "hi"}], "tool_choice": "required", "tools": [{"type": '
                             '"function", "function": {"name": "f", "parameters": '
                             '{"type": 5}}}]}'),
]
_PROGRESS_INTERVAL_S = 5.0
_MAX_ROUNDS = 8  # draws with the next seed while an operation's schema yields fewer cases
_RANDOM_MODEL_EVERY = 10  # one body in ten keeps the drawn `model` (the 404 path)
_SHOWN_CHARS = 400
_LOG_TAIL_LINES = 80


@dataclass
class Failure:
    operation: str  # "POST /v1/chat/completions"
    status: int  # 0 = no answer
    why: str
    curl: str


@dataclass
class FuzzReport:
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def to_dict(self) -> dict:
        return {"cases": self.cases, "seconds": round(self.seconds, 1),
                "statuses": {str(s): n for s, n in sorted(self.statuses.items())},
                "server_errors": self.server_errors,
                "failures": [vars(f) for f in self.failures]}


def _is_error_object(body: object) -> bool:
    """OpenAI's `{"error": {"message": str, "type": str, "param", "code"}}`."""
    error = body.get("error") if isinstance(body, dict) else None
    return (isinstance(error, dict) and isinstance(error.get("message"), str)
            and isinstance(error.get("type"), str) and "param" in error and "code" in error)


def _aborted(body: object) -> bool:
    """An answer the engine refused after the API accepted it."""
    if not isinstance(body, dict):
        return False
    choices = body.get("choices") or []
    return (any(isinstance(c, dict) and c.get("finish_reason") == "abort" for c in choices)
            or body.get("status") == "failed"
            or body.get("type") == "response.failed")


def _stream_problem(text: str) -> str | None:
    """The first error event or refused answer in an SSE body."""
    for line in text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        try:
            event = json.loads(line[len("data: "):])
        except json.JSONDecodeError:
            return f"stream event is not JSON: {line[:_SHOWN_CHARS]}"
        if _is_error_object(event) or (isinstance(event, dict) and event.get("type") == "error"):
            return f"error event in the stream: {line[:_SHOWN_CHARS]}"
        if _aborted(event):
            return f"the engine aborted the request: {line[:_SHOWN_CHARS]}"
    return None


def _conformance(case, response) -> str | None:
    """schemathesis's check of a JSON answer against the document's response schema."""
    from schemathesis.specs.openapi.checks import response_schema_conformance

    try:
        case.validate_response(response, checks=[response_schema_conformance])
    except Exception as exc:  # schemathesis's FailureGroup: its message says what is off
        return f"answer does not match the document: {str(exc)[:_SHOWN_CHARS]}"
    return None


def judge(status: int, content_type: str, text: str) -> str | None:
    """What is wrong with an answer (None = nothing), short of the document's schemas."""
    media_type = content_type.split(";")[0]
    if status >= 500:
        return f"{status}: {text[:_SHOWN_CHARS]}"
    if media_type == "text/event-stream":
        return _stream_problem(text)
    if media_type != "application/json":
        return None  # /metrics
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return f"answer is not JSON: {text[:_SHOWN_CHARS]}"
    if status >= 400 and not _is_error_object(body):
        return f"{status} without OpenAI's error object: {text[:_SHOWN_CHARS]}"
    if _aborted(body):
        return f"the engine aborted the request: {text[:_SHOWN_CHARS]}"
    return None


def _no_answer(exc: Exception) -> tuple[int, str]:
    """A crash, a hang or a reset connection."""
    return 0, f"no answer: {type(exc).__name__}: {exc}"[:_SHOWN_CHARS]


def check_case(case, base_url: str, headers: dict, timeout_s: float) -> tuple[int, str | None]:
    """Send one schemathesis case; its status and what is wrong with the answer."""
    try:
        response = case.call(base_url=base_url, headers=headers, timeout=timeout_s)
    except Exception as exc:
        return _no_answer(exc)
    status = response.status_code
    why = judge(status, response.headers.get("content-type", [""])[0], response.text)
    if why is None and "json" in response.headers.get("content-type", [""])[0]:
        why = _conformance(case, response)
    return status, why


def check_hostile(path: str, raw: str, base_url: str, headers: dict,
                  timeout_s: float) -> tuple[int, str | None]:
    """Send one `HOSTILE` body as it is written."""
    try:
        response = httpx.post(base_url + path, content=raw.encode(), timeout=timeout_s,
                              headers={**headers, "content-type": "application/json"})
    except Exception as exc:
        return _no_answer(exc)
    return response.status_code, judge(response.status_code,
                                       response.headers.get("content-type", ""), response.text)


def _hostile_curl(path: str, raw: str, base_url: str, headers: dict) -> str:
    flags = "".join(f" -H {shlex.quote(f'{k}: {v}')}" for k, v in headers.items())
    return (f"curl -X POST{flags} -H 'Content-Type: application/json' -d {shlex.quote(raw)} "
            f"{base_url}{path}")


def _draw(operation, mode, count: int, seed: int, send) -> int:
    """Draw up to `count` cases of `operation`, handing each to `send` as it comes."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as seeded

    drawn = 0

    @seeded(seed)
    @settings(max_examples=count, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(operation.as_strategy(mode))
    def draw(case) -> None:
        nonlocal drawn
        drawn += 1
        send(case)

    draw()
    return drawn


def _served_model(base_url: str, headers: dict) -> str:
    return httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]


def run_fuzz(base_url: str, cases: int = 500, seed: int = 0, concurrency: int = 8,
             api_key: str | None = None, timeout_s: float = 60.0,
             progress=None) -> FuzzReport:
    """Fuzz the server at `base_url` with about `cases` cases (at least that many when its
    schemas allow) drawn from its `/openapi.json`; `progress(done, total)` as they finish."""
    import schemathesis
    from schemathesis import GenerationMode

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    document = httpx.get(f"{base_url}/openapi.json", headers=headers, timeout=30).json()
    schema = schemathesis.openapi.from_dict(document)
    results = list(schema.get_all_operations())
    if invalid := [str(r.err()) for r in results if hasattr(r, "err")]:
        raise ValueError(f"{base_url}/openapi.json: {'; '.join(invalid)}")
    operations = [r.ok() for r in results]
    with_body = [op for op in operations if op.body]
    without_body = [op for op in operations if not op.body]
    model = _served_model(base_url, headers)
    report, started = FuzzReport(), time.monotonic()
    futures: list[tuple[str, object, Future]] = []

    def send(case) -> None:
        if (isinstance(case.body, dict) and isinstance(case.body.get("model"), str)
                and len(futures) % _RANDOM_MODEL_EVERY):
            case.body["model"] = model
        futures.append((case.operation.label, case,
                        pool.submit(check_case, case, base_url, headers, timeout_s)))

    def finished() -> int:
        done = sum(f.done() for _, _, f in futures)
        if progress is not None:
            progress(done, max(cases, len(futures)))
        return done

    with ThreadPoolExecutor(concurrency) as pool:
        for path, raw in HOSTILE:
            raw = raw.replace("{model}", model)
            futures.append((f"POST {path}", (path, raw), pool.submit(
                check_hostile, path, raw, base_url, headers, timeout_s)))
        for op in without_body:
            _draw(op, GenerationMode.POSITIVE, 1, seed, send)
        for round_ in range(_MAX_ROUNDS):
            if len(futures) >= cases:
                break
            per_draw = max(1, -(-(cases - len(futures)) // (2 * len(with_body))))
            for op in with_body:
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                    _draw(op, mode, per_draw, seed + round_, send)
                    finished()
        while finished() < len(futures):
            time.sleep(0.2)
    for label, case, future in futures:
        status, why = future.result()
        report.statuses[status] += 1
        if why is not None:
            curl = (_hostile_curl(*case, base_url, headers) if isinstance(case, tuple)
                    else case.as_curl_command(headers=headers, base_url=base_url))
            report.failures.append(Failure(label, status, why, curl))
    report.cases, report.seconds = len(futures), time.monotonic() - started
    return report


def print_report(report: FuzzReport, out=sys.stdout) -> None:
    histogram = ", ".join(f"{status or 'no answer'}: {n}"
                          for status, n in sorted(report.statuses.items()))
    print(f"cases run       {report.cases} in {report.seconds:.1f} s", file=out)
    print(f"statuses        {histogram}", file=out)
    print(f"5xx             {report.server_errors}", file=out)
    print(f"failures        {len(report.failures)}", file=out)
    for f in report.failures:
        print(f"\n{f.operation} -> {f.status or 'no answer'}: {f.why}\n  {f.curl}", file=out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tessera bench fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start the tiny model with "
                                      "--max-model-len 64 and fuzz it)")
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=8, help="cases in flight")
    parser.add_argument("--api-key", help="sent as `Authorization: Bearer` on every case")
    parser.add_argument("--timeout", type=float, default=60.0, help="per case, seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    progress = Progress(args.cases, "cases", lambda line: print(line, file=sys.stderr),
                        _PROGRESS_INTERVAL_S)
    with tempfile.TemporaryDirectory(prefix="tessera-fuzz-") as tmp:
        server = None
        if args.url is None:
            from server.local_server import start_tiny_server, stop_server

            print("starting the tiny model (--max-model-len 64) ...", file=sys.stderr)
            server = start_tiny_server(Path(tmp), ["--max-model-len", "64",
                                                   "--log-level", "warning"])
        try:
            url = args.url or server.base_url
            print(f"fuzzing {url}: {args.cases} cases, seed {args.seed}", file=sys.stderr)
            report = run_fuzz(url, args.cases, args.seed, args.concurrency, args.api_key,
                              args.timeout, lambda done, _: progress.update(done))
        finally:
            if server is not None:
                stop_server(server)
                if report.failures:  # the server's side of them, before the log is gone
                    print(f"--- the server's log, last {_LOG_TAIL_LINES} lines:\n" + "\n".join(
                        server.log.read_text().splitlines()[-_LOG_TAIL_LINES:]),
                          file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print_report(report)
    sys.exit(1 if report.failures else 0)
