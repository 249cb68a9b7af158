"""The physical KV cache: per layer one K pool and one V pool of pages.

A page is `[page_size, num_kv_heads, head_dim]`. `KVCacheSpec.dtype` is the storage format of
a page; only native float formats exist today, and quantized formats (int8/fp8/int4) will add
per-page scale tensors next to the pools without changing page ids or the block table.
"""
from dataclasses import dataclass

import torch

DEFAULT_CPU_KV_MEMORY = 1 << 30


@dataclass
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype

    @property
    def page_bytes(self) -> int:
        """Bytes of one page across all layers, K and V."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * elem

    def num_pages_for(self, memory_bytes: int) -> int:
        return max(memory_bytes, 0) // self.page_bytes


def gpu_kv_budget(total: int, used: int, headroom: int, utilization: float) -> int:
    """Bytes left for KV pages when the process may use `utilization` of the GPU's `total`.

    `used` is what the device has in use after loading the weights (this process's weights
    and CUDA context, and any other process), `headroom` what steps need on top of that (the
    largest warm-up step's peak, plus the CUDA graph pool).
    """
    return int(total * utilization) - used - headroom


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


class KVCache:
    def __init__(self, spec: KVCacheSpec, num_pages: int, device: torch.device | str):
        if num_pages < 1:
            raise ValueError("the KV cache needs at least one page")
        self.spec, self.num_pages = spec, num_pages
        shape = (num_pages, spec.page_size, spec.num_kv_heads, spec.head_dim)
        self.layers = [(torch.zeros(shape, dtype=spec.dtype, device=device),
                        torch.zeros(shape, dtype=spec.dtype, device=device))
                       for _ in range(spec.num_layers)]
