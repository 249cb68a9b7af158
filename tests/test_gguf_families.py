"""GGUFs of the newer families load as llama.cpp writes them: a tiny random checkpoint is
written to GGUF by `gguf.GGUFWriter` with llama.cpp's tensor names and conventions (Gemma's
norms stored as 1 + w, experts stacked per layer), and Tessera's greedy tokens equal those of
transformers reading the same GGUF (`gguf_file=`). Mixtral's GGUFs say `llama` (with experts),
which transformers' GGUF reader builds as a dense Llama: there the oracle reads the checkpoint
the GGUF was written from.

transformers' GGUF config mapping leaves out some fields these files carry (Qwen3's head_dim,
Qwen3-MoE's expert width, Gemma's window pattern), so the oracle gets the config of the
checkpoint the GGUF was written from; its weights all come through its GGUF reader.
"""
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from server.local_server import write_tiny_tokenizer
from tests.test_model_families import MAX_TOKENS, oracle_greedy, prompts, write_checkpoint

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

FAMILIES = {
    "qwen3": ("Qwen3Config", {}),
    # Mixtral: q/k rows permuted as llama.cpp does for `llama`, experts renormalized
    "llama": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    # llama.cpp's qwen3moe renormalizes the top k and has experts in every layer
    "qwen3moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2,
                                    "moe_intermediate_size": 32, "norm_topk_prob": True}),
    # llama.cpp's Gemma ties the LM head to the embedding and scales attention by head_dim
    # (query_pre_attn_scalar) below 27B
    "gemma2": ("Gemma2Config", {"sliding_window": 24, "query_pre_attn_scalar": 16,
                                "tie_word_embeddings": True}),
}
_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
}
_GEMMA_NAMES = _NAMES | {"post_attention_layernorm": "post_attention_norm",
                         "pre_feedforward_layernorm": "ffn_norm",
                         "post_feedforward_layernorm": "post_ffw_norm"}
_EXPERTS = {"gate_proj": "ffn_gate_exps", "w1": "ffn_gate_exps", "up_proj": "ffn_up_exps",
            "w3": "ffn_up_exps", "down_proj": "ffn_down_exps", "w2": "ffn_down_exps"}


def permute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's layout of `llama` q/k rows: each head's two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(
        w.shape)


def write_gguf(checkpoint: Path, arch: str, config: dict, path: Path) -> Path:
    """The checkpoint as llama.cpp's converter would write it, in F32."""
    from safetensors.torch import load_file

    state = load_file(str(checkpoint / "model.safetensors"))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    if experts := config.get("num_local_experts"):
        w.add_expert_count(experts)
        w.add_expert_used_count(config["num_experts_per_tok"])
        if "moe_intermediate_size" in config:  # Mixtral's experts are feed_forward_length wide
            w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if arch == "gemma2":
        w.add_sliding_window(config["sliding_window"])
        w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        w.add_final_logit_softcapping(config["final_logit_softcapping"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(config["vocab_size"])])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    names = _GEMMA_NAMES if arch.startswith("gemma") else _NAMES
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in state.items():
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            t = t + 1
        name = name.replace(".block_sparse_moe.", ".mlp.")
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            t = permute_rope(t, config["num_attention_heads" if "q_proj" in name
                                       else "num_key_value_heads"])
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        elif ".experts." in name:  # model.layers.L.mlp.experts.X.proj.weight
            _, _, layer, _, _, expert, proj, _ = name.split(".")
            experts.setdefault((layer, proj), {})[int(expert)] = t
            continue
        else:
            _, _, layer, *module, kind = name.split(".")
            gguf_name = f"blk.{layer}.{names['.'.join(module)]}.{kind}"
        w.add_tensor(gguf_name, t.float().numpy())
    for (layer, proj), stack in experts.items():
        w.add_tensor(f"blk.{layer}.{_EXPERTS[proj]}.weight",
                     torch.stack([stack[i] for i in sorted(stack)]).float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", FAMILIES)
def test_gguf_of_a_new_family_matches_transformers_reading_it(arch, tmp_path):
    config_class, overrides = FAMILIES[arch]
    checkpoint = write_checkpoint(tmp_path / "hf", config_class, overrides)
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    path = write_gguf(checkpoint, arch, config.to_dict(), tmp_path / f"{arch}.gguf")
    source = dict(pretrained_model_name_or_path=checkpoint) if arch == "llama" else dict(
        pretrained_model_name_or_path=tmp_path, gguf_file=path.name, config=config)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(**source,
                                                               dtype=torch.float32).eval()
    first, *others = prompts()
    want = [oracle_greedy(oracle, p) for p in (first, *others)]

    llm = LLM(model=str(path), tokenizer=str(write_tiny_tokenizer(tmp_path / "tok")),
              dtype="float32", quantization="none", page_size=16, num_kv_pages=32,
              max_model_len=128, max_num_batched_tokens=32, enforce_eager=True)
    got = llm.generate([first, *others],
                       SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in got] == want
