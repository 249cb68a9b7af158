"""One engine core kept serving: started, watched, restarted after a crash, stopped.

An engine that dies after it was ready (a crash, the OOM killer, a failed output-routing task)
has already failed its requests in flight (`EngineClient`); the supervisor then starts a new
one after a backoff that doubles with each recent crash, and `/health` is 503 until it is
ready. More than `max_restarts` crashes within `CRASH_WINDOW_S` end the supervision with the
cause (the server then exits 1): a model that cannot stay up is not restarted forever.

The disaggregated server runs several engines, one supervisor each (`server/router.py`).
"""
import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from engine.config import EngineConfig
from engine.messages import EngineReady, EngineStep, RequestOutput
from engine.sampling_params import SamplingParams
from server.engine_client import EngineClient
from server.placement import LocalEngine, RayEngine

logger = logging.getLogger("tessera.server")

CRASH_WINDOW_S = 600.0
FIRST_BACKOFF_S = 0.5
# Test hook: the first engine's output-routing task raises on this step (a real fault's path).
ROUTING_FAULT_ENV = "TESSERA_TEST_ROUTING_FAULT_AFTER_STEPS"


class EngineGaveUp(Exception):
    """The engine crashed too often; the message is the cause in one line."""


class EngineSupervisor:
    def __init__(self, config: EngineConfig, max_restarts: int,
                 on_step: Callable[[EngineStep], None], on_ready: Callable[[EngineReady], None],
                 on_restart: Callable[[], None], log_level: str = "info",
                 name: str = "engine",
                 new_placement: Callable[[], LocalEngine | RayEngine] = LocalEngine) -> None:
        """`new_placement` says where each engine it starts runs (server/placement.py)."""
        self.config, self.max_restarts, self.log_level = config, max_restarts, log_level
        self.name, self.new_placement = name, new_placement
        self.on_step, self.on_ready, self.on_restart = on_step, on_ready, on_restart
        fault = os.environ.get(ROUTING_FAULT_ENV)
        self.client = self._new_client(int(fault) if fault else None)
        self._crashes: deque[float] = deque()
        self._stopping = False

    def _new_client(self, fault_after_steps: int | None = None) -> EngineClient:
        return EngineClient(self.config, on_step=self.on_step, log_level=self.log_level,
                            fault_after_steps=fault_after_steps, name=self.name,
                            placement=self.new_placement())

    async def start(self) -> EngineReady:
        """Start the first engine; its failure raises `EngineDead` (no restart: the
        configuration itself is at fault)."""
        await self.client.start()
        ready = await self.client.wait_ready()
        self.on_ready(ready)
        return ready

    async def supervise(self) -> None:
        """Restart the engine whenever it dies, until `stop`; raise `EngineGaveUp`."""
        while True:
            await self.client.died.wait()
            if self._stopping:
                return
            reason = self.client.dead_reason
            now = time.monotonic()
            self._crashes.append(now)
            while self._crashes[0] < now - CRASH_WINDOW_S:
                self._crashes.popleft()
            if len(self._crashes) > self.max_restarts:
                raise EngineGaveUp(f"the engine core died again after {self.max_restarts} "
                                   f"restarts within {CRASH_WINDOW_S:.0f} s "
                                   f"(--max-engine-restarts); last: {reason}")
            delay = FIRST_BACKOFF_S * 2 ** (len(self._crashes) - 1)
            logger.error("engine core died (%s); restarting it in %.1f s", reason, delay)
            await self.client.shutdown()
            await asyncio.sleep(delay)
            await self._restart()

    async def _restart(self) -> None:
        started = time.monotonic()
        self.client = self._new_client()
        self.on_restart()
        await self.client.start()
        try:
            ready = await self.client.wait_ready()
        except Exception as exc:  # a failed start is one more crash: the loop counts it
            logger.error("engine core restart failed: %s", exc)
            return
        self.on_ready(ready)
        logger.info("engine core restarted in %.1f s (pid %d)", time.monotonic() - started,
                    self.client.pid)

    def check_alive(self) -> None:
        self.client.check_alive()

    def health(self, requests_in_flight: int | None = None) -> list[dict]:
        """The engine's role, state and KV pages, for `/health`."""
        c, stats = self.client, self.client.last_stats
        return [{"name": self.name, "role": self.config.disagg.role, "pid": c.pid,
                 "node": c.placement.node,
                 "state": "ready" if c.healthy else "down",
                 "kv_pages_used": stats.num_kv_pages_used if stats else None,
                 "kv_pages_total": stats.num_kv_pages_total if stats else None,
                 **({} if requests_in_flight is None
                    else {"requests_in_flight": requests_in_flight})}]

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        return self.client.generate(request_id, prompt_token_ids, params, arrival_time)

    def fail_requests(self, reason: str) -> None:
        self.client.fail_requests(reason)

    async def stop(self) -> None:
        self._stopping = True
        await self.client.shutdown()
