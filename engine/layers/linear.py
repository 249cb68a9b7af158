"""A linear layer `y = x W^T + b` whose weight format is its `LinearMethod`.

The layer knows its geometry: `output_sizes` are the heights of the projections fused into it
(q|k|v, gate|up), and `load_rows` puts a checkpoint shard at its rows. The method
(engine/layers/quantization) knows the format: the parameters, their loading, the matmul.
"""
from functools import partial

import torch
from torch import nn

from engine.layers.quantization import LinearMethod
from engine.parallel import Shard, TensorParallel, narrow


class Linear(nn.Module):
    """Under tensor parallelism (engine/parallel.py) a column-parallel layer keeps
    `output_shards`, its rows of each fused projection, and a row-parallel one keeps
    `input_shard`, its input columns, and sums its partial products over the ranks of `tp`.
    The checkpoint tensor is cut to the rank's share before its method loads it, so no rank
    holds more than its share."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 method: LinearMethod, output_sizes: list[int] | None = None,
                 output_shards: list[Shard] | None = None, input_shard: Shard | None = None,
                 tp: TensorParallel = TensorParallel()):
        super().__init__()
        if output_shards is not None:
            output_sizes = [s.length for s in output_shards]
            out_features = sum(output_sizes)
        if input_shard is not None:
            in_features = input_shard.length
        self.output_sizes = output_sizes or [out_features]
        self.output_shards, self.input_shard, self.tp = output_shards, input_shard, tp
        self.params_dtype = torch.get_default_dtype()  # the activations' dtype
        self.method = method
        method.create_weights(self, in_features, out_features)
        if output_shards is not None or input_shard is not None:
            self.weight.weight_loader = partial(self._load_share, self.weight.weight_loader)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)
            self.bias.weight_loader = (self.load_rows if output_shards is None else
                                       partial(self._load_share, self.load_rows))

    def _load_share(self, load, param: nn.Parameter, loaded, shard_id: int | None = None):
        """`load` this rank's share of a whole checkpoint tensor (or quantized weight)."""
        if shard_id is None and self.output_shards is not None and len(self.output_shards) > 1:
            # A checkpoint holding the fused projection whole (Phi-3): each part's share.
            start = 0
            for i, shard in enumerate(self.output_shards):
                self._load_share(load, param, loaded.narrow(0, start, shard.whole), i)
                start += shard.whole
            return
        if self.output_shards is not None:
            loaded = narrow(loaded, 0, self.output_shards[shard_id or 0])
        if self.input_shard is not None and param is self.weight:
            loaded = narrow(loaded, 1, self.input_shard)
        load(param, loaded, shard_id)

    def load_rows(self, param: nn.Parameter, loaded: torch.Tensor,
                  shard_id: int | None = None) -> None:
        """The float weight loader: copy `loaded` into all of `param`, or into the rows of
        fused shard `shard_id`."""
        rows = param.data if shard_id is None else param.data.narrow(
            0, sum(self.output_sizes[:shard_id]), self.output_sizes[shard_id])
        rows.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_shard is None:
            return self.method.apply(self, x, self.bias)
        y = self.tp.all_reduce(self.method.apply(self, x, None))
        return y if self.bias is None else y + self.bias

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 `x W^T` of an LM head (never split by input: no bias, no all-reduce)."""
        return self.method.logits(self, x)


class VocabEmbedding(Linear):
    """The token embedding `[vocab, hidden]`: `embed` looks rows up, and a model with tied
    embeddings also calls it as its LM head (`hidden -> logits`). Under tensor parallelism
    each rank keeps a slice of the vocabulary: a row lives on one rank, the others add
    zeros."""

    def __init__(self, vocab_size: int, hidden_size: int, *, method: LinearMethod,
                 tp: TensorParallel = TensorParallel()):
        super().__init__(hidden_size, vocab_size, method=method, tp=tp,
                         output_shards=None if tp.size == 1 else
                         [tp.split(vocab_size, "the vocabulary")])

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.output_shards is None:
            return self.method.embed(self, token_ids)
        shard = self.output_shards[0]
        local = token_ids - shard.start
        here = (local >= 0) & (local < shard.length)
        rows = self.method.embed(self, torch.where(here, local, 0))
        return self.tp.all_reduce(rows * here[:, None].to(rows.dtype))
