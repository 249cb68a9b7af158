"""A linear layer `y = x W^T + b` whose weight format is its `LinearMethod`.

The layer knows its geometry: `output_sizes` are the heights of the projections fused into it
(q|k|v, gate|up), and `load_rows` puts a checkpoint shard at its rows. The method
(engine/layers/quantization) knows the format: the parameters, their loading, the matmul.
"""
import torch
from torch import nn

from engine.layers.quantization import LinearMethod


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 method: LinearMethod, output_sizes: list[int] | None = None):
        super().__init__()
        self.output_sizes = output_sizes or [out_features]
        self.params_dtype = torch.get_default_dtype()  # the activations' dtype
        self.method = method
        method.create_weights(self, in_features, out_features)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)
            self.bias.weight_loader = self.load_rows

    def load_rows(self, param: nn.Parameter, loaded: torch.Tensor,
                  shard_id: int | None = None) -> None:
        """The float weight loader: copy `loaded` into all of `param`, or into the rows of
        fused shard `shard_id`."""
        rows = param.data if shard_id is None else param.data.narrow(
            0, sum(self.output_sizes[:shard_id]), self.output_sizes[shard_id])
        rows.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)


class VocabEmbedding(Linear):
    """The token embedding `[vocab, hidden]`: `embed` looks rows up, and a model with tied
    embeddings also calls it as its LM head (`hidden -> logits`)."""

    def __init__(self, vocab_size: int, hidden_size: int, *, method: LinearMethod):
        super().__init__(hidden_size, vocab_size, method=method)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.method.embed(self, token_ids)
