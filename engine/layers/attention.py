"""Paged attention over the flat batch: write this step's K/V into pages, attend via block table."""
from dataclasses import dataclass

import torch

import kernels


@dataclass
class AttentionMetadata:
    """Where a step's tokens live; built once per step by the model runner, shared by all layers."""
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    query_start_loc: torch.Tensor  # [R+1]
    seq_lens: torch.Tensor  # [R] whole context after this step
    block_table: torch.Tensor  # [R, max_pages]
    max_query_len: int
    max_seq_len: int


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    k_cache, v_cache = kv_cache
    kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    return kernels.paged_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                                   meta.block_table, scale, meta.max_query_len,
                                   meta.max_seq_len)
