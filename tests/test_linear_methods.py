"""The linear-method seam: the registry, fused-shard loading, and each method's matmul."""
import pytest
import torch
from torch.nn import functional as F

from engine.config import QUANTIZATIONS, ModelConfig
from engine.layers.linear import Linear
from engine.layers.quantization import QUANTIZATION_METHODS, get_linear_method
from engine.layers.quantization.dense import DenseMethod
from engine.layers.quantization.gguf_q4 import INT4_MAX_TOKENS, QuantizedWeight

OUTPUT_SIZES = [64, 32, 32]  # a fused q|k|v with 2:1 grouped-query heads
IN_FEATURES = 256


def _dense_shard(rows: int, gen: torch.Generator):
    w = torch.randn(rows, IN_FEATURES, generator=gen)
    return w, w


def _q4_shard(rows: int, gen: torch.Generator):
    groups = IN_FEATURES // 32
    q = QuantizedWeight(torch.randint(0, 16, (rows, IN_FEATURES), generator=gen,
                                      dtype=torch.uint8),
                        torch.rand(rows, groups, generator=gen) * 0.02,
                        torch.randn(rows, groups, generator=gen) * 0.1)
    return q, q.dequantize()


# Per method: a random checkpoint shard in its format with its float values, the dtype it
# runs in, and its error bound relative to the output's largest magnitude.
CASES = {"none": (_dense_shard, torch.float32, 0.0),
         # bf16 activations, weights and output: about 1% of the output's scale
         "q4": (_q4_shard, torch.bfloat16, 0.02)}


def test_registry_names_are_the_cli_choices():
    assert tuple(QUANTIZATION_METHODS) == QUANTIZATIONS
    assert set(CASES) == set(QUANTIZATIONS)


def test_none_and_missing_quantization_are_dense():
    assert type(get_linear_method(None)) is DenseMethod
    assert type(get_linear_method("none")) is DenseMethod
    assert ModelConfig(quantization="none").quantization is None


def test_unknown_quantization_is_rejected():
    with pytest.raises(ValueError, match="quantization must be one of none, q4"):
        get_linear_method("q8")
    with pytest.raises(ValueError, match="quantization must be one of none, q4"):
        ModelConfig(quantization="q8")


def test_fused_shards_land_at_their_rows():
    layer = Linear(4, sum(OUTPUT_SIZES), bias=True, method=DenseMethod(),
                   output_sizes=OUTPUT_SIZES)
    for shard, rows in enumerate(OUTPUT_SIZES):
        layer.weight.weight_loader(layer.weight, torch.full((rows, 4), float(shard)), shard)
        layer.bias.weight_loader(layer.bias, torch.full((rows,), float(shard)), shard)
    expected = torch.cat([torch.full((rows,), float(i)) for i, rows in enumerate(OUTPUT_SIZES)])
    assert torch.equal(layer.weight[:, 0], expected)
    assert torch.equal(layer.bias, expected)


@pytest.mark.parametrize("name", QUANTIZATIONS)
@pytest.mark.parametrize("num_tokens", [1, INT4_MAX_TOKENS, INT4_MAX_TOKENS + 1, 33])
def test_apply_matches_f_linear_on_the_dequantized_weight(name, num_tokens):
    make_shard, dtype, bound = CASES[name]
    gen = torch.Generator().manual_seed(0)
    method = get_linear_method(name)
    layer = Linear(IN_FEATURES, sum(OUTPUT_SIZES), bias=True, method=method,
                   output_sizes=OUTPUT_SIZES)
    dense = []
    for shard, rows in enumerate(OUTPUT_SIZES):
        loaded, values = make_shard(rows, gen)
        layer.weight.weight_loader(layer.weight, loaded, shard)
        layer.bias.weight_loader(layer.bias, torch.zeros(rows) + shard, shard)
        dense.append(values)
    method.process_weights_after_loading(layer)
    layer.to(dtype)
    x = torch.randn(num_tokens, IN_FEATURES, generator=gen).to(dtype)
    y = layer(x).float()
    expected = F.linear(x.float(), torch.cat(dense), layer.bias.float())
    assert (y - expected).abs().max() <= bound * expected.abs().max()
