"""The model's forward under torch.compile, for CPU steps that decode one request.

A one-token step of SmolLM2 on CPU spends more time in ~40 small aten calls per layer (norms,
rotary, the KV gather, casts, each a few microseconds from Python) than in its GEMMs. Inductor
fuses them into a few C++ loops around the GEMM and attention calls: a forward at a 300-token
context went from 15 to 10.5 ms on two Zen 4 cores (llama-server's whole step: ~9 ms). Larger
steps stay eager: their GEMMs dominate, and a compiled 16-row decode step was no faster (55 vs
56 ms).

The graph is dynamic in the context length (its page count, kernels.reference's decode
attention masks the last page's tail) and is compiled at start-up, so no request waits on a
compile. A context of one page would need a graph of its own (torch specializes sizes 0 and 1):
those few steps run eagerly. Inductor's cache lives beside the kernel measurements
(`$TESSERA_CACHE_DIR/inductor`): the first start compiles for about a minute, later ones
mostly load.
"""
import os
import time

import torch

from engine.layers.attention import AttentionMetadata
from engine.layers.quantization.kernel_choice import cache_dir


class CompiledDecode:
    def __init__(self, model: torch.nn.Module, kv_layers: list, pool_pages: list[int],
                 page_size: int, max_model_len: int):
        """`pool_pages`: the pages of each pool the layers read, the main one first (a second
        one holds a head config's streaming heads or a model's sliding layers)."""
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
        self.kv_layers, self.page_size = kv_layers, page_size
        self.forward = torch.compile(model.forward, dynamic=True)
        start = time.perf_counter()
        # 11 and 7 pages: counts no model dimension is likely to equal (torch would tie them).
        contexts = [min(n * page_size - 3, max_model_len) for n in (11, 7)]
        self._warm_up(list(zip(contexts, pool_pages)))
        self.compile_s = time.perf_counter() - start

    def covers(self, meta: AttentionMetadata) -> bool:
        return (meta.max_query_len == 1 and meta.block_table.shape[0] == 1
                and min(m.max_seq_len for m in (meta, meta.streaming) if m) > self.page_size)

    @torch.inference_mode()
    def _warm_up(self, pools: list[tuple[int, int]]) -> None:
        """A decode step at a `(context, pages)` per pool on its first pages (free: no request
        exists yet; what it writes there is overwritten before anything reads it)."""
        metas = []
        for context, num_pages in pools:
            pages = -(-context // self.page_size)
            block_table = torch.arange(pages).view(1, pages) % num_pages
            positions, meta = AttentionMetadata.for_batch(
                torch.tensor([context - 1]), torch.ones(1, dtype=torch.int64), block_table,
                self.page_size, 1, context)
            metas.append((positions, meta))
        (positions, meta), *second = metas
        if second:
            meta.streaming = second[0][1]
        self.run(torch.zeros(1, dtype=torch.int64), positions, meta)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states `[1, hidden]` of a one-request decode step."""
        return self.forward(input_ids, positions, self.kv_layers, meta)
