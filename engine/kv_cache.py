"""The physical KV cache: per layer one K pool and one V pool of pages.

A page is `[page_size, num_kv_heads, head_dim]` in `KVCacheSpec.dtype`, or, with a `quant`
format (fp8, int8, int4), codes plus scales per token-head (`kernels.kv_format`) addressed by
the same page ids and slots; attention then dequantizes to `dtype`, the model's. Evictions
(scheduler/kv_policy.py) reach it as compaction plans: page copies and token moves between slots.
"""
import itertools
import math
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kernels import kv_format
from kernels.kv_format import QuantFormat
from scheduler.block_manager import KVCompaction

DEFAULT_CPU_KV_MEMORY = 1 << 30

Pool = torch.Tensor | kv_format.QuantizedPages  # one layer's K or V pages


@dataclass
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype  # of plain pages; of what quantized ones dequantize to
    quant: QuantFormat | None = None
    # The KV heads each layer's pages hold when they differ by layer (one pool of a head
    # config's two); by default `num_kv_heads` everywhere.
    layer_heads: tuple[int, ...] | None = None

    def heads(self, layer: int) -> int:
        return self.num_kv_heads if self.layer_heads is None else self.layer_heads[layer]

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's K and V across all layers, codes and scales counted."""
        per_head = (self.quant.token_head_bytes(self.head_dim) if self.quant else
                    self.head_dim * self.dtype.itemsize)
        return 2 * sum(map(self.heads, range(self.num_layers))) * per_head

    @property
    def page_bytes(self) -> int:
        """Bytes of one page across all layers, K and V."""
        return self.page_size * self.token_bytes

    @property
    def storage(self) -> str:
        """The pages' format as `--kv-cache-dtype` names it (`auto` resolved)."""
        return self.quant.name if self.quant else str(self.dtype).removeprefix("torch.")

    def num_pages_for(self, memory_bytes: int) -> int:
        return max(memory_bytes, 0) // self.page_bytes


def gpu_kv_budget(total: int, used: int, headroom: int, utilization: float) -> int:
    """Bytes left for KV pages when the process may use `utilization` of the GPU's `total`.

    `used` is what the device has in use after loading the weights (this process's weights
    and CUDA context, and any other process), `headroom` what steps need on top of that (the
    largest warm-up step's peak, plus the CUDA graph pool).
    """
    return int(total * utilization) - used - headroom


def split_pages(num_pages: int, dense: KVCacheSpec, full: KVCacheSpec,
                streaming: KVCacheSpec, wanted: int, least: int) -> tuple[int, int]:
    """A head config's two pools in the memory of `num_pages` pages of every head (`dense`):
    the streaming heads' pool gets the `wanted` pages, but no more memory than its heads'
    share (so the full-context pool holds as many tokens as dense pages would, or more) and no
    fewer than the `least` one request needs; the full-context pool gets the rest. Returns
    (full pages, streaming pages)."""
    memory = num_pages * dense.page_bytes
    share = memory * streaming.token_bytes // dense.token_bytes
    streaming_pages = max(min(wanted, share // streaming.page_bytes), least)
    return (memory - streaming_pages * streaming.page_bytes) // full.page_bytes, streaming_pages


def check_fits(num_pages: int, page_size: int, max_model_len: int) -> None:
    """Refuse to start when one request of `max_model_len` tokens could never be scheduled."""
    if num_pages < 1:
        raise ValueError("No available memory for the cache blocks. Try increasing "
                         "`gpu_memory_utilization` (or `kv_cache_memory` / `num_kv_pages`) "
                         "when initializing the engine.")
    if num_pages * page_size < max_model_len:
        raise ValueError(
            f"The model's max seq len ({max_model_len}) is larger than the maximum number of "
            f"tokens that can be stored in KV cache ({num_pages * page_size}). Try increasing "
            f"`gpu_memory_utilization` (or `kv_cache_memory` / `num_kv_pages`) or decreasing "
            f"`max_model_len` when initializing the engine.")


def _committed_on_write(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU stack in an anonymous mapping of its own, whose pages the kernel commits
    on first write: the pool takes RAM as its pages fill (as llama-server's does), not all of
    it at start, where `torch.zeros` writes every byte."""
    size = math.prod(shape) * dtype.itemsize
    if not size:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, size), dtype=torch.uint8).view(dtype).view(shape)


class KVCache:
    """Each part of a pool (K or V; codes, scales, zeros) is one tensor `stacks[i]` of
    `[layers, num_pages, page_size, ...]` over each run of consecutive layers holding the same
    KV heads (all layers, unless a head config or a model's sliding layers split the heads), and
    `layers` are each layer's (K, V) pools over the same memory: a handoff moves a page range of
    every layer with one copy per part.

    `shared` (CPU): the pools live in one anonymous shared-memory file (memfd) that other
    processes of this user open by `shared_path` (`attach`), so a decode engine on the same
    host copies handed-off pages straight out of the prefill engine's pool: one copy, no
    socket. The memory goes when the last process holding it exits, whatever kills it."""

    def __init__(self, spec: KVCacheSpec, num_pages: int, device: torch.device | str,
                 shared: bool = False):
        if num_pages < 1:
            raise ValueError("the KV cache needs at least one page")
        self.spec, self.num_pages, self.device = spec, num_pages, torch.device(device)
        self.shared_path: str | None = None
        if shared:
            fd = os.memfd_create("tessera-kv")
            os.ftruncate(fd, self._shared_bytes())
            self.shared_path = f"/proc/{os.getpid()}/fd/{fd}"
            self._map(self.shared_path)
        elif self.device.type == "cpu":
            self.stacks, self.layers = self._allocate(_committed_on_write)
        else:
            self.stacks, self.layers = self._allocate(
                lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=device))

    @classmethod
    def attach(cls, spec: KVCacheSpec, num_pages: int, shared_path: str) -> "KVCache":
        """Another process's shared pool (`shared_path`), to copy pages out of; `OSError`
        when that process is gone."""
        cache = cls.__new__(cls)
        cache.spec, cache.num_pages, cache.device = spec, num_pages, torch.device("cpu")
        cache.shared_path = shared_path
        cache._map(shared_path)
        return cache

    _ALIGN = 64

    def _allocate(self, make: Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
                  ) -> tuple[list[torch.Tensor], list[tuple[Pool, Pool]]]:
        """(the stacks, each layer's (K, V) pools over their memory); `make(shape, dtype)`
        gives each stack its storage. Stacks of no elements (a run of layers without heads in
        this pool) are left out of the first list."""
        s, stacks, layers = self.spec, [], []
        for heads, run in itertools.groupby(range(s.num_layers), key=s.heads):
            lead = (len(list(run)), self.num_pages, s.page_size, heads)
            if s.quant:
                meta = kv_format.allocate(s.quant, lead, s.head_dim, "meta")
                k, v = (kv_format.QuantizedPages(*(None if t is None else make(t.shape, t.dtype)
                                                   for t in meta)) for _ in range(2))
            else:
                k, v = (make((*lead, s.head_dim), s.dtype) for _ in range(2))
            stacks += [t for pool in (k, v) for t in _parts(pool) if t.numel()]
            layers += [(_layer(k, i), _layer(v, i)) for i in range(lead[0])]
        return stacks, layers

    def _shared_bytes(self) -> int:
        meta = lambda shape, dtype: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
        return sum(self._aligned(t.numel() * t.element_size()) for t in self._allocate(meta)[0])

    def _aligned(self, n: int) -> int:
        return -(-n // self._ALIGN) * self._ALIGN

    def _map(self, path: str) -> None:
        """Lay the stacks out one after another in the shared file at `path`."""
        size = self._shared_bytes()
        if os.path.getsize(path) != size:
            raise ValueError(f"the shared KV pool at {path} is not of this format and size")
        buffer = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        offset = 0

        def carve(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            nonlocal offset
            n = math.prod(shape) * dtype.itemsize
            out = buffer[offset:offset + n].view(dtype).view(shape)
            offset += self._aligned(n)
            return out

        self.stacks, self.layers = self._allocate(carve)

    def compact(self, plan: KVCompaction) -> None:
        """Carry out the step's evictions: the page copies, then the token moves."""
        if plan.page_copies or plan.moves:
            pages = torch.tensor(plan.page_copies, device=self.device).view(-1, 2)
            moves = torch.tensor(plan.moves, device=self.device).view(-1, 2)
            for t in self.stacks:
                if len(pages):
                    t[:, pages[:, 1]] = t[:, pages[:, 0]]
                if len(moves):
                    flat = t.flatten(1, 2)
                    flat[:, moves[:, 1]] = flat[:, moves[:, 0]]
        if plan.head_moves:
            layer, head, src, dst = torch.from_numpy(
                np.concatenate(plan.head_moves, 1)).to(self.device)
            for i, pools in enumerate(self.layers):
                mine = layer == i
                h, s, d = head[mine], src[mine], dst[mine]
                for t in (t for pool in pools for t in _parts(pool) if t.numel()):
                    flat = t.flatten(0, 1)
                    flat[d, h] = flat[s, h]

    def read_pages(self, page_ids: list[int]) -> list[np.ndarray]:
        """The bytes of these pages, one array per stack (`[layers, pages, ...]`), in their
        storage format: what a handoff sends."""
        index = torch.tensor(page_ids, device=self.device)
        return [t[:, index].view(torch.uint8).cpu().numpy() for t in self.stacks]

    def copy_pages_from(self, source: "KVCache", source_pages: list[int],
                        page_ids: list[int]) -> int:
        """Copy `source_pages` of another cache of this format (an attached shared pool) into
        `page_ids`; returns the bytes copied. Pages consecutive on both sides go as one slice
        copy per stack, many times faster than an indexed gather and scatter."""
        runs = _runs(source_pages, page_ids)
        for src, dst in zip(source.stacks, self.stacks):
            for s, d, n in runs:
                dst[:, d:d + n].copy_(src[:, s:s + n])
        return len(page_ids) * self.spec.page_bytes

    def write_pages(self, page_ids: list[int], frames: list, skip_pages: int = 0) -> None:
        """Write `read_pages` output of another engine into `page_ids`, leaving out its first
        `skip_pages` pages (this engine's prefix cache holds them). A frame that does not fit
        this cache's format raises `ValueError` before anything is written."""
        if len(frames) != len(self.stacks):
            raise ValueError(f"{len(frames)} KV frames for {len(self.stacks)} pool stacks")
        sources = []
        for t, frame in zip(self.stacks, frames):
            layers, page = t.shape[0], t[0, 0].numel() * t.element_size()
            data = np.frombuffer(frame, np.uint8)
            if len(data) != layers * (skip_pages + len(page_ids)) * page:
                raise ValueError(f"a KV frame of {len(data)} bytes does not hold "
                                 f"{skip_pages + len(page_ids)} pages of {layers} x {page} bytes")
            sources.append(data.reshape(layers, -1, page)[:, skip_pages:])
        index = torch.tensor(page_ids, device=self.device)
        for t, src in zip(self.stacks, sources):
            t[:, index] = torch.from_numpy(src.copy()).view(t.dtype).view(
                t.shape[0], len(page_ids), *t.shape[2:]).to(self.device)


def _parts(pool: Pool) -> tuple[torch.Tensor, ...]:
    """A pool's tensors: itself, or its codes, scales and (asymmetric) zeros."""
    if isinstance(pool, kv_format.QuantizedPages):
        return tuple(t for t in pool if t is not None)
    return (pool,)


def _layer(stack: Pool, i: int) -> Pool:
    """Layer `i` of a run's stacked pool."""
    if isinstance(stack, kv_format.QuantizedPages):
        return kv_format.QuantizedPages(*(None if t is None else _own_storage(t[i])
                                          for t in stack))
    return _own_storage(stack[i])


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """On CPU, `t`'s memory as a tensor with a storage of its own. torch.compile'd steps
    (engine/cpu_compile.py) write every layer's pool; given views of one storage, it would copy
    the whole storage, every layer's pages, at each step (measured: 67 -> 7 tok/s at batch 1)."""
    if t.device.type != "cpu" or not t.numel():
        return t
    return torch.from_numpy(t.view(torch.uint8).numpy()).view(t.dtype).view(t.shape)


def _runs(source: list[int], dest: list[int]) -> list[tuple[int, int, int]]:
    """(source start, dest start, length) of the stretches where both id lists count up by 1."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(source, dest):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs
