"""CUDA graphs of the model's forward for decode-only steps, one per batch-size bucket.

A decode step of an 8B model launches ~350 small kernels; replaying them as one graph takes
the CPU launch cost off the critical path. Graphs replay fixed addresses and shapes, so the
step's inputs are copied into static buffers of the next bucket size up; padded rows write no
KV (slot -1) and attend to one key of a page an earlier step named, and their outputs are
dropped. The split-KV grid is sized for `max_model_len`; programs past a context exit at once,
and the merge pass adds partitions in order whatever the grid, so a replayed step gives an
eager step's bits.
"""
import logging
import time

import torch

from engine.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    """vLLM's buckets: 1, 2, 4, then every multiple of 8, up to `max_batch` (kept last)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return sizes + [max_batch]


class _StaticTables:
    """One page pool's share of the static inputs: each row's new slot, context and pages."""

    def __init__(self, n: int, max_pages: int, device: torch.device):
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int64, device=device)
        self.block_table = torch.zeros(n, max_pages, dtype=torch.int64, device=device)

    def meta(self, size: int, query_start_loc: torch.Tensor,
             max_model_len: int) -> AttentionMetadata:
        return AttentionMetadata(self.slot_mapping[:size], query_start_loc[:size + 1],
                                 self.seq_lens[:size], self.block_table[:size],
                                 max_query_len=1, max_seq_len=max_model_len)

    def copy(self, meta: AttentionMetadata, n: int, size: int) -> None:
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)  # stale slots may be a live request's
        self.seq_lens[:n].copy_(meta.seq_lens)
        # Stale rows still name valid pages; one key each keeps them from reading long contexts.
        self.seq_lens[n:size].fill_(1)
        self.block_table[:n, :meta.block_table.shape[1]].copy_(meta.block_table)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list, max_batch: int,
                 max_pages: int, max_model_len: int, device: torch.device,
                 second_pool: bool = False):
        """`second_pool`: the layers also read a second page pool (a head config's streaming
        heads, a model's sliding layers), through `AttentionMetadata.streaming`."""
        self.model, self.kv_caches, self.max_model_len = model, kv_caches, max_model_len
        self.sizes = capture_sizes(max_batch)
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int64, device=device)
        self.tables = [_StaticTables(n, max_pages, device)
                       for _ in range(2 if second_pool else 1)]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        start = time.perf_counter()
        self._capture(device)
        self.capture_s = time.perf_counter() - start
        logger.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s", len(self.sizes), n,
                    self.capture_s)

    @torch.inference_mode()
    def _capture(self, device: torch.device) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first: smaller graphs reuse its pool
            self._forward(size)  # compiles the Triton kernels outside the capture
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(device)

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _forward(self, size: int) -> torch.Tensor:
        meta, *second = (t.meta(size, self.query_start_loc, self.max_model_len)
                         for t in self.tables)
        meta.streaming = second[0] if second else None
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, meta)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states `[n, hidden]` of a decode-only step of `n <= max_batch` requests."""
        n = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        for tables, m in zip(self.tables, (meta, meta.streaming)):
            tables.copy(m, n, size)
        self.graphs[size].replay()
        return self.outputs[size][:n]
