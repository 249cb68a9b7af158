"""`quantization="q4"`: GGUF 4-bit linears kept packed and run by the int4 CPU kernel."""
import gguf
import numpy as np
import pytest
import torch
from torch.nn import functional as F

import kernels
from engine import LLM, SamplingParams
from engine.config import ModelConfig
from engine.layers.linear import INT4_MAX_TOKENS, Linear
from engine.loader import QuantizedWeight, load, unpack_q4
from engine.tokenizer import resolve_model_path

GGUF_PATH = resolve_model_path(None)  # the bundled SmolLM2-135M-Instruct, Q4_1 linears
PROMPTS = ["The capital of France is", "Write a haiku about the sea."]


def _gguf_tensor(name: str):
    return next(t for t in gguf.GGUFReader(str(GGUF_PATH)).tensors if t.name == name)


@pytest.fixture(scope="module")
def q_proj():
    t = _gguf_tensor("blk.0.attn_q.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
    return t


def test_unpacked_q4_1_equals_gguf_dequantize(q_proj):
    expected = gguf.quants.dequantize(q_proj.data, q_proj.tensor_type)
    assert torch.equal(unpack_q4(q_proj.data, has_min=True).dequantize(),
                       torch.from_numpy(expected))


def test_unpacked_q4_0_equals_gguf_dequantize():
    w = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)
    expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0)
    assert torch.equal(unpack_q4(blocks, has_min=False).dequantize(), torch.from_numpy(expected))


def test_q4_loader_unpermutes_rope_rows_like_the_dense_loader():
    names = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"}
    dense = {n: w for n, w in load(ModelConfig())[1] if n in names}
    quantized = {n: w for n, w in load(ModelConfig(quantization="q4"))[1] if n in names}
    for n in names:
        assert isinstance(quantized[n], QuantizedWeight)
        assert torch.equal(quantized[n].dequantize(), dense[n])


def test_int4_linear_matches_dequantized_matmul(q_proj):
    q = unpack_q4(q_proj.data, has_min=True)
    packed, scales_and_zeros = kernels.pack_int4(q.codes, q.scales, q.zeros)
    x = torch.randn(3, q.codes.shape[1], generator=torch.Generator().manual_seed(0))
    y = kernels.int4_linear(x.bfloat16(), packed, scales_and_zeros, q.group_size).float()
    expected = x.bfloat16().float() @ q.dequantize().T
    # bf16 output, and scales/zeros rounded from fp16 to bf16: about 1% of the output's scale
    assert (y - expected).abs().max() <= 0.02 * expected.abs().max()


def test_linear_uses_dense_weight_above_int4_max_tokens(q_proj):
    q = unpack_q4(q_proj.data, has_min=True)
    layer = Linear(*reversed(q.codes.shape))
    layer.weight.data.copy_(q.dequantize())
    layer.set_int4(q)
    layer.to(torch.bfloat16)
    x = torch.randn(INT4_MAX_TOKENS + 1, q.codes.shape[1]).bfloat16()
    assert torch.equal(layer(x), F.linear(x, layer.weight))
    small = x[:INT4_MAX_TOKENS]
    assert torch.equal(layer(small), kernels.int4_linear(
        small, layer.int4_weight, layer.int4_scales_and_zeros, q.group_size))


def test_q4_rejects_fp32_and_non_gguf_models():
    with pytest.raises(ValueError, match="bfloat16"):
        LLM(dtype="float32", quantization="q4", num_kv_pages=8)
    with pytest.raises(ValueError, match="GGUF"):
        load(ModelConfig(model=str(GGUF_PATH.parent), load_format="dummy", quantization="q4"))
    with pytest.raises(ValueError, match="quantization must be"):
        load(ModelConfig(quantization="q8"))


def test_q4_greedy_tokens_track_dense_bf16_and_pages_return_to_free():
    """Asserts: each prompt's first 8 greedy tokens equal the dense bf16 run's.

    Not the whole sequence: int4 uses bf16 group scales (dense bf16 rounds each weight instead),
    so a near-tie argmax can flip, after which the continuations differ by construction.
    Measured here: one prompt matches for all 32 tokens, the other for its first 10.
    """
    params = SamplingParams(temperature=0, max_tokens=16)
    runs = {}
    for quantization in (None, "q4"):
        llm = LLM(dtype="bfloat16", quantization=quantization, num_kv_pages=64,
                  max_model_len=256)
        runs[quantization] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
        bm = llm.engine.block_manager
        assert bm.num_free_pages == bm.num_pages
    for dense, q4 in zip(runs[None], runs["q4"]):
        assert q4[:8] == dense[:8]
