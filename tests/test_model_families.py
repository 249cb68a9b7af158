"""Each supported architecture, as a tiny random checkpoint written by transformers itself, is
token-exact with transformers' greedy output in fp32 through chunked prefill, page
boundaries, a prefix hit and preemption; an unsupported one is refused at start."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.loader import ModelArch
from server.local_server import free_port, write_tiny_tokenizer

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0,
              eos_token_id=1, pad_token_id=0)
WINDOW = 24  # shorter than every prompt: Mistral's window must be applied to match
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral-sliding-window": ("MistralConfig", {"sliding_window": WINDOW}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v biases
    # Qwen2.5's configs carry a window that `use_sliding_window: false` turns off.
    "qwen2.5": ("Qwen2Config", {"sliding_window": WINDOW, "use_sliding_window": False}),
    "qwen3": ("Qwen3Config", {}),  # q/k norms
    "phi3": ("Phi3Config", {}),  # fused qkv_proj and gate_up_proj in the checkpoint
    # Sandwich norms, GeGLU, scaled embeddings; a sliding layer and a global one. Gemma 2
    # soft-caps scores and logits; Gemma 3 has q/k norms and a local rope base.
    "gemma2": ("Gemma2Config", {"sliding_window": WINDOW}),
    "gemma3": ("Gemma3TextConfig", {"sliding_window": WINDOW,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
    # Mixture of experts: top 2 of 4, renormalized (Mixtral) or not (Qwen3-MoE's
    # norm_topk_prob false); Qwen3-MoE's second layer a dense MLP (`mlp_only_layers`).
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3-moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "norm_topk_prob": False,
                                     "mlp_only_layers": [1]}),
}
# Random weights at 10x their initial scale: logits far enough apart that greedy is decisive.
WEIGHT_SCALE = 10.0
MAX_TOKENS = 24


def write_checkpoint(path: Path, config_class: str, overrides: dict) -> Path:
    config = getattr(transformers, config_class)(**(COMMON | overrides))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.mul_(WEIGHT_SCALE)
    model.save_pretrained(path)
    return path


@torch.inference_mode()
def oracle_greedy(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    shared = torch.randint(4, 300, (40,), generator=gen).tolist()
    rest = [torch.randint(4, 300, (n,), generator=gen).tolist() for n in (9, 30, 52, 61)]
    return [shared + rest[0], shared + rest[1], rest[2], rest[3]]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_token_exact_with_transformers(family, tokenizer, tmp_path, caplog):
    config_class, overrides = FAMILIES[family]
    path = write_checkpoint(tmp_path / family, config_class, overrides)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    first, *others = prompts()
    want = [oracle_greedy(oracle, p) for p in (first, *others)]
    if family == "mistral-sliding-window":
        oracle.config.sliding_window = None  # the window must change the answer, or the
        for layer in oracle.model.layers:  # test would pass with the window ignored
            layer.self_attn.sliding_window = None
        assert [oracle_greedy(oracle, p) for p in others] != want[1:]

    # 32-token chunks; 14 pages of 16 hold two of the longer requests, not four. Mistral's
    # requests give back the pages before their window, so it gets fewer.
    llm = LLM(model=str(path), tokenizer=str(tokenizer), dtype="float32", quantization="none",
              page_size=16, num_kv_pages=8 if family == "mistral-sliding-window" else 14,
              max_model_len=128, max_num_batched_tokens=32, enforce_eager=True)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    got = [llm.generate([first], params)[0]]
    with caplog.at_level("WARNING", logger="scheduler.scheduler"):
        got += llm.generate(others, params)
    assert any("preempted request" in r.message for r in caplog.records)
    assert got[1].num_cached_tokens == 32  # the two full pages of the shared 40-token prefix
    assert [o.outputs[0].token_ids for o in got] == want
    bm = llm.engine.block_manager
    assert bm.num_free_pages == bm.num_pages


def test_config_fields_that_change_serving():
    """Stop ids from generation_config.json join config.json's; a window is per layer, and off
    where `use_sliding_window` is false (Qwen2.5) or the layer is a full-attention one."""
    arch = ModelArch.from_hf_config(dict(COMMON, sliding_window=8, use_sliding_window=False),
                                    {"eos_token_id": [1, 7]})
    assert arch.eos_token_ids == [1, 7] and arch.layer_windows == [None, None]
    mixed = dict(COMMON, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    assert ModelArch.from_hf_config(mixed).layer_windows == [8, None]
    qwen2 = dict(COMMON, sliding_window=8, use_sliding_window=True, max_window_layers=1)
    assert ModelArch.from_hf_config(qwen2).layer_windows == [None, 8]


def test_an_unsupported_architecture_is_refused_at_start(tmp_path, tokenizer):
    """One line naming it and what is served, and the server exits non-zero; no KeyError."""
    config = dict(COMMON, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported model architecture 'GPTNeoXForCausalLM'"
                                         r"; Tessera serves LlamaForCausalLM, .*Qwen3"):
        LLM(model=str(tmp_path), load_format="dummy", tokenizer=str(tokenizer),
            enforce_eager=True)
    out = subprocess.run([sys.executable, "-m", "server.cli", "serve", str(tmp_path),
                          "--load-format", "dummy", "--tokenizer", str(tokenizer),
                          "--port", str(free_port())], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert "unsupported model architecture 'GPTNeoXForCausalLM'" in out.stderr + out.stdout
    assert "KeyError" not in out.stderr + out.stdout
