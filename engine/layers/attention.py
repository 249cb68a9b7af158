"""Paged attention over the flat batch: write this step's K/V into pages, attend via block table."""
from dataclasses import dataclass, field, replace

import torch

import kernels
from kernels.kv_format import QuantizedPages, rotatable


@dataclass
class ScoredQueries:
    """Queries of one request whose attention to its held keys the step returns (SnapKV's
    observation window): each attention layer appends its `[KvH, seq_len]` sum."""
    row: int  # the request's row of `block_table`
    first: int  # index of the first scored query in the flat batch
    count: int
    first_slot: int  # the KV slot of the first scored query's own token
    seq_len: int  # the request's held tokens after this step
    scores: list[torch.Tensor] = field(default_factory=list)


@dataclass
class AttentionMetadata:
    """Where a step's tokens live; built once per step by the model runner, shared by all layers."""
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    query_start_loc: torch.Tensor  # [R+1]
    seq_lens: torch.Tensor  # [R] whole context after this step
    block_table: torch.Tensor  # [R, max_pages]
    max_query_len: int
    max_seq_len: int
    scored: tuple[ScoredQueries, ...] = ()
    # Under a head config: where the streaming heads' tokens live (their own pool and tables)
    streaming: "AttentionMetadata | None" = None

    @classmethod
    def for_batch(cls, starts: torch.Tensor, num_new: torch.Tensor, block_table: torch.Tensor,
                  page_size: int, max_query_len: int, max_seq_len: int,
                  kv_starts: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, "AttentionMetadata"]:
        """Positions and metadata of a flat batch in which request i brings `num_new[i]` tokens
        after its first `starts[i]`, on the pages of row i of `block_table`. Its new K/V go
        after the `kv_starts[i]` tokens it holds in KV (fewer than `starts[i]` once tokens
        were evicted; by default as many): positions count every token, slots and
        `seq_lens` only the held ones."""
        dev = num_new.device
        kv_starts = starts if kv_starts is None else kv_starts
        row = torch.repeat_interleave(torch.arange(len(num_new), device=dev), num_new)
        query_start_loc = torch.zeros(len(num_new) + 1, dtype=torch.int64, device=dev)
        torch.cumsum(num_new, 0, out=query_start_loc[1:])
        offsets = torch.arange(len(row), device=dev) - query_start_loc[row]
        held = kv_starts[row] + offsets
        slots = block_table[row, held // page_size] * page_size + held % page_size
        return starts[row] + offsets, cls(slots, query_start_loc, kv_starts + num_new,
                                          block_table, max_query_len, max_seq_len)

    def to(self, device: torch.device) -> "AttentionMetadata":
        return replace(self, slot_mapping=self.slot_mapping.to(device),
                       query_start_loc=self.query_start_loc.to(device),
                       seq_lens=self.seq_lens.to(device), block_table=self.block_table.to(device),
                       streaming=self.streaming and self.streaming.to(device))


@dataclass
class HeadSplit:
    """One layer's KV under a head config (scheduler/head_config.py): the pools of its
    full-context KV heads and those of its streaming heads (pages of their own, addressed by
    `AttentionMetadata.streaming`), and which KV heads, and so which query heads, each serves."""
    full: tuple
    streaming: tuple
    full_kv_heads: torch.Tensor
    streaming_kv_heads: torch.Tensor
    full_q_heads: torch.Tensor
    streaming_q_heads: torch.Tensor

    @classmethod
    def of(cls, full: tuple, streaming: tuple, is_streaming: torch.Tensor,
           group: int) -> "HeadSplit":
        """`is_streaming[kv_heads]` of this layer; `group` query heads per KV head."""
        kv = torch.arange(len(is_streaming), device=is_streaming.device)
        q = is_streaming.repeat_interleave(group)
        q_heads = torch.arange(len(q), device=q.device)
        return cls(full, streaming, kv[~is_streaming], kv[is_streaming], q_heads[~q],
                   q_heads[q])

    def sides(self, meta: AttentionMetadata):
        """(pools, KV heads, query heads, metadata) of each side that has heads."""
        for pools, kv_heads, q_heads, m in (
                (self.full, self.full_kv_heads, self.full_q_heads, meta),
                (self.streaming, self.streaming_kv_heads, self.streaming_q_heads,
                 meta.streaming)):
            if len(kv_heads):
                yield pools, kv_heads, q_heads, m


@dataclass
class CalibratedKV:
    """One layer's KV (pools or a `HeadSplit`) holding keys minus a constant offset per KV
    head and channel, `[num_kv_heads, head_dim]`, then reflected (queries alike) by the
    Householder reflection of a unit vector per KV head, `x - 2 (x . r) r`
    (engine/kv_calibration.py). Neither changes a softmax: scores all move by q . offset, and
    a reflection is orthogonal."""
    inner: "tuple | HeadSplit"
    k_offset: torch.Tensor
    reflector: torch.Tensor  # [num_kv_heads, head_dim]

    def keys(self, k: torch.Tensor) -> torch.Tensor:
        return _reflect(k.float() - self.k_offset.float(), self.reflector).to(k.dtype)

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        per_head = self.reflector.repeat_interleave(q.shape[1] // self.reflector.shape[0], 0)
        return _reflect(q.float(), per_head).to(q.dtype)


def _reflect(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """`x[T, heads, D]` reflected by unit (or zero) vectors `r[heads, D]`."""
    return x - 2 * (x * r).sum(-1, keepdim=True) * r


@dataclass
class QueryProbe:
    """One layer's pools during calibration (engine/kv_calibration.py), and the mean query,
    `[num_heads, head_dim]` in fp32, of each forward that attended over them."""
    inner: tuple
    query_means: list[torch.Tensor] = field(default_factory=list)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                    scale: float, sliding_window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Each query attends to its request's keys up to its own position, or to the last
    `sliding_window` of them; `softcap` caps the scores (kernels.reference.paged_attention).
    Under a head config each side of the layer's `HeadSplit` attends in its own pool."""
    if isinstance(kv_cache, CalibratedKV):
        return paged_attention(kv_cache.queries(q), kv_cache.keys(k), v, kv_cache.inner, meta,
                               scale, sliding_window, softcap)
    if isinstance(kv_cache, QueryProbe):
        kv_cache.query_means.append(q.float().mean(0))
        return paged_attention(q, k, v, kv_cache.inner, meta, scale, sliding_window, softcap)
    if isinstance(kv_cache, HeadSplit):
        out = torch.empty_like(q)
        for pools, kv_heads, q_heads, m in kv_cache.sides(meta):
            out[:, q_heads] = paged_attention(q[:, q_heads], k[:, kv_heads], v[:, kv_heads],
                                              pools, m, scale, sliding_window, softcap)
        return out
    k_cache, v_cache = kv_cache
    rotated = isinstance(k_cache, QuantizedPages) and rotatable(k.shape[-1])
    rotate_values = rotated and k_cache.format.rotates_values
    if rotated:
        # (q H)(k H)^T = q k^T for the orthonormal Hadamard H: the keys are quantized in a
        # basis where no channel's outliers dominate the scores' rounding (kernels/kv_format.py)
        q, k = (kernels.rotate(x, x.shape[-1]).to(x.dtype) for x in (q, k))
    if rotate_values:  # sum_i p_i (v_i H) = (sum_i p_i v_i) H, undone by H = H^-1 below
        v = kernels.rotate(v, v.shape[-1]).to(v.dtype)
    kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    for s in meta.scored:
        s.scores.append(kernels.attention_scores(q[s.first:s.first + s.count], k_cache,
                                                 meta.block_table[s.row], s.seq_len,
                                                 s.first_slot, scale, softcap))
    out = kernels.paged_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                                  meta.block_table, scale, meta.max_query_len,
                                  meta.max_seq_len, sliding_window, softcap)
    return kernels.rotate(out, out.shape[-1]).to(out.dtype) if rotate_values else out
