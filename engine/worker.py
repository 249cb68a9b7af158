"""A tensor-parallel worker process: rank r > 0 of an engine, run by `engine/executor.py`.

`python -m engine.worker RANK SIZE INIT_METHOD PLANS_ADDR READY_ADDR` with the engine's config as
JSON on stdin. The worker joins the process group, builds its share of the model and KV pool,
says `WorkerReady` (or `WorkerFailed`), then follows each `StepPlan` it receives. The engine
core ends it; if that process dies instead, the worker notices within a second and exits (as
the engine core watches the API process).
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
    """Bytes of a module's parameters and buffers (what a rank holds of the model)."""
    return sum(t.numel() * t.element_size()
               for t in (*module.parameters(), *module.buffers()))


def main(argv: list[str]) -> None:
    import zmq

    from engine.model_runner import ModelRunner
    from engine.parallel import init_tensor_parallel
    from engine.step_plan import decode_plan

    rank, size, init_method, plans_addr, ready_addr = argv
    rank, size = int(rank), int(size)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the engine core ends its workers
    config = msgspec.json.decode(sys.stdin.buffer.read(), type=EngineConfig)
    configure_logging(os.environ.get("TESSERA_LOG_LEVEL", "info"))
    parent = os.getppid()
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
        sys.exit(1)
    ready.send(msgspec.msgpack.encode(WorkerReady(rank, resident_bytes(runner.model))))
    while os.getppid() == parent:
        if plans.poll(_PARENT_CHECK_MS):
            runner.follow(decode_plan(plans.recv()))
    ctx.destroy(linger=0)


if __name__ == "__main__":
    main(sys.argv[1:])
