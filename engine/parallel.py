"""Tensor parallelism: one rank's share of each weight and the collectives that join them.

Megatron's split, as vLLM and SGLang use it: q|k|v and gate|up are column-parallel (each rank
keeps a slice of the output rows: its heads, its part of the intermediate size), o and down
are row-parallel (the matching slice of the input columns) and end in one all-reduce each; the
token embedding and the LM head keep a slice of the vocabulary. KV heads are split like the
query heads, or replicated when there are fewer KV heads than ranks. The collectives run on
torch.distributed: gloo on CPU, NCCL on CUDA.
"""
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.profiler import record_function

from engine.loader import ModelArch


COLLECTIVE = "tensor_parallel_collective"  # the profiler's name for a collective's whole call


@dataclass(frozen=True)
class Shard:
    """The part of a checkpoint tensor's dimension of size `whole` that one rank keeps:
    `length` from `start`."""
    start: int
    length: int
    whole: int


@dataclass(frozen=True)
class AttentionHeads:
    """A rank's heads: query heads and KV heads, the first of each in the checkpoint."""
    num_heads: int
    first_head: int
    num_kv_heads: int
    first_kv_head: int


@dataclass(frozen=True)
class TensorParallel:
    """This process's rank among `size` tensor-parallel ranks (size 1: no parallelism)."""
    rank: int = 0
    size: int = 1

    def split(self, total: int, what: str) -> Shard:
        """This rank's even share of `total`."""
        if total % self.size:
            raise ValueError(f"tensor_parallel_size {self.size} does not divide {what} "
                             f"({total})")
        length = total // self.size
        return Shard(self.rank * length, length, total)

    def heads(self, arch: ModelArch) -> AttentionHeads:
        """Each rank takes `num_heads / size` query heads; KV heads split alike, or, when
        there are fewer than ranks, each rank keeps the one KV head its query heads share."""
        q = self.split(arch.num_heads, "the attention heads")
        kv_heads = arch.num_kv_heads
        if kv_heads >= self.size:
            kv = self.split(kv_heads, "the KV heads")
            return AttentionHeads(q.length, q.start, kv.length, kv.start)
        if self.size % kv_heads:
            raise ValueError(f"tensor_parallel_size {self.size} is neither a divisor nor a "
                             f"multiple of the KV heads ({kv_heads})")
        return AttentionHeads(q.length, q.start, 1, self.rank * kv_heads // self.size)

    def head_shards(self, arch: ModelArch) -> tuple[Shard, Shard]:
        """This rank's rows of q, and of k (or v), in a q|k|v projection."""
        heads, d = self.heads(arch), arch.head_dim
        return (Shard(heads.first_head * d, heads.num_heads * d, arch.num_heads * d),
                Shard(heads.first_kv_head * d, heads.num_kv_heads * d, arch.num_kv_heads * d))

    def check(self, arch: ModelArch) -> None:
        """Refuse at start, with the reason, a model this many ranks cannot split."""
        if self.size == 1:
            return
        if arch.moe_layers and any(arch.moe_layers):
            raise ValueError("tensor parallelism does not split mixture-of-experts layers yet")
        self.heads(arch)
        self.split(arch.intermediate_size, "the MLP's intermediate size")
        self.split(arch.vocab_size, "the vocabulary")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the ranks (in place)."""
        if self.size > 1:
            with record_function(COLLECTIVE):  # its wall time, waiting for peers included
                dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' `x` side by side along the last dimension, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        with record_function(COLLECTIVE):
            dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def min(self, value: int) -> int:
        """The least of the ranks' `value`s (the KV pool every rank can hold)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


def init_tensor_parallel(rank: int, size: int, init_method: str, device: str,
                         timeout_s: float) -> TensorParallel:
    """Join the process group of `size` ranks: gloo on CPU, NCCL on CUDA."""
    if size > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                init_method=init_method, rank=rank, world_size=size,
                                timeout=timedelta(seconds=timeout_s))
    return TensorParallel(rank, size)


def destroy_tensor_parallel() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def narrow(loaded, dim: int, shard: Shard):
    """`loaded` (a tensor, or a quantized weight with its own `narrow`) cut to `shard` along
    `dim`."""
    return loaded.narrow(dim, shard.start, shard.length)
