"""`quantization="q4"`: GGUF 4-bit linears kept packed and run by the int4 CPU kernel."""
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from torch.nn import functional as F

import kernels
from engine import LLM, SamplingParams
from engine.config import ModelConfig
from engine.layers.linear import Linear
from engine.layers.quantization.gguf_q4 import (INT4_MAX_TOKENS, GGUFQ4Method, QuantizedWeight,
                                                unpack_q4)
from engine.loader import load
from engine.tokenizer import resolve_model_path

GGUF_PATH = resolve_model_path(None)  # the bundled SmolLM2-135M-Instruct, Q4_1 linears
TINY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny-llama"
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
    layer = Linear(*reversed(q.codes.shape), method=GGUFQ4Method())
    layer.weight.weight_loader(layer.weight, q)
    layer.method.process_weights_after_loading(layer)
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
        load(ModelConfig(model=str(TINY_CONFIG), load_format="dummy", quantization="q4"))
    with pytest.raises(ValueError, match="quantization must be"):
        load(ModelConfig(quantization="q8"))


def test_q4_greedy_tokens_track_dense_bf16_and_pages_return_to_free():
    """Every q4 greedy token is dense bf16's choice or a near-tie of it, teacher-forced.

    int4 uses bf16 group scales where dense bf16 rounds each weight, so an argmax between two
    almost equal logits can flip, and after a flip the continuations differ by construction.
    So: the first token agrees, and at every position of the q4 run the dense model, fed the
    same history, ranks q4's token within 0.25 nats of its own top choice.
    """
    params = SamplingParams(temperature=0, max_tokens=16)
    dense = LLM(dtype="bfloat16", num_kv_pages=64, max_model_len=256)
    q4 = LLM(dtype="bfloat16", quantization="q4", num_kv_pages=64, max_model_len=256)
    runs = {}
    for name, llm in (("dense", dense), ("q4", q4)):
        runs[name] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
        assert llm.engine.block_manager.num_free_pages == llm.engine.block_manager.num_pages
    for prompt, q4_run, dense_run in zip(PROMPTS, runs["q4"], runs["dense"]):
        assert q4_run[0] == dense_run[0]
        history = dense.tokenizer.encode(prompt)
        probe = SamplingParams(temperature=0, max_tokens=1, logprobs=20)
        for token in q4_run:
            lp = dense.generate([history], probe)[0].outputs[0].logprobs[0]
            ranked = dict(lp.top)
            assert token in ranked and ranked[token] >= lp.top[0][1] - 0.25
            history = history + [token]
