"""The HTTP API: a flat route table over `serving`, and `tessera serve`.

Every handler raises on a user's mistake and `errors` answers; no handler formats an error.
The engine core runs in a child process started by the app's lifespan and kept up by its
supervisor, so `/health` answers 503 while the weights load, while a crashed engine restarts
and while the server drains. A start that fails (the engine or the tokenizer), or an engine
that keeps crashing, stops the server, which then exits 1 with the cause in one line.

SIGTERM or SIGINT drains: new calls get 503, calls in flight may finish for up to
`--shutdown-timeout` seconds, the rest end with a 503 (an `error` event when streamed), and
the server exits 0. A second signal stops at once.
"""
import asyncio
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from engine.config import EngineConfig
from engine.logs import configure_logging, one_line
from engine.messages import EngineReady
from engine.tokenizer import load_tokenizer, resolve_model_path
from server import __version__, errors, openapi
from server.admission import Admission, AdmissionLimits
from server.config import ServerConfig, log_effective
from server.engine_client import EngineDead
from server.errors import APIError, EngineUnavailable
from server.metrics import Metrics
from server.middleware import BodySizeLimit, RequestIdAndAuth
from server.openapi import Route
from server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                             CompletionResponse, DetokenizeRequest, ModelCard, ModelList,
                             SamplingRequest, TokenizeRequest, random_id)
from server.responses import ChatResponder, CompletionResponder, sse_stream
from server.responses_api import (ResponseBuilder, ResponseObject, ResponsesRequest,
                                  prepare_response, response_events, to_chat_request)
from server.serving import (Delta, ServingContext, chat_prompt_ids, collect, fan_out,
                            prepare_chat, prepare_completion, run_off_loop)
from server.placement import ray_placement
from server.router import Router
from server.supervisor import EngineGaveUp, EngineSupervisor

logger = logging.getLogger("tessera.server")

_ENGINE_LOG_INTERVAL_S = 10.0


class AppState:
    """What the handlers share; `serving` is set once the engine and tokenizer are ready."""

    def __init__(self, engine_config: EngineConfig, settings: ServerConfig,
                 stop_server: Callable[[], None]) -> None:
        self.settings = settings
        self.metrics = Metrics(settings.served_model_name)
        self.engine: EngineSupervisor | Router
        replicas = settings.data_parallel_size
        if settings.prefill_engines or replicas > 1 or \
                engine_config.parallel.distributed_executor_backend == "ray":
            self.engine = Router(engine_config, settings.prefill_engines,
                                 settings.decode_engines, settings.cpus_per_engine,
                                 sorted(os.sched_getaffinity(0)), settings.max_engine_restarts,
                                 self.metrics, log_level=settings.log_level,
                                 num_replicas=0 if settings.prefill_engines else replicas,
                                 ray_placement=ray_placement(engine_config, settings))
        else:
            self.engine = EngineSupervisor(engine_config, settings.max_engine_restarts,
                                           on_step=self.metrics.on_step,
                                           on_ready=self.metrics.on_ready,
                                           on_restart=self.metrics.engine_restarts.inc,
                                           log_level=settings.log_level)
        self.admission = Admission(engine_config.scheduler.max_num_seqs, AdmissionLimits(
            settings.max_waiting_requests, settings.max_queued_prompt_tokens,
            settings.max_choices_per_request), self.metrics.on_reject)
        self.tokenizer_path = engine_config.model.tokenizer_path
        self.takes_kv_policy = engine_config.cache.kv_head_config is None
        self.serving: ServingContext | None = None
        self.stop_server = stop_server
        self.failure: str | None = None

    async def start(self) -> None:
        """The engine loads the weights while this process loads the tokenizer; the first
        failure of either is the cause."""
        started = time.monotonic()
        tokenizer, ready = await asyncio.gather(self._load_tokenizer(), self._start_engine())
        self.serving = ServingContext(self.engine, self.admission, tokenizer, self.metrics,
                                      self.settings.served_model_name, ready.max_model_len,
                                      ready.vocab_size, self.settings.log_prompts,
                                      self.settings.chat_template or tokenizer.chat_template,
                                      self.takes_kv_policy)
        logger.info("ready in %.1f s: serving %s (max_model_len %d) on http://%s:%d",
                    time.monotonic() - started, self.settings.served_model_name,
                    ready.max_model_len, self.settings.host, self.settings.port)

    async def _load_tokenizer(self):
        try:
            return await asyncio.to_thread(load_tokenizer, self.tokenizer_path)
        except Exception as exc:
            logger.debug("loading the tokenizer failed", exc_info=True)
            raise StartFailed(f"tokenizer: {one_line(exc)}") from exc

    async def _start_engine(self) -> EngineReady:
        try:
            return await self.engine.start()
        except EngineDead as exc:
            raise StartFailed(f"engine core: {exc}") from exc

    def ready_context(self) -> ServingContext:
        if self.admission.draining:
            raise EngineUnavailable("the server is shutting down")
        try:
            self.engine.check_alive()
        except EngineDead as exc:
            raise EngineUnavailable(str(exc)) from exc
        if self.serving is None:
            raise EngineUnavailable("the server is still loading the tokenizer")
        return self.serving

    async def drain(self) -> None:
        """Admit nothing more; give the calls in flight `--shutdown-timeout` seconds, then
        end the rest with a 503."""
        timeout = self.settings.shutdown_timeout
        self.admission.draining = True
        logger.info("draining: %d requests in flight, waiting up to %.0f s for them "
                    "(--shutdown-timeout); new requests get 503", self.admission.in_flight,
                    timeout)
        if not await _wait_until(lambda: self.admission.in_flight == 0, timeout):
            logger.warning("shutdown timeout passed: ending %d requests with an error",
                           self.admission.in_flight)
            self.engine.fail_requests("the server is shutting down")
            await _wait_until(lambda: self.admission.in_flight == 0, _FAILED_FLUSH_S)


_FAILED_FLUSH_S = 2.0  # for failed calls to send their error before the server stops


async def _wait_until(done: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return done()


class StartFailed(Exception):
    """The server cannot become ready; the message is the cause in one line."""


async def _log_engine_periodically(metrics: Metrics) -> None:
    while True:
        await asyncio.sleep(_ENGINE_LOG_INTERVAL_S)
        metrics.window.log_and_reset()


async def _run_engine(state: AppState) -> None:
    """Start, then supervise; a failure of either stops the server with the cause."""
    try:
        await state.start()
        await state.engine.supervise()
        return
    except (StartFailed, EngineGaveUp) as exc:
        state.failure = str(exc)
    except Exception as exc:  # a fault of ours: its traceback helps
        logger.exception("start-up failed")
        state.failure = one_line(exc)
    logger.error("%s, stopping: %s", "start-up failed" if state.serving is None
                 else "the engine cannot be kept up", state.failure)
    state.stop_server()


def build_app(engine_config: EngineConfig, settings: ServerConfig,
              stop_server: Callable[[], None]) -> FastAPI:
    """The app; `stop_server` is called when the start fails (it makes uvicorn exit)."""
    state = AppState(engine_config, settings, stop_server)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        logger.info("loading model %s in the engine core; /health answers 503 until ready",
                    resolve_model_path(engine_config.model.model))
        tasks = [asyncio.create_task(_run_engine(state)),
                 asyncio.create_task(_log_engine_periodically(state.metrics))]
        yield
        for task in tasks:
            task.cancel()
        await state.engine.stop()

    app = FastAPI(title="Tessera", lifespan=lifespan)
    app.state.tessera = state
    errors.install(app)
    app.add_middleware(BodySizeLimit, limit=settings.max_request_body_size)
    app.add_middleware(RequestIdAndAuth, api_key=settings.api_key)  # outside: ids on 413s
    if settings.allowed_origins:  # outermost, so preflights never meet the API key check
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                           allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["x-request-id"])
    operations, components = openapi.describe(ROUTES)
    for route, operation in zip(ROUTES, operations):
        app.add_api_route(route.path, _endpoint(route), methods=[route.method],
                          name=route.handler.__name__, description=route.handler.__doc__,
                          openapi_extra=operation)
    openapi.install(app, components)
    return app


def _endpoint(route: Route) -> Callable[[Request], Awaitable[Response]]:
    """The handler, given its parsed body when the route has a body model."""
    if route.body is None:
        return route.handler

    async def endpoint(request: Request) -> Response:
        return await route.handler(request, await _parse(request, route.body))
    return endpoint


# Bodies larger than this are decoded and validated in a worker thread: 12 MB of token ids took
# 1.1 s to json.loads on a busy 2-core CPU, a stall of every other request on the event loop.
_INLINE_PARSE_BYTES = 2**20
# Deeper bodies are a 400: far past any real request (pydantic models nest schemas through
# `$defs`), well inside Python's recursion limit that the schema walks (ours, `json`, xgrammar's
# converter) share, and before a nested schema's grammar grows with the square of its depth.
MAX_JSON_DEPTH = 100
_CONTAINERS = {dict, list}  # what json.loads makes of arrays and objects
_TOO_DEEP = f"request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep"


def _check_json_content_type(request: Request) -> None:
    """`text/plain` or a form type would let a page on another site post here without a CORS
    preflight; `application/json` cannot be sent that way."""
    given = request.headers.get("content-type", "")
    if given.split(";")[0].strip().lower() != "application/json":
        raise APIError(f"Content-Type must be application/json, got {given or 'none'}",
                       status=415, code="unsupported_media_type")


def _reject_constant(name: str):
    raise APIError(f"request body is not valid JSON: {name} is not a JSON value")


def _nesting_within(value: dict, limit: int) -> bool:
    """Whether no array or object lies more than `limit` levels deep (level by level, so no
    recursion whatever the depth; a list of scalars, such as 4M token ids, is passed over at C
    speed by `isdisjoint`)."""
    level = [value]
    for _ in range(limit):
        deeper = []
        for node in level:
            children = node.values() if isinstance(node, dict) else node
            if not _CONTAINERS.isdisjoint(map(type, children)):
                deeper += [child for child in children if type(child) in _CONTAINERS]
        if not deeper:
            return True
        level = deeper
    return False


def _decode(raw: bytes, model: type[BaseModel]) -> BaseModel:
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise APIError(_TOO_DEEP) from exc
    except (ValueError, UnicodeDecodeError) as exc:  # also an integer of over 4300 digits
        raise APIError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise APIError("request body must be a JSON object")
    if not _nesting_within(body, MAX_JSON_DEPTH):
        raise APIError(_TOO_DEEP)
    _reject_lone_surrogates(raw, body)
    for name, unused in getattr(model, "UNSUPPORTED", {}).items():
        if body.get(name, unused) not in (None, unused):
            raise APIError(f"{name} is not supported by this server", param=name)
    return model.model_validate(body)


# A `\uD800`-`\uDFFF` escape: the only way JSON text can hold a UTF-16 surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _reject_lone_surrogates(raw: bytes, body: dict) -> None:
    """A surrogate escape without its pair decodes to a str that is not text: the tokenizer
    and every UTF-8 encoder (our JSON answers included) raise on it, so it is a 400 here."""
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError as exc:
            raise APIError(f"request body holds an unpaired UTF-16 surrogate "
                           f"({exc.object[exc.start:exc.end]!a})") from None


async def _parse(request: Request, model: type[BaseModel]) -> BaseModel:
    """The body as `model`: another content type is a 415; malformed JSON, `NaN`, a non-object,
    too deep a nesting, a wrong type or a field we do not support is a 400 naming it."""
    _check_json_content_type(request)
    raw = await request.body()
    if len(raw) > _INLINE_PARSE_BYTES:
        return await asyncio.to_thread(_decode, raw, model)
    return _decode(raw, model)


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable):
    """Run `work`, cancelling it (and so aborting its engine request) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_until_disconnected(request))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        return Response(status_code=499)
    return task.result()


def _state(request: Request) -> AppState:
    return request.app.state.tessera


async def _respond(request: Request, body: SamplingRequest,
                   deltas: AsyncIterator[tuple[int, Delta]],
                   responder: ChatResponder | CompletionResponder, count: int) -> Response:
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(sse_stream(deltas, responder, count, include_usage),
                                 media_type="text/event-stream")
    return await _whole(request, deltas, count, responder.whole)


async def _whole(request: Request, deltas: AsyncIterator[tuple[int, Delta]], count: int,
                 body: Callable[[list[Delta]], dict]) -> Response:
    """The joined choices as one JSON `body`, or 499 if the client left first."""
    whole = await _unless_disconnected(request, collect(deltas, count))
    if isinstance(whole, Response):
        return whole
    return JSONResponse(body(whole))


async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    arrival = time.time()
    ctx = _state(request).ready_context()
    prompt_ids, params, plan = await prepare_chat(ctx, body)
    request_id = random_id("chatcmpl")
    deltas = fan_out(ctx, request_id, [(prompt_ids, params)], body.n, arrival,
                     body.messages[-1].text())
    responder = ChatResponder(ctx, request_id, body.n, plan, body.logprobs, prompt_ids,
                              body.prompt_logprobs)
    return await _respond(request, body, deltas, responder, body.n)


async def completions(request: Request, body: CompletionRequest) -> Response:
    arrival = time.time()
    ctx = _state(request).ready_context()
    prompts = await prepare_completion(ctx, body)
    request_id = random_id("cmpl")
    deltas = fan_out(ctx, request_id, prompts, body.n, arrival, str(body.prompt))
    responder = CompletionResponder(ctx, request_id, body.n, [ids for ids, _ in prompts],
                                    body.echo, body.logprobs, body.prompt_logprobs)
    return await _respond(request, body, deltas, responder, len(prompts) * body.n)


async def responses(request: Request, body: ResponsesRequest) -> Response:
    """OpenAI's Responses API over the chat path (see `server/responses_api.py`)."""
    arrival = time.time()
    ctx = _state(request).ready_context()
    chat = to_chat_request(body)
    prompt_ids, params, plan = await prepare_response(ctx, chat)
    builder = ResponseBuilder(ctx, body, plan)
    deltas = fan_out(ctx, builder.response.id, [(prompt_ids, params)], 1, arrival,
                     chat.messages[-1].text())
    if body.stream:
        return StreamingResponse(response_events(deltas, builder),
                                 media_type="text/event-stream")
    return await _whole(request, deltas, 1, builder.whole)


async def tokenize(request: Request, body: TokenizeRequest) -> Response:
    """vLLM's shape: `{"count", "max_model_len", "tokens"[, "token_strs"]}`. Big prompts are
    tokenized, and their ids rendered, off the event loop."""
    ctx = _state(request).ready_context()
    if (body.prompt is None) == (body.messages is None):
        raise APIError("give exactly one of prompt and messages", param="prompt")
    if body.messages is not None:
        ids = await chat_prompt_ids(ctx, body)
    else:
        ids = await run_off_loop(lambda: ctx.tokenizer.encode(
            body.prompt, add_special_tokens=body.add_special_tokens), len(body.prompt))
    out = {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids}
    if body.return_token_strs:
        out["token_strs"] = await run_off_loop(
            lambda: ctx.tokenizer.convert_ids_to_tokens(ids), len(ids))
    return await run_off_loop(lambda: JSONResponse(out), len(ids))


async def detokenize(request: Request, body: DetokenizeRequest) -> Response:
    ctx = _state(request).ready_context()
    vocab = len(ctx.tokenizer)

    def decode() -> str:
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(f"tokens must be in [0, {vocab})", param="tokens")
        return ctx.tokenizer.decode(body.tokens)

    return JSONResponse({"prompt": await run_off_loop(decode, len(body.tokens))})


async def models(request: Request) -> JSONResponse:
    ctx = _state(request).ready_context()
    card = ModelCard(id=ctx.served_model_name, max_model_len=ctx.max_model_len)
    return JSONResponse(ModelList(data=[card]).model_dump())


async def health(request: Request) -> JSONResponse:
    """Also vLLM's `/ping` (SageMaker's health check); lists each engine's role, state and KV
    pages. 503 while no engine is ready."""
    state = _state(request)
    state.ready_context()
    return JSONResponse({"status": "ok", "engines": state.engine.health()})


async def version(request: Request) -> JSONResponse:
    return JSONResponse({"version": __version__})


async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.exposition(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


ROUTES = [  # method, path, handler, request body model, 200's JSON model
    Route("POST", "/v1/chat/completions", chat_completions, ChatCompletionRequest,
          ChatCompletionResponse),
    Route("POST", "/v1/completions", completions, CompletionRequest, CompletionResponse),
    Route("POST", "/v1/responses", responses, ResponsesRequest, ResponseObject),
    Route("GET", "/v1/models", models, answer=ModelList),
    Route("POST", "/tokenize", tokenize, TokenizeRequest),
    Route("POST", "/detokenize", detokenize, DetokenizeRequest),
    Route("GET", "/health", health),
    Route("GET", "/ping", health),
    Route("POST", "/ping", health),
    Route("GET", "/version", version),
    Route("GET", "/metrics", metrics),
]


class _DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM or SIGINT drains (`AppState.drain`) before the
    usual shutdown, and the signal is not raised again afterwards, so a drained server exits
    0. A second signal shuts down at once; a third skips even the lifespan's cleanup."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_requested = False
        self.drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if not self.drain_requested:
            self.drain_requested = True
        elif not self.should_exit:
            self.should_exit = True
        else:
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_requested and self.drain_task is None:
            self.drain_task = asyncio.create_task(self.drain())
        if self.drain_task is not None and self.drain_task.done():
            self.should_exit = True
        return await super().on_tick(counter)


def serve(engine_config: EngineConfig, settings: ServerConfig) -> None:
    """Serve until stopped; exit 1 if the start failed or the engine kept crashing."""
    configure_logging(settings.log_level)
    log_effective(engine_config, settings)
    server: uvicorn.Server | None = None

    def stop() -> None:
        server.should_exit = True

    app = build_app(engine_config, settings, stop)
    server = _DrainingServer(uvicorn.Config(app, host=settings.host, port=settings.port,
                                            log_level=settings.log_level,
                                            timeout_graceful_shutdown=5),
                             app.state.tessera.drain)
    server.run()
    if app.state.tessera.failure is not None:
        raise SystemExit(1)
