"""KV pages between engines over ZeroMQ: a decode engine binds a PULL socket at its KV address
(`ipc://` on one host, `tcp://` across hosts); a prefill engine keeps one PUSH socket per decode
engine it sends to. A transfer is one multipart message, a `KVTransfer` header and one frame per
KV pool tensor (`KVCache.read_pages`), so it arrives whole or not at all: a sender killed
mid-transfer leaves nothing half-written on the receiver.

Sends never block: a peer that has stopped reading fills its queue and the send fails at once;
the router's transfer timeout and the prefill engine's lease deal with what never arrives.
"""
import logging
from collections.abc import Iterator

import zmq

from engine.messages import KVTransfer, WireError, decode, encode

logger = logging.getLogger(__name__)

_QUEUED_TRANSFERS = 64  # per decode engine, before sends to it fail


class KVTransport:
    def __init__(self, ctx: zmq.Context, bind_address: str | None) -> None:
        self._ctx = ctx
        self._senders: dict[str, zmq.Socket] = {}
        self.receiver: zmq.Socket | None = None
        if bind_address is not None:
            self.receiver = ctx.socket(zmq.PULL)
            self.receiver.bind(bind_address)

    def send(self, address: str, header: KVTransfer, frames: list) -> bool:
        """Queue the transfer for `address`; False when its queue is full (peer stuck)."""
        sock = self._senders.get(address)
        if sock is None:
            sock = self._senders[address] = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, _QUEUED_TRANSFERS)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
        try:
            sock.send_multipart([encode(header), *frames], flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def receive(self) -> Iterator[tuple[KVTransfer, list[zmq.Frame]]]:
        """Every transfer that has arrived, without waiting; malformed ones are dropped."""
        while self.receiver is not None and self.receiver.poll(0):
            parts = self.receiver.recv_multipart(copy=False)
            try:
                header = decode(parts[0].bytes)
            except WireError as exc:
                logger.error("dropped a KV transfer: %s", exc)
                continue
            if not isinstance(header, KVTransfer):
                logger.error("dropped a %s on the KV socket", type(header).__name__)
                continue
            yield header, parts[1:]
