"""KV pages between engines: control over ZeroMQ, bytes over shared memory or ZeroMQ.

A decode engine binds a PULL socket at its KV address (`ipc://` on one host, `tcp://` across
hosts); a prefill engine keeps one PUSH socket per decode engine it sends to. A transfer is one
multipart message, so it arrives whole or not at all: a sender killed mid-transfer leaves
nothing half-written on the receiver. On one host the message is only the `KVTransfer` header,
naming the pages in the prefill engine's shared pool (`KVCache(shared=True)`), which the decode
engine copies out of directly (`load_pages`) while the prefill engine keeps them leased;
across hosts one frame per pool stack (`KVCache.read_pages`: a part of K or V, every layer's
pages) follows the header.

Sends never block: a peer that has stopped reading fills its queue and the send fails at once;
the router's transfer timeout and the prefill engine's lease deal with what never arrives.
"""
import logging
import os
from collections.abc import Iterator

import zmq

from engine.kv_cache import KVCache
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


def load_pages(cache: KVCache, header: KVTransfer, frames: list, page_ids: list[int],
               skip: int, source_pools: dict[str, KVCache]) -> int:
    """Write a transfer's pages past the first `skip` (prefix hits) into `page_ids[skip:]`,
    from the sender's shared pool (mapped once into `source_pools`) or from the frames.
    Returns the bytes written; `OSError` or `ValueError` when they cannot be read."""
    if header.source_pool is None:
        cache.write_pages(page_ids[skip:], frames, skip)
        return sum(len(f) for f in frames)
    source = source_pools.get(header.source_pool)
    if source is None:
        # A mapping of a pool whose engine is gone would keep its memory alive.
        for path in [p for p in source_pools if not os.path.exists(p)]:
            del source_pools[path]
        source = source_pools[header.source_pool] = KVCache.attach(
            cache.spec, header.source_num_pages, header.source_pool)
    return cache.copy_pages_from(source, header.source_page_ids[skip:], page_ids[skip:])
