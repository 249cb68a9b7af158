"""Several engines behind one API: prefill engines hand requests to decode engines.

A request goes to a prefill engine (the least loaded, or the one that last saw its first page,
whose prefix cache may hold it), which computes the prompt's KV and the first token, streamed
at once, then sends the request with its pages straight to the decode engine the router named
(`AddRequest.handoff_address`, `engine/kv_transfer.py`) and keeps the pages under a lease. The
decode engine's word that it has them (`KVArrival`) releases the lease, and its outputs
stream on. A request under a kv_policy, or one that finishes with its first token, stays on
the prefill engine.

What can fail, fails within a bound: an engine holding the request dies (its client says so
within `_WATCH_INTERVAL_S`), or the transfer is not confirmed within `--kv-transfer-timeout`.
Under `--kv-load-failure recompute` the request is resumed with the tokens the client already
has on a live engine (a decode engine first), which recomputes them; under `fail` the client
gets a 503. Either way the engines that held it are told to abort it, which frees their pages
and makes a late transfer drop on arrival. A decode engine without free pages for a transfer
decides the same way itself.

Each engine has its own supervisor, which restarts it after a crash; a dead engine takes no
new requests until it is ready again.

With replicas instead (`--data-parallel-size`), every engine is colocated and a request goes
to one of them by the same rule as a prefill (load, then prefix affinity); a replica that dies
fails only the requests it held. Replicas are local processes or Ray actors
(server/placement.py); the router sees only their clients either way.
"""
import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import replace
from functools import partial

from engine.config import EngineConfig
from engine.messages import (AbortRequests, AddRequest, EngineReady, KVArrival, ReleaseKV,
                             RequestOutput)
from engine.sampling_params import SamplingParams
from scheduler.block_manager import page_hash
from server.engine_client import EngineClient, EngineDead
from server.placement import LocalEngine, RayEngine, RayPlacement
from server.errors import EngineUnavailable
from server.metrics import Metrics
from server.supervisor import EngineSupervisor

logger = logging.getLogger("tessera.server")

_AFFINITY_ENTRIES = 4096  # first-page hashes remembered for prefix affinity
_AFFINITY_SLACK = 4  # requests more in flight than the least loaded that affinity may take
_PLACEMENT_TIMEOUT_S = 60.0  # for the Ray cluster to reserve every replica's bundle


def engine_cpus(index: int, cpus_per_engine: int, available: list[int]) -> list[int]:
    """The cores of the `index`-th engine: consecutive blocks of the cores this process may
    use, wrapping around; [] (all) when `cpus_per_engine` is 0."""
    if cpus_per_engine == 0:
        return []
    return [available[(index * cpus_per_engine + i) % len(available)]
            for i in range(cpus_per_engine)]


class Router:
    """Prefill and decode engines (`num_prefill`, `num_decode`), or `num_replicas` colocated
    engines (data parallelism), local processes or, with `ray_placement`, Ray actors in its
    placement group."""

    def __init__(self, config: EngineConfig, num_prefill: int, num_decode: int,
                 cpus_per_engine: int, available_cpus: list[int], max_restarts: int,
                 metrics: Metrics, log_level: str = "info", num_replicas: int = 0,
                 ray_placement: RayPlacement | None = None) -> None:
        self.config, self.metrics, self.ray_placement = config, metrics, ray_placement
        roles = ["prefill"] * num_prefill + ["decode"] * num_decode
        self.engines: list[EngineSupervisor] = []
        for i, role in enumerate(roles + ["colocated"] * num_replicas):
            name = f"{role}-{roles[:i].count(role)}" if role != "colocated" else f"replica-{i}"
            # Ray actors get their cores from their bundle.
            cpus = [] if ray_placement else engine_cpus(i, cpus_per_engine, available_cpus)
            disagg = replace(config.disagg, role=role, cpu_ids=cpus)
            self.engines.append(EngineSupervisor(
                replace(config, disagg=disagg), max_restarts,
                on_step=lambda step, name=name: metrics.on_step(step, name),
                on_ready=metrics.on_ready, on_restart=metrics.engine_restarts.inc,
                log_level=log_level, name=name,
                new_placement=partial(RayEngine, ray_placement, i) if ray_placement
                else LocalEngine))
        self.in_flight = {e.name: 0 for e in self.engines}
        self._affinity: OrderedDict[int, str] = OrderedDict()

    async def start(self) -> EngineReady:
        if self.ray_placement is not None:
            await self.ray_placement.ready(_PLACEMENT_TIMEOUT_S)
        readies = await asyncio.gather(*(e.start() for e in self.engines))
        return readies[0]

    async def supervise(self) -> None:
        await asyncio.gather(*(e.supervise() for e in self.engines))

    async def stop(self) -> None:
        await asyncio.gather(*(e.stop() for e in self.engines))

    def fail_requests(self, reason: str) -> None:
        for e in self.engines:
            e.fail_requests(reason)

    def check_alive(self) -> None:
        if not any(e.client.healthy for e in self.engines):
            raise EngineDead("no engine is ready")

    def health(self) -> list[dict]:
        """Each engine's role, state and KV pages, for `/health`."""
        return [entry for e in self.engines for entry in e.health(self.in_flight[e.name])]

    def _pick(self, role: str, prompt: list[int] | None = None) -> EngineClient | None:
        """The least loaded healthy engine of `role` (fewest requests in flight through this
        router, then most free pages); for a prefill, the one that last took the prompt's
        first page unless it is much busier."""
        healthy = [e for e in self.engines if e.config.disagg.role == role and e.client.healthy]
        if not healthy:
            return None

        def load(e: EngineSupervisor) -> tuple[int, int]:
            stats = e.client.last_stats
            return self.in_flight[e.name], stats.num_kv_pages_used if stats else 0

        best = min(healthy, key=load)
        page = self.config.cache.page_size
        if prompt is not None and len(prompt) > page:
            key = page_hash(None, tuple(prompt[:page]))
            named = next((e for e in healthy if e.name == self._affinity.get(key)), None)
            if named is not None and load(named)[0] <= load(best)[0] + _AFFINITY_SLACK:
                best = named
            self._affinity[key] = best.name
            self._affinity.move_to_end(key)
            if len(self._affinity) > _AFFINITY_ENTRIES:
                self._affinity.popitem(last=False)
        return best.client

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, arrival_time: float | None = None,
                       ) -> AsyncIterator[RequestOutput]:
        """The request's outputs, wherever it runs; raises `EngineUnavailable` when it cannot
        finish. Leaving early aborts it on every engine that holds it."""
        arrival = arrival_time or time.time()
        prefill = self._pick("prefill", prompt_token_ids)
        decode = self._pick("decode")
        first = prefill or decode or self._pick("colocated", prompt_token_ids)
        if first is None:
            raise EngineDead("no engine is ready")
        self.metrics.on_routed(first.name)
        run = _Run(self, request_id)
        run.hold(first)
        if prefill is not None and decode is not None:
            run.hold(decode)
        await first.send(AddRequest(run.engine_id, prompt_token_ids, params, arrival,
                                    handoff_address=decode.kv_address
                                    if prefill is not None and decode is not None else None))
        transfer_deadline: float | None = None
        finished = False
        try:
            while not finished:
                timeout = (None if transfer_deadline is None
                           else max(0.0, transfer_deadline - time.monotonic()))
                try:
                    item = await asyncio.wait_for(run.queue.get(), timeout)
                except TimeoutError:
                    item = None
                failure = self._failure(item)
                if failure is not None and prefill is None and decode is None:
                    raise item  # a replica died: its requests end with it (503)
                if failure is not None:
                    run.transfer_done()
                    await self._recover(run, failure, prompt_token_ids, params, arrival)
                    transfer_deadline = None
                elif isinstance(item, KVArrival):
                    if item.outcome in ("loaded", "recompute"):
                        run.transfer_done()
                        transfer_deadline = None
                        await prefill.send(ReleaseKV([run.engine_id]))
                        run.release(prefill)
                    if item.outcome == "recompute":
                        self.metrics.on_kv_failure("load_failed", True)
                elif isinstance(item, RequestOutput):
                    if item.error is not None:
                        self.metrics.on_kv_failure("load_failed", False)
                        raise EngineUnavailable(item.error)
                    if item.handed_off:
                        run.transfer_started()
                        transfer_deadline = (time.monotonic()
                                             + self.config.disagg.kv_transfer_timeout)
                    run.tokens += item.new_token_ids
                    finished = item.finish_reason is not None
                    yield item
        finally:
            await run.close(aborted=not finished)

    @staticmethod
    def _failure(item: object) -> str | None:
        """The cause when `item` ends the request's current placement (None: it does not)."""
        if item is None:
            return "timeout"
        if isinstance(item, EngineDead):
            return f"{item.engine.config.disagg.role}_died" if item.engine else "engine_died"
        return None

    async def _recover(self, run: "_Run", cause: str, prompt: list[int],
                       params: SamplingParams, arrival: float) -> None:
        """Abort the request where it was; resume it on a live engine with the tokens the
        client has (recompute), or end it with a 503 (fail)."""
        await run.abort_all()
        recompute = self.config.disagg.kv_load_failure == "recompute"
        self.metrics.on_kv_failure(cause, recompute)
        target = self._pick("decode") or self._pick("prefill")
        logger.warning("request %s: handoff failed (%s); %s", run.request_id, cause,
                       f"recomputing its {len(prompt) + len(run.tokens)} tokens on "
                       f"{target.name if target else 'no engine'}" if recompute else
                       "ending it (--kv-load-failure fail)")
        if not recompute:
            raise EngineUnavailable(f"the request's KV handoff failed ({cause}; "
                                    f"--kv-load-failure fail)")
        if target is None:
            raise EngineDead("no engine is ready to recompute the request")
        run.replace()
        run.hold(target)
        await target.send(AddRequest(run.engine_id, prompt, params, arrival,
                                     output_token_ids=list(run.tokens)))


class _Run:
    """Where one request is held: the engines routing its outputs to `queue`, counted in the
    router's load. Each placement has its own engine request id (`engine_id`) and queue, so
    nothing late from an engine it left (a transfer loaded just before the abort arrived) is
    ever read as its output."""

    def __init__(self, router: Router, request_id: str) -> None:
        self.router, self.request_id = router, request_id
        self.engine_id = request_id
        self.placements = 1
        self.queue: asyncio.Queue = asyncio.Queue()
        self.holders: list[EngineClient] = []
        self.tokens: list[int] = []  # streamed to the client so far
        self._transferring = False

    def transfer_started(self) -> None:
        self._transferring = True
        self.router.metrics.kv_transfers_in_flight.inc()

    def transfer_done(self) -> None:
        if self._transferring:
            self._transferring = False
            self.router.metrics.kv_transfers_in_flight.dec()

    def replace(self) -> None:
        """A new placement, after `abort_all`."""
        self.placements += 1
        self.engine_id = f"{self.request_id}~{self.placements}"
        self.queue = asyncio.Queue()

    def hold(self, client: EngineClient) -> None:
        client.attach(self.engine_id, self.queue)
        self.holders.append(client)
        self.router.in_flight[client.name] += 1

    def release(self, client: EngineClient) -> None:
        if client in self.holders:
            client.detach(self.engine_id)
            self.holders.remove(client)
            self.router.in_flight[client.name] -= 1

    async def abort_all(self) -> None:
        for client in list(self.holders):
            self.release(client)
            await client.send(AbortRequests([self.engine_id]))

    async def close(self, aborted: bool) -> None:
        self.transfer_done()
        if aborted:
            await self.abort_all()
        for client in list(self.holders):
            self.release(client)
