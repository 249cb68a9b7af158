"""The API process's handle on the engine-core process.

Binds the two ZeroMQ sockets (PUSH requests, PULL outputs), starts the engine where its
placement says (a child process, or a Ray actor: server/placement.py), and runs two tasks on
the event loop: one routes each `RequestOutput` to its request's queue, one watches the
engine. When the engine dies, or the routing task fails (the engine is then
killed, since its outputs can no longer reach anyone), every waiting request receives
`EngineDead` and new requests are refused, so nothing hangs on a process that is gone. A
client serves one engine process; `server/supervisor.py` replaces a dead one.

`generate` is the whole path of a request on a colocated engine; the router
(`server/router.py`) drives a request across engines with `attach`, `send` and `detach`, and
a decode engine's word on a KV transfer (`KVArrival`) reaches the request's queue too.
"""
import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import zmq
import zmq.asyncio

from engine.config import EngineConfig
from engine.messages import (AbortRequests, AddRequest, EngineFailed, EngineReady, EngineStep,
                             ReleaseKV, RequestOutput, StepStats, WireError, decode, encode)
from engine.sampling_params import SamplingParams
from engine.tokenizer import DEFAULT_MODEL_NAME
from server.errors import EngineUnavailable
from server.placement import LocalEngine, RayEngine

logger = logging.getLogger("tessera.server")

_WATCH_INTERVAL_S = 0.2


class EngineDead(EngineUnavailable):
    """The engine is gone (or not ready): the request gets a 503, or an `error` event.
    `engine` is the client of the engine that died (the router resumes elsewhere)."""

    def __init__(self, message: str, engine: "EngineClient | None" = None) -> None:
        super().__init__(message)
        self.engine = engine


class EngineClient:
    def __init__(self, config: EngineConfig,
                 on_step: Callable[[EngineStep], None] | None = None,
                 log_level: str = "info", fault_after_steps: int | None = None,
                 name: str = "engine", placement: LocalEngine | RayEngine | None = None
                 ) -> None:
        self.config, self.name = config, name
        self.on_step = on_step
        self.log_level = log_level
        self.ready: EngineReady | None = None
        self.dead_reason: str | None = None
        self.last_stats: StepStats | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._ctx = zmq.asyncio.Context()
        self.placement = placement or LocalEngine()
        # Where a decode engine takes handed-off requests (prefill engines send there).
        self.kv_address = (self.placement.bind_address("kv")
                           if config.disagg.role == "decode" else None)
        self._tasks: list[asyncio.Task] = []
        self._ready_event = asyncio.Event()
        self.died = asyncio.Event()
        # A test hook (see `server/supervisor.py`): the routing task raises on this step.
        self._fault_after_steps = fault_after_steps

    @property
    def healthy(self) -> bool:
        return self.ready is not None and self.dead_reason is None

    @property
    def pid(self) -> int | None:
        return self.placement.pid

    async def start(self) -> None:
        """Start the engine and return at once; `wait_ready` waits for the weights."""
        self._input = self._ctx.socket(zmq.PUSH)
        self._input.bind(self.placement.bind_address("input"))
        self._output = self._ctx.socket(zmq.PULL)
        self._output.bind(self.placement.bind_address("output"))
        endpoint = zmq.LAST_ENDPOINT  # the bound address (a TCP bind picks its port)
        await self.placement.start(
            self.config, self._input.getsockopt_string(endpoint),
            self._output.getsockopt_string(endpoint),
            self.config.model.model or DEFAULT_MODEL_NAME, self.log_level, self.kv_address)
        self._tasks = [asyncio.create_task(self._route_outputs()),
                       asyncio.create_task(self._watch_process())]

    async def wait_ready(self) -> EngineReady:
        await self._ready_event.wait()
        if self.ready is None:
            raise EngineDead(self.dead_reason or "engine core failed to start")
        return self.ready

    async def _route_outputs(self) -> None:
        """Routes until the engine dies; if routing itself fails, the engine is killed."""
        try:
            steps = 0
            while True:
                try:
                    message = decode(await self._output.recv())
                except WireError as exc:
                    logger.error("dropped a message from the engine: %s", exc)
                    continue
                if isinstance(message, EngineReady):
                    self.ready = message
                    self._ready_event.set()
                    logger.debug("engine ready: %s", message)
                    continue
                if isinstance(message, EngineFailed):
                    self._fail(message.reason)
                    continue
                steps += 1
                if steps == self._fault_after_steps:
                    raise RuntimeError(f"injected routing fault at step {steps}")
                self._route_step(message)
        except Exception as exc:
            logger.exception("routing engine outputs failed; killing the engine core")
            self._fail(f"routing engine outputs failed: {type(exc).__name__}: {exc}")
            self.placement.kill()

    def _route_step(self, step: EngineStep) -> None:
        self.last_stats = step.stats
        if self.on_step is not None:
            try:
                self.on_step(step)
            except Exception:  # metrics are not worth a request: log and route on
                logger.exception("the step callback failed")
        for item in [*step.kv_arrivals, *step.outputs]:
            queue = self._queues.get(item.request_id)
            if queue is not None:
                queue.put_nowait(item)

    async def _watch_process(self) -> None:
        while self.placement.alive():
            await asyncio.sleep(_WATCH_INTERVAL_S)
        await asyncio.sleep(_WATCH_INTERVAL_S)  # route an `EngineFailed` sent just before exit
        self._fail(self.placement.exit_reason())

    def _fail(self, reason: str) -> None:
        """Before ready, `wait_ready` raises the reason (the caller reports it)."""
        if self.dead_reason is None:
            self.dead_reason = reason
            if self.ready is not None:
                logger.error("%s; failing %d requests in flight", reason, len(self._queues))
        self.fail_requests(reason)
        self._ready_event.set()
        self.died.set()

    def fail_requests(self, reason: str) -> None:
        """End every request in flight with `EngineDead(reason)` (also used by the drain)."""
        for queue in self._queues.values():
            queue.put_nowait(EngineDead(reason, self))

    def check_alive(self) -> None:
        if self.dead_reason is not None:
            raise EngineDead(self.dead_reason, self)
        if self.ready is None:
            raise EngineDead("the engine is still loading the model", self)

    def attach(self, request_id: str, queue: asyncio.Queue) -> None:
        """Route the request's outputs, KV arrivals and this engine's death to `queue`."""
        self._queues[request_id] = queue

    def detach(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def send(self, message: AddRequest | AbortRequests | ReleaseKV) -> None:
        """To the engine, unless it is dead (then there is no one to tell)."""
        if self.dead_reason is None:
            await self._input.send(encode(message))

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, arrival_time: float | None = None,
                       ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs until the finishing one.

        Raises `EngineDead`. Leaving early (a stop string, a client gone, a cancelled task)
        aborts the request in the engine, so its pages are freed at once.
        """
        self.check_alive()
        queue: asyncio.Queue = asyncio.Queue()
        self.attach(request_id, queue)
        finished = False
        try:
            await self.send(AddRequest(request_id, prompt_token_ids, params,
                                       arrival_time or time.time()))
            while not finished:
                item = await queue.get()
                if isinstance(item, EngineDead):
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            self.detach(request_id)
            if not finished:
                await self.send(AbortRequests([request_id]))

    async def shutdown(self) -> None:
        """Kill the engine: it ignores SIGTERM (see `run_engine_core`) and holds no state."""
        for task in self._tasks:
            task.cancel()
        self.placement.kill()
        await asyncio.to_thread(self.placement.join, 5)
        self._ctx.destroy(linger=0)
        self.placement.close()
