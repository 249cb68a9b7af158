"""The arithmetic behind `tessera bench throughput`'s bound (engine/roofline.py), on CPU.

Byte and FLOP counts of the Llama-3-8B config we ship in configs/llama3-8b, checked against
hand-counted values and against transformers' own module tree (built on the meta device: no
memory, no weights), plus a tiny model whose whole bound is worked out by hand.
"""
import json
from pathlib import Path

import pytest
import torch

from engine.loader import ModelArch
from engine.roofline import (batch_bound, causal_attention_flops, decode_kv_tokens,
                             decode_step_bound_s, kv_bytes_per_token, linear_params,
                             prompt_flops, waves, weight_bytes)

LLAMA3_DIR = Path(__file__).resolve().parent.parent / "configs" / "llama3-8b"
BF16 = 2


@pytest.fixture(scope="module")
def llama3() -> ModelArch:
    return ModelArch.from_hf_config(json.loads((LLAMA3_DIR / "config.json").read_text()))


def tiny() -> ModelArch:
    # linears: q 4x4, k 2x4, v 2x4, o 4x4, gate/up 8x4, down 4x8 = 144; head 10x4 = 40
    return ModelArch(architecture="LlamaForCausalLM", vocab_size=10, hidden_size=4,
                     intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                     head_dim=2, rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=64,
                     tie_word_embeddings=True)


def test_llama3_config_reads_as_llama3_8b(llama3):
    assert (llama3.hidden_size, llama3.num_layers, llama3.num_heads, llama3.num_kv_heads,
            llama3.head_dim, llama3.intermediate_size, llama3.vocab_size) == (
        4096, 32, 32, 8, 128, 14336, 128256)
    assert llama3.rope_theta == 500000.0 and not llama3.tie_word_embeddings
    assert llama3.eos_token_ids == [128001, 128009] and llama3.rope_scaling is None


def test_llama3_weight_bytes(llama3):
    layers, head = linear_params(llama3)
    assert layers == 32 * 218_103_808 == 6_979_321_856
    assert head == 128256 * 4096 == 525_336_576
    assert weight_bytes(llama3, BF16) == 15_009_316_864  # ~15.0e9 bytes of bf16 per step
    # batch-1 weights over ~2.82 TB/s of copy bandwidth: the issue's ~188 tok/s roofline
    assert 1 / decode_step_bound_s(llama3, BF16, [], 2822) == pytest.approx(188, abs=0.5)


def test_llama3_linears_match_transformers(llama3):
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(str(LLAMA3_DIR))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM"
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(w.dtype == torch.bfloat16 for w in linears)
    assert sum(w.numel() for w in linears) == sum(linear_params(llama3))
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248  # "8B"


def test_llama3_kv_and_prompt_flops(llama3):
    assert kv_bytes_per_token(llama3, BF16) == 2 * 32 * 8 * 128 * 2 == 131072
    assert causal_attention_flops(llama3, 512) == 4 * 32 * 32 * 128 * (512 * 513 // 2)
    layers, head = linear_params(llama3)
    assert prompt_flops(llama3, 512) == (2 * layers * 512 + 2 * head
                                         + causal_attention_flops(llama3, 512))


def test_waves_and_kv_tokens():
    assert [waves(512, c) for c in (256, 512, 1024, 255)] == [2, 1, 1, 3]
    assert waves(4, 256) == 1 and waves(10, 0) == 10
    # prompt 4, 3 outputs: the prefill yields token 1; decode steps attend over 5, then 6
    assert decode_kv_tokens(4, 3) == 5 + 6
    assert decode_kv_tokens(4, 1) == 0
    assert decode_kv_tokens(512, 128) == sum(512 + j for j in range(1, 128))


def test_tiny_batch_bound_by_hand():
    arch = tiny()
    assert linear_params(arch) == (144, 40) and weight_bytes(arch, BF16) == 368
    assert kv_bytes_per_token(arch, BF16) == 8
    b = batch_bound(arch, BF16, num_prompts=3, input_len=4, output_len=3, concurrency=2,
                    bandwidth_gb_s=1.0, matmul_tflops=1.0)
    # 2 waves x 2 decode steps of 368 weight bytes; each of 3 sequences reads 5 + 6 KV entries
    assert (b["concurrency"], b["waves"], b["decode_steps"]) == (2, 2, 4)
    assert b["decode_weight_bytes"] == 4 * 368 and b["decode_kv_bytes"] == 3 * 11 * 8
    # per prompt: 2 x 144 x 4 tokens, head on the last token 2 x 40, attention 4 x 2 x 2 x 10
    assert b["prompt_flops"] == 3 * (1152 + 80 + 160)
    assert b["decode_s"] == pytest.approx((4 * 368 + 264) / 1e9)
    assert b["prefill_s"] == pytest.approx(3 * 1392 / 1e12)
    assert b["tok_s"] == pytest.approx(9 / (b["decode_s"] + b["prefill_s"]))


def test_llama3_offline_bound_shape(llama3):
    """512 x 512 -> 128 all at once: one wave of 127 decode steps; more waves only add steps."""
    one = batch_bound(llama3, BF16, 512, 512, 128, 512, bandwidth_gb_s=3000, matmul_tflops=700)
    two = batch_bound(llama3, BF16, 512, 512, 128, 256, bandwidth_gb_s=3000, matmul_tflops=700)
    assert one["decode_steps"] == 127 and two["decode_steps"] == 254
    assert one["decode_kv_bytes"] == two["decode_kv_bytes"] == (
        512 * decode_kv_tokens(512, 128) * 131072)
    assert one["prefill_s"] == two["prefill_s"] and one["tok_s"] > two["tok_s"]
