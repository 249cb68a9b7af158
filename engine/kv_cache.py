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
        return memory_bytes // self.page_bytes


class KVCache:
    def __init__(self, spec: KVCacheSpec, num_pages: int, device: torch.device | str):
        if num_pages < 1:
            raise ValueError("the KV cache needs at least one page")
        self.spec, self.num_pages = spec, num_pages
        shape = (num_pages, spec.page_size, spec.num_kv_heads, spec.head_dim)
        self.layers = [(torch.zeros(shape, dtype=spec.dtype, device=device),
                        torch.zeros(shape, dtype=spec.dtype, device=device))
                       for _ in range(spec.num_layers)]
