"""The engine-core process: `EngineCore` behind ZeroMQ sockets, for the API server.

Imports no torch itself (the API process imports this module for a Ray actor's entry point);
the engine's imports happen in the child, which a local engine runs as
`python -m engine.engine_process` (server/placement.LocalEngine).
"""
import logging
import os
import pickle
import signal
import sys

from engine.config import EngineConfig
from engine.cpu_memory import release_freed_memory, skip_triton
from engine.logs import configure_logging, one_line
from engine.messages import (AbortRequests, AddRequest, EngineFailed, ReleaseKV, RequestOutput,
                             WireError, decode, encode)

logger = logging.getLogger(__name__)

_PARENT_CHECK_MS = 1000  # how often an idle engine checks that the API process lives


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str,
                    model_name: str = "", log_level: str = "info",
                    kv_address: str | None = None) -> None:
    """Process entry point: serve requests from `input_addr`, stream steps to `output_addr`;
    a decode engine also takes handed-off requests on its KV socket at `kv_address`.

    An engine that cannot start sends `EngineFailed` with the cause in one line (the traceback
    only at debug level) and exits 1. Blocks on its sockets only while idle; while busy it
    drains pending messages between steps without waiting, so HTTP traffic never stalls the
    loop.

    SIGINT and SIGTERM are ignored: Ctrl-C and a service manager's SIGTERM reach the whole
    process group, and the API process drains its requests before it kills this one. If the
    API process dies without doing so, this process notices within a second and exits.
    """
    import zmq

    if config.device == "cpu":
        skip_triton()
    from engine.core import EngineCore
    from engine.kv_transfer import KVTransport

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if config.disagg.cpu_ids:
        os.sched_setaffinity(0, config.disagg.cpu_ids)  # before torch picks its thread count
    parent = os.getppid()
    configure_logging(log_level)
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(input_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(output_addr)
    try:
        transport = KVTransport(ctx, kv_address)
        engine = EngineCore(config)
    except Exception as exc:
        logger.debug("engine start-up failed", exc_info=True)
        outbox.send(encode(EngineFailed(one_line(exc))))
        ctx.destroy(linger=5000)  # deliver it before exiting
        sys.exit(1)
    poller = zmq.Poller()
    for sock in (inbox, transport.receiver):
        if sock is not None:
            poller.register(sock, zmq.POLLIN)
    outbox.send(encode(engine.ready_message(model_name)))
    idle_reported = False
    while os.getppid() == parent:
        if engine.has_unfinished():
            idle_reported = False
        else:
            if not idle_reported:
                outbox.send(encode(engine.idle_stats()))
                idle_reported = True
                if config.device == "cpu":
                    release_freed_memory()
            expiry = engine.seconds_to_next_expiry()
            poller.poll(_PARENT_CHECK_MS if expiry is None
                        else min(_PARENT_CHECK_MS, 1 + int(expiry * 1000)))
        early, released = _take_messages(engine, inbox)
        arrivals = []
        for header, frames in transport.receive():
            arrival, output = engine.load_handoff(header, frames)
            arrivals.append(arrival)
            early += [output] if output else []
        expiries = engine.expire_leases()
        step = engine.step() if engine.has_unfinished() else engine.idle_stats()
        for header, frames, address in engine.take_handoffs():
            if not transport.send(address, header, frames):
                logger.error("the decode engine at %s takes no more transfers; request %s "
                             "waits out its lease", address, header.request_id)
        step.outputs = early + step.outputs
        step.kv_arrivals, step.num_lease_expiries = arrivals, expiries
        if step.outputs or step.stats.num_scheduled_tokens or arrivals or expiries or released:
            outbox.send(encode(step))
    logger.warning("the API process is gone; the engine core exits")
    ctx.destroy(linger=0)


def _take_messages(engine, inbox) -> tuple[list[RequestOutput], bool]:
    """Apply every pending message from the API process; the outputs they produce at once
    (rejections, aborts) and whether leased pages were released."""
    early: list[RequestOutput] = []
    released = False
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
            released |= any(rid in engine.leases for rid in msg.request_ids)
            early.extend(engine.abort(msg.request_ids))
        elif isinstance(msg, ReleaseKV):
            released |= bool(engine.release_kv(msg.request_ids))
        else:
            logger.error("dropped a %s sent to the engine", type(msg).__name__)
    return early, released


if __name__ == "__main__":  # server/placement.LocalEngine: the arguments come pickled on stdin
    run_engine_core(*pickle.load(sys.stdin.buffer))
