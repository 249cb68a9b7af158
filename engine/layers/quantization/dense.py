"""Float weights and `F.linear`: the default, and the reference every other format is
tested against."""
import torch
from torch import nn
from torch.nn import functional as F

from engine.layers.quantization.base import LinearMethod


class DenseMethod(LinearMethod):
    name = "none"

    def create_weights(self, layer, in_features, out_features):
        layer.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        layer.weight.weight_loader = layer.load_rows

    def apply(self, layer, x, bias):
        return F.linear(x, layer.weight, bias)

    def embed(self, layer, token_ids):
        return F.embedding(token_ids, layer.weight)
