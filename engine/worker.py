"""A tensor-parallel worker: rank r > 0 of an engine, started by `engine/executor.py`.

A process on the engine's host (`python -m engine.worker RANK SIZE INIT_METHOD PLANS_ADDR
READY_ADDR`, the engine's config as JSON on stdin), or a Ray actor (`RayWorker`). The worker
joins the process group, builds its share of the model and KV pool, says `WorkerReady` (or
`WorkerFailed`), then follows each `StepPlan` it receives. The engine core ends it; if the
engine core dies instead, a process notices within a second and exits (as the engine core
watches the API process), and Ray ends an actor whose owner is gone.
"""
import logging
import os
import signal
import sys

import msgspec

from engine.config import EngineConfig
from engine.logs import configure_logging, one_line

logger = logging.getLogger(__name__)

_PARENT_CHECK_MS = 1000


class WorkerReady(msgspec.Struct, tag=True):
    rank: int
    weight_bytes: int  # the rank's resident parameter and buffer bytes


class WorkerFailed(msgspec.Struct, tag=True):
    rank: int
    error: str


WORKER_MESSAGES = msgspec.msgpack.Decoder(WorkerReady | WorkerFailed)


def resident_bytes(module) -> int:
    """Bytes of a module's parameters, buffers (a freed weight is a meta tensor) and fbgemm's
    packed int8 weights: what a rank holds of the model."""
    tensors = sum(t.numel() * t.element_size()
                  for t in (*module.parameters(), *module.buffers()) if not t.is_meta)
    return tensors + sum(m.fbgemm_weight.nbytes for m in module.modules()
                         if getattr(m, "fbgemm_weight", None) is not None)


def serve(config_json: bytes, rank: int, size: int, init_method: str, plans_addr: str,
          ready_addr: str, parent: int | None) -> None:
    """Be rank `rank`: join the group, build the share, follow plans. `parent`: the engine
    core's pid, whose exit ends the worker (None under Ray, which ends an actor whose owner
    is gone)."""
    import zmq

    from engine.model_runner import ModelRunner
    from engine.parallel import init_tensor_parallel
    from engine.step_plan import decode_plan

    config = msgspec.json.decode(config_json, type=EngineConfig)
    ctx = zmq.Context()
    plans = ctx.socket(zmq.PULL)
    plans.connect(plans_addr)
    ready = ctx.socket(zmq.PUSH)
    ready.connect(ready_addr)
    try:
        tp = init_tensor_parallel(rank, size, init_method, config.device,
                                  config.parallel.collective_timeout)
        runner = ModelRunner(config, tp)
    except Exception as exc:
        logger.debug("worker start-up failed", exc_info=True)
        ready.send(msgspec.msgpack.encode(WorkerFailed(rank, one_line(exc))))
        ctx.destroy(linger=5000)
        raise SystemExit(1) from None
    ready.send(msgspec.msgpack.encode(WorkerReady(rank, resident_bytes(runner.model))))
    while parent is None or os.getppid() == parent:
        if plans.poll(_PARENT_CHECK_MS):
            runner.follow(decode_plan(plans.recv()))
    ctx.destroy(linger=0)


class RayWorker:
    """A rank as a Ray actor (engine/executor.py places it in its engine's placement group)."""

    def serve(self, *args) -> None:
        configure_logging(os.environ.get("TESSERA_LOG_LEVEL", "info"))
        serve(*args, parent=None)


def main(argv: list[str]) -> None:
    rank, size, init_method, plans_addr, ready_addr = argv
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the engine core ends its workers
    configure_logging(os.environ.get("TESSERA_LOG_LEVEL", "info"))
    serve(sys.stdin.buffer.read(), int(rank), int(size), init_method, plans_addr, ready_addr,
          os.getppid())


if __name__ == "__main__":
    main(sys.argv[1:])
