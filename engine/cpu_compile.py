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
    def __init__(self, model: torch.nn.Module, kv_layers: list, num_pages: int, page_size: int,
                 max_model_len: int):
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
        self.kv_layers, self.num_pages, self.page_size = kv_layers, num_pages, page_size
        self.forward = torch.compile(model.forward, dynamic=True)
        start = time.perf_counter()
        # 11 pages: a count no model dimension is likely to equal (torch would tie the two).
        self._warm_up(min(11 * page_size - 3, max_model_len))
        self.compile_s = time.perf_counter() - start

    def covers(self, meta: AttentionMetadata) -> bool:
        return (meta.max_query_len == 1 and meta.block_table.shape[0] == 1
                and meta.max_seq_len > self.page_size)

    @torch.inference_mode()
    def _warm_up(self, context: int) -> None:
        """A decode step at `context` on the cache's first pages (free: no request exists yet;
        what it writes there is overwritten before anything reads it)."""
        pages = -(-context // self.page_size)
        block_table = torch.arange(pages).view(1, pages) % self.num_pages
        positions, meta = AttentionMetadata.for_batch(
            torch.tensor([context - 1]), torch.ones(1, dtype=torch.int64), block_table,
            self.page_size, 1, context)
        self.run(torch.zeros(1, dtype=torch.int64), positions, meta)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states `[1, hidden]` of a one-request decode step."""
        return self.forward(input_ids, positions, self.kv_layers, meta)
