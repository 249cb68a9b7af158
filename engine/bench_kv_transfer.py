"""`tessera bench kv-transfer`: handing a request's KV pages to another engine process on this
host, against this machine's memcpy bandwidth, in the same run.

The sender (this process) and the receiver (a spawned process) each hold a `KVCache` shaped
like the model's (default: SmolLM2-135M, 30 layers, 3 KV heads of 64, pages of 16 tokens), one
thread each; one transfer is the engines' whole path, for each transport:

- `shm` (one host, what the engines use): the `KVTransfer` header over `KVTransport` (ZeroMQ
  `ipc://`) naming the pages of the sender's shared pool, the receiver's `load_pages` copying
  them out of it into its own pages;
- `frames` (across hosts; here over `ipc://`): `read_pages` on the sender, the header and the
  frames, `load_pages` writing them into the receiver's pages;

then the receiver's acknowledgement. The sender's pages are a fresh pool's first ones, the
receiver's are placed at an offset, as in two engines. Printed per format and transport: the
bytes of one request of `--tokens` tokens, the median transfer time, bytes/s, and the
single-thread memcpy bandwidth (numpy copy of a buffer of the same size, median); the bar is
half of memcpy.
"""
import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zmq

from engine.cpu_info import reported_cpu_flags
from engine.kv_cache import KVCache, KVCacheSpec
from engine.kv_transfer import KVTransport, load_pages
from engine.messages import KVTransfer
from engine.sampling_params import SamplingParams
from kernels import kv_format

_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}


def _spec(args: argparse.Namespace, fmt: str) -> KVCacheSpec:
    return KVCacheSpec(args.layers, args.kv_heads, args.head_dim, args.page_size,
                       _FLOAT_DTYPES.get(fmt, torch.bfloat16), kv_format.FORMATS.get(fmt))


def _receiver(spec: KVCacheSpec, num_pages: int, kv_address: str, ack_address: str) -> None:
    torch.set_num_threads(1)
    ctx = zmq.Context()
    transport = KVTransport(ctx, kv_address)
    acks = ctx.socket(zmq.PUSH)
    acks.connect(ack_address)
    cache = KVCache(spec, 2 * num_pages, "cpu")
    pages, pools = list(range(num_pages // 2, num_pages // 2 + num_pages)), {}
    acks.send(b"ready")
    while True:
        transport.receiver.poll()
        for header, frames in transport.receive():
            if header.request_id == "stop":
                return
            load_pages(cache, header, frames, pages, 0, pools)
            acks.send(header.request_id.encode())


def _memcpy_seconds(num_bytes: int, repeats: int) -> float:
    src = np.random.default_rng(0).integers(0, 255, num_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_format(args: argparse.Namespace, fmt: str, transport: str) -> dict:
    spec = _spec(args, fmt)
    num_pages = -(-args.tokens // args.page_size)
    ipc = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
    kv_address, ack_address = f"ipc://{ipc / 'kv'}", f"ipc://{ipc / 'ack'}"
    ctx = zmq.Context()
    acks = ctx.socket(zmq.PULL)
    acks.bind(ack_address)
    child = multiprocessing.get_context("spawn").Process(
        target=_receiver, args=(spec, num_pages, kv_address, ack_address), daemon=True)
    child.start()
    assert acks.recv() == b"ready"
    sender = KVTransport(ctx, None)
    cache = KVCache(spec, num_pages, "cpu", shared=True)
    for t in cache.stacks:
        t.view(torch.uint8).fill_(1)  # pages in memory, as a used pool's are
    pages = list(range(num_pages))
    num_bytes = num_pages * spec.page_bytes
    times = []
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        header = KVTransfer(str(i), [], [], SamplingParams(), 0.0, 1, args.tokens, 0, None,
                            None, fmt, num_pages, time.time())
        if transport == "shm":
            header.source_pool, header.source_num_pages = cache.shared_path, num_pages
            header.source_page_ids = pages
            frames = []
        else:
            frames = cache.read_pages(pages)
        assert sender.send(kv_address, header, frames)
        assert acks.recv() == str(i).encode()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    sender.send(kv_address, KVTransfer("stop", [], [], SamplingParams(), 0.0, 1, 0, 0, None,
                                       None, fmt, 0, time.time()), [])
    child.join(10)
    ctx.destroy(linger=0)
    seconds = statistics.median(times)
    memcpy = num_bytes / _memcpy_seconds(num_bytes, args.repeats)
    return {"format": spec.storage, "transport": transport, "tokens": args.tokens,
            "bytes": num_bytes,
            "transfer_ms": seconds * 1e3, "transfer_bytes_per_s": num_bytes / seconds,
            "memcpy_bytes_per_s": memcpy, "share_of_memcpy": num_bytes / seconds / memcpy}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tessera bench kv-transfer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", default="bfloat16,int8",
                   help="comma-separated page formats (default %(default)s)")
    p.add_argument("--transports", default="shm,frames",
                   help="comma-separated: shm, frames (default %(default)s)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the handed-off request")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", action="store_true",
                   help="also print one JSON line per format and transport")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"CPU flags: {reported_cpu_flags()}")
    print(f"{'format':>9} {'via':>6} {'tokens':>7} {'MiB':>7} {'ms':>7} {'GB/s':>6} "
          f"{'memcpy GB/s':>11} {'share':>6}  bar >= 0.50")
    for fmt in args.formats.split(","):
        for transport in args.transports.split(","):
            row = run_format(args, fmt.strip(), transport.strip())
            if args.json:
                print(json.dumps(row))
            _print_row(row)


def _print_row(row: dict) -> None:
    print(f"{row['format']:>9} {row['transport']:>6} {row['tokens']:>7} "
          f"{row['bytes'] / 2**20:7.1f} {row['transfer_ms']:7.2f} "
          f"{row['transfer_bytes_per_s'] / 1e9:6.2f} {row['memcpy_bytes_per_s'] / 1e9:11.2f} "
          f"{row['share_of_memcpy']:6.2f}  "
          f"{'met' if row['share_of_memcpy'] >= 0.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
