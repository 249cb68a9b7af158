"""KV pool sizing, the start-up refusal when a full-length request could never fit, a CPU
pool's memory taken as its pages fill, and the CPU engine's hold on freed memory."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import LLM
from engine.cuda_graphs import capture_sizes
from engine.kv_cache import KVCache, KVCacheSpec, check_fits, gpu_kv_budget
from kernels import kv_format
from server.local_server import rss_bytes

GiB = 2**30


def test_gpu_budget_is_utilization_minus_everything_already_used_and_the_peak():
    # 80 GiB card at 0.9: 72 GiB allowed; 16 GiB weights + 1 GiB context in use, 3 GiB peak.
    assert gpu_kv_budget(80 * GiB, 17 * GiB, 3 * GiB, 0.9) == int(72 * GiB) - 20 * GiB
    # Another process already holds most of the card: nothing is left, never a negative pool.
    assert gpu_kv_budget(80 * GiB, 75 * GiB, 3 * GiB, 0.9) < 0


def test_no_room_for_a_single_page_says_to_raise_utilization():
    with pytest.raises(ValueError, match="No available memory for the cache blocks"):
        check_fits(0, 16, 1024)


def test_max_model_len_beyond_the_pool_is_vllms_error():
    check_fits(64, 16, 1024)  # exactly full: accepted
    with pytest.raises(ValueError, match=r"max seq len \(1025\) is larger than the maximum "
                                         r"number of tokens that can be stored in KV cache "
                                         r"\(1024\)"):
        check_fits(64, 16, 1025)


def test_engine_refuses_to_start_when_max_model_len_cannot_fit():
    with pytest.raises(ValueError, match=r"max seq len \(2048\).*\(64\).*decreasing "
                                         r"`max_model_len`"):
        LLM(dtype="float32", quantization="none", num_kv_pages=4, max_model_len=2048,
            enforce_eager=True)


@pytest.mark.parametrize("quant", [None, "int4"])
def test_a_cpu_kv_pool_takes_memory_as_its_pages_fill(quant):
    """A 256 MiB pool holds next to no RAM until written; writing half of one layer's keys takes
    about those bytes; pages never written read as zeros (attention may read a page's unwritten
    tail, which must not be NaN)."""
    fmt = kv_format.FORMATS[quant] if quant else None
    spec = KVCacheSpec(4, 4, 64, 16, torch.bfloat16, fmt)
    pages = (256 << 20) // spec.page_bytes
    before = rss_bytes(os.getpid()) >> 20
    cache = KVCache(spec, pages, "cpu")
    allocated = rss_bytes(os.getpid()) >> 20
    assert allocated - before < 16, (before, allocated)
    keys = cache.layers[0][0]
    codes = keys.codes if quant else keys
    codes[:pages // 2].fill_(1)
    written = codes[:pages // 2].numel() * codes.element_size() >> 20
    assert 0.9 * written <= (rss_bytes(os.getpid()) >> 20) - allocated <= written + 16, written
    assert all((part == 0).all() for pool in cache.layers[1] for part in (
        pool if quant else (pool,)) if part is not None)


@pytest.mark.parametrize("max_batch, sizes", [
    (1, [1]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]), (12, [1, 2, 4, 8, 12]),
    (64, [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64])])
def test_decode_graph_buckets_cover_every_batch_size_up_to_the_largest(max_batch, sizes):
    assert capture_sizes(max_batch) == sizes
    assert all(any(s >= n for s in sizes) for n in range(1, max_batch + 1))


RETAIN_THEN_RELEASE = """
import torch
from engine.cpu_memory import release_freed_memory, retain_freed_memory
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) >> 10
assert retain_freed_memory()
before = rss()
blocks = [torch.ones(2**20) for _ in range(64)]  # 256 MiB in 4 MiB blocks, each touched
del blocks
kept = rss()
release_freed_memory()
print(before, kept, rss())
"""


def test_freed_step_memory_stays_resident_until_released():
    """A CPU engine keeps what a step frees for the next step (no page faults), and hands back
    what it freed when it asks (after each start-up phase, and when it goes idle)."""
    out = subprocess.run([sys.executable, "-c", RETAIN_THEN_RELEASE], cwd=Path(__file__).parent.parent,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, kept, released = map(int, out.stdout.split())
    assert kept - before > 200, (before, kept)
    assert kept - released > 200, (before, kept, released)
