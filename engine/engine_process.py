"""The engine-core process: `EngineCore` behind ZeroMQ sockets, for the API server.

Imports no torch itself (the API process imports this module to name the spawn target); the
engine's imports happen in the child.
"""
import logging
import os
import signal
import sys

from engine.config import EngineConfig
from engine.logs import configure_logging, one_line
from engine.messages import (AbortRequests, AddRequest, EngineFailed, RequestOutput, WireError,
                             decode, encode)

logger = logging.getLogger(__name__)

_PARENT_CHECK_MS = 1000  # how often an idle engine checks that the API process lives


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str,
                    model_name: str = "", log_level: str = "info") -> None:
    """Process entry point: serve requests from `input_addr`, stream steps to `output_addr`.

    An engine that cannot start sends `EngineFailed` with the cause in one line (the traceback
    only at debug level) and exits 1. Blocks on the input socket only while idle; while busy
    it drains pending messages between steps without waiting, so HTTP traffic never stalls
    the loop.

    SIGINT and SIGTERM are ignored: Ctrl-C and a service manager's SIGTERM reach the whole
    process group, and the API process drains its requests before it kills this one. If the
    API process dies without doing so, this process notices within a second and exits.
    """
    import zmq

    from engine.core import EngineCore

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    parent = os.getppid()
    configure_logging(log_level)
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(input_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(output_addr)
    try:
        engine = EngineCore(config)
    except Exception as exc:
        logger.debug("engine start-up failed", exc_info=True)
        outbox.send(encode(EngineFailed(one_line(exc))))
        ctx.destroy(linger=5000)  # deliver it before exiting
        sys.exit(1)
    outbox.send(encode(engine.ready_message(model_name)))
    while os.getppid() == parent:
        if not engine.has_unfinished():
            outbox.send(encode(engine.idle_stats()))
            while not inbox.poll(_PARENT_CHECK_MS) and os.getppid() == parent:
                pass  # sleep until a message arrives
        early: list[RequestOutput] = []
        while inbox.poll(0):
            try:
                msg = decode(inbox.recv())
            except WireError as exc:
                logger.error("dropped a message: %s", exc)
                continue
            if isinstance(msg, AddRequest):
                try:
                    engine.add_request(msg)
                except ValueError as e:
                    logger.error("rejected request %s: %s", msg.request_id, e)
                    early.append(RequestOutput(msg.request_id, [], "abort"))
            elif isinstance(msg, AbortRequests):
                early.extend(engine.abort(msg.request_ids))
        step = engine.step() if engine.has_unfinished() else engine.idle_stats()
        step.outputs = early + step.outputs
        if step.outputs or step.stats.num_scheduled_tokens:
            outbox.send(encode(step))
    logger.warning("the API process is gone; the engine core exits")
    ctx.destroy(linger=0)
