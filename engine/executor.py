"""The executor: how the engine core's single scheduler drives its model workers.

With one rank the model runner lives in the engine core's process and takes each step
directly. Under tensor parallelism (`tensor_parallel_size` N > 1) the engine core is rank 0
and ranks 1..N-1 are worker processes on this host (engine/worker.py); each step's
`StepPlan` goes to them over ZeroMQ before rank 0 runs it, and the ranks meet in the
torch.distributed collectives of the forward pass. Rank 0 samples.
"""
import logging
import os
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


class Executor:
    """Only one executor with tensor parallelism may live in a process at a time: rank 0 holds
    the process's default torch.distributed group."""

    def __init__(self, config: EngineConfig):
        size = config.parallel.tensor_parallel_size
        self.planner = StepPlanner()
        self.workers: list[subprocess.Popen] = []
        self._plans: list[zmq.Socket] = []
        if size == 1:
            self.runner = ModelRunner(config)
            self.weight_bytes = [resident_bytes(self.runner.model)]
            return
        self._ctx = zmq.Context()
        self._dir = tempfile.TemporaryDirectory(prefix="tessera-tp-")
        # Workers die with this object, or with the interpreter, whichever ends first.
        weakref.finalize(self, _end, self.workers, self._ctx)
        base = Path(self._dir.name)
        ready = self._ctx.socket(zmq.PULL)
        ready.bind(f"ipc://{base / 'ready'}")
        init_method = f"file://{base / 'rendezvous'}"
        env = {**os.environ, "TESSERA_LOG_LEVEL": logging.getLevelName(
            logging.getLogger().getEffectiveLevel()).lower()}
        try:
            for rank in range(1, size):
                plans = self._ctx.socket(zmq.PUSH)
                plans.bind(f"ipc://{base / f'plans-{rank}'}")
                self._plans.append(plans)
                worker = subprocess.Popen(
                    [sys.executable, "-m", "engine.worker", str(rank), str(size), init_method,
                     f"ipc://{base / f'plans-{rank}'}", f"ipc://{base / 'ready'}"],
                    stdin=subprocess.PIPE, env=env)
                worker.stdin.write(msgspec.json.encode(config))
                worker.stdin.close()
                self.workers.append(worker)
            tp = init_tensor_parallel(0, size, init_method, config.device,
                                      config.parallel.collective_timeout)
            self.runner = ModelRunner(config, tp)
            self.weight_bytes = [resident_bytes(self.runner.model)] + self._await_workers(
                ready, config.parallel.collective_timeout)
        except BaseException:
            self.shutdown()
            raise
        finally:
            ready.close(linger=0)
        logger.info("tensor parallelism: %d ranks, resident weight bytes per rank: %s", size,
                    ", ".join(f"{b:,}" for b in self.weight_bytes))

    def _await_workers(self, ready: zmq.Socket, timeout_s: float) -> list[int]:
        """Each worker's resident weight bytes, by rank, once all are ready."""
        by_rank, deadline = {}, time.monotonic() + timeout_s
        while len(by_rank) < len(self.workers):
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


def _end(workers: list[subprocess.Popen], ctx: zmq.Context) -> None:
    for worker in workers:
        worker.kill()
        worker.wait()
    workers.clear()
    ctx.destroy(linger=0)
    destroy_tensor_parallel()
