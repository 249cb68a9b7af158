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
import re
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
    # q/k norms (stored as 1 + w too), a local rope base; the layer pattern written per layer
    "gemma3": ("Gemma3TextConfig", {"sliding_window": 24, "query_pre_attn_scalar": 16,
                                    "tie_word_embeddings": True,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
}


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
    rope = config["rope_parameters"]
    w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    if experts := config.get("num_local_experts"):
        w.add_expert_count(experts)
        w.add_expert_used_count(config["num_experts_per_tok"])
        if "moe_intermediate_size" in config:  # Mixtral's experts are feed_forward_length wide
            w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if arch.startswith("gemma"):
        w.add_sliding_window(config["sliding_window"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        w.add_final_logit_softcapping(config["final_logit_softcapping"])
    if arch == "gemma3":
        w.add_sliding_window_pattern([t == "sliding_attention" for t in config["layer_types"]])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(config["vocab_size"])])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    # llama.cpp's converter's own map from Hugging Face names to GGUF ones
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    stacks: dict[str, dict[int, torch.Tensor]] = {}  # experts, per layer and projection
    for name, t in state.items():
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            t = t + 1
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            t = permute_rope(t, config["num_attention_heads" if "q_proj" in name
                                       else "num_key_value_heads"])
        if m := re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+\.weight)", name):
            stacks.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = t
            continue
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.float().numpy())
    for name, stack in stacks.items():
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)),
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


# int8 weights and activations move these random models' log-probs by about a tenth of a nat,
# and their top two choices are often closer than that (0.06-0.16 nats apart here); a broken
# expert path puts its tokens several nats below the top.
MARGIN_NATS = 0.5


def test_moe_gguf_serves_with_the_default_quantization(tmp_path):
    """A MoE GGUF under `quantization="auto"` (gguf on CPU) runs its experts in int8, and every
    greedy token is, teacher-forced, within `MARGIN_NATS` of the top choice of transformers
    reading the same file."""
    checkpoint = write_checkpoint(tmp_path / "hf", *FAMILIES["qwen3moe"])
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    path = write_gguf(checkpoint, "qwen3moe", config.to_dict(), tmp_path / "moe.gguf")
    oracle = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, config=config, dtype=torch.float32).eval()
    llm = LLM(model=str(path), tokenizer=str(write_tiny_tokenizer(tmp_path / "tok")),
              dtype="float32", page_size=16, num_kv_pages=32, max_model_len=128,
              enforce_eager=True)
    # Stacked, or one oneDNN-packed weight per expert.
    assert all(w.dtype == torch.int8 for w in llm.engine.runner.model.layers[0].mlp.w2)
    got = llm.generate(prompts(), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for prompt, out in zip(prompts(), got):
        ours = out.outputs[0].token_ids
        with torch.no_grad():
            logits = oracle(torch.tensor([prompt + ours[:-1]])).logits[0, len(prompt) - 1:]
        logprobs = logits.log_softmax(-1)
        chosen = logprobs.gather(1, torch.tensor(ours)[:, None])[:, 0]
        assert (chosen >= logprobs.max(-1).values - MARGIN_NATS).all(), (prompt, ours)
