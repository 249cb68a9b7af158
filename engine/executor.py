"""The executor: how the engine core's single scheduler drives its model workers.

With one rank the model runner lives in the engine core's process and takes each step
directly. Under tensor parallelism (`tensor_parallel_size` N > 1) the engine core is rank 0
and ranks 1..N-1 are workers (engine/worker.py): processes on this host (`mp`), or Ray actors
in the engine's placement group, on any node (`ray`). Each step's `StepPlan` goes to them over
ZeroMQ before rank 0 runs it, and the ranks meet in the torch.distributed collectives of the
forward pass. Rank 0 samples.
"""
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Container
from pathlib import Path

import msgspec
import zmq

from engine.config import EngineConfig
from engine.model_runner import ModelRunner, RunnerOutput
from engine.parallel import destroy_tensor_parallel, init_tensor_parallel
from engine.step_plan import StepPlanner, encode_plan
from engine.structured_output import StructuredOutputManager
from engine.worker import WORKER_MESSAGES, WorkerFailed, resident_bytes
from scheduler.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)


class LocalWorkers:
    """Ranks 1..N-1 as processes on this host (`python -m engine.worker`), over IPC sockets
    and a rendezvous file."""

    def __init__(self, config: EngineConfig):
        self._dir = tempfile.TemporaryDirectory(prefix="tessera-tp-")
        self.processes: list[subprocess.Popen] = []
        self.init_method = f"file://{Path(self._dir.name) / 'rendezvous'}"

    def bind_address(self, name: str) -> str:
        return f"ipc://{Path(self._dir.name) / name}"

    def start(self, config_json: bytes, *args) -> None:
        env = {**os.environ, "TESSERA_LOG_LEVEL": _log_level()}
        worker = subprocess.Popen([sys.executable, "-m", "engine.worker", *map(str, args)],
                                  stdin=subprocess.PIPE, env=env)
        worker.stdin.write(config_json)
        worker.stdin.close()
        self.processes.append(worker)

    def end(self) -> None:
        for worker in self.processes:
            worker.kill()
            worker.wait()
        self.processes.clear()


class RayWorkers:
    """Ranks 1..N-1 as Ray actors in bundles 1..N-1 of the engine's placement group (the
    replica's, when the engine core is itself a Ray actor in bundle 0; else a new one), on
    whichever nodes Ray placed them, over TCP."""

    def __init__(self, config: EngineConfig):
        import ray
        from ray.util.placement_group import get_current_placement_group, placement_group

        if not ray.is_initialized():
            ray.init(address=config.parallel.ray_address, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING)
        self._ray, self.actors = ray, []
        self.group = get_current_placement_group()
        if self.group is None:
            size = config.parallel.tensor_parallel_size
            gpus = {"GPU": 1} if config.device.startswith("cuda") else {}
            self.group = placement_group([{"CPU": 1, **gpus}] * size, strategy="PACK")
            ray.get(self.group.ready(), timeout=config.parallel.collective_timeout)
        self.host = ray.util.get_node_ip_address()
        self.init_method = f"tcp://{self.host}:{_free_port(self.host)}"

    def bind_address(self, name: str) -> str:
        return f"tcp://{self.host}:*"

    def start(self, config_json: bytes, rank: int, *args) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from engine.worker import RayWorker

        bundle = self.group.bundle_specs[rank]
        actor = self._ray.remote(RayWorker).options(
            num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), max_restarts=0,
            runtime_env={"env_vars": {"TESSERA_LOG_LEVEL": _log_level()}},
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=rank)).remote()
        actor.serve.remote(config_json, rank, *args)
        self.actors.append(actor)

    def end(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors.clear()


class Executor:
    """Only one executor with tensor parallelism may live in a process at a time: rank 0 holds
    the process's default torch.distributed group."""

    def __init__(self, config: EngineConfig):
        size = config.parallel.tensor_parallel_size
        self.planner = StepPlanner()
        self._plans: list[zmq.Socket] = []
        if size == 1:
            self.runner = ModelRunner(config)
            self.weight_bytes = [resident_bytes(self.runner.model)]
            return
        self.workers = (RayWorkers if config.parallel.distributed_executor_backend == "ray"
                        else LocalWorkers)(config)
        self._ctx = zmq.Context()
        # Workers end with this object, or with the interpreter, whichever ends first.
        weakref.finalize(self, _end, self.workers, self._ctx)
        ready = self._bind(zmq.PULL, "ready")
        config_json = msgspec.json.encode(config)
        try:
            for rank in range(1, size):
                plans = self._bind(zmq.PUSH, f"plans-{rank}")
                self._plans.append(plans)
                self.workers.start(config_json, rank, size, self.workers.init_method,
                                   _endpoint(plans), _endpoint(ready))
            tp = init_tensor_parallel(0, size, self.workers.init_method, config.device,
                                      config.parallel.collective_timeout)
            self.runner = ModelRunner(config, tp)
            self.weight_bytes = [resident_bytes(self.runner.model)] + self._await_workers(
                ready, size - 1, config.parallel.collective_timeout)
        except BaseException:
            self.shutdown()
            raise
        finally:
            ready.close(linger=0)
        logger.info("tensor parallelism: %d ranks, resident weight bytes per rank: %s", size,
                    ", ".join(f"{b:,}" for b in self.weight_bytes))

    def _bind(self, kind: int, name: str) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.bind(self.workers.bind_address(name))
        return sock

    @staticmethod
    def _await_workers(ready: zmq.Socket, count: int, timeout_s: float) -> list[int]:
        """Each worker's resident weight bytes, by rank, once all `count` are ready."""
        by_rank, deadline = {}, time.monotonic() + timeout_s
        while len(by_rank) < count:
            if not ready.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                raise RuntimeError(f"tensor-parallel workers not ready after {timeout_s:.0f} s")
            msg = WORKER_MESSAGES.decode(ready.recv())
            if isinstance(msg, WorkerFailed):
                raise RuntimeError(f"tensor-parallel rank {msg.rank} failed to start: "
                                   f"{msg.error}")
            by_rank[msg.rank] = msg.weight_bytes
        return [by_rank[r] for r in sorted(by_rank)]

    def execute(self, out: SchedulerOutput, live: Container[str],
                structured: StructuredOutputManager | None = None) -> RunnerOutput:
        """One step on every rank; `live` holds the requests the engine still has."""
        plan = self.planner.plan(out, live)
        if self._plans:
            data = encode_plan(plan)
            for plans in self._plans:
                plans.send(data)
        return self.runner.execute(out, plan, structured)

    def shutdown(self) -> None:
        """End the workers (the engine core is going)."""
        if self._plans:
            _end(self.workers, self._ctx)


def _end(workers: LocalWorkers | RayWorkers, ctx: zmq.Context) -> None:
    workers.end()
    ctx.destroy(linger=0)
    destroy_tensor_parallel()


def _endpoint(sock: zmq.Socket) -> str:
    """The address a socket was bound to (a TCP bind to port * picks one)."""
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _log_level() -> str:
    """This process's log level, for the workers."""
    return logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
