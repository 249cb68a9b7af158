"""Weights and architecture from a GGUF file, a Hugging Face directory, or dummy values.

Every source yields `(ModelArch, iterator of (hf_name, tensor))`; tensors use Hugging Face's
Llama names and layout, so the model has one `load_weights` whatever the source.
"""
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.config import ModelConfig
from engine.tokenizer import resolve_model_path


@dataclass
class ModelArch:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": ..., ...}
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArch":
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        if rope and rope.get("rope_type", rope.get("type")) in (None, "default"):
            rope = None
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", (rope or {}).get("rope_theta", 10000.0)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", cfg.get("model_type") == "qwen2"),
            rope_scaling=rope,
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )


Weights = Iterator[tuple[str, torch.Tensor]]


def load(cfg: ModelConfig) -> tuple[ModelArch, Weights]:
    path = resolve_model_path(cfg.model)
    fmt = cfg.load_format
    if fmt == "auto":
        fmt = "gguf" if path.suffix == ".gguf" else "hf"
    if fmt == "gguf":
        return _load_gguf(path)
    config_path = path / "config.json" if path.is_dir() else path
    arch = ModelArch.from_hf_config(json.loads(config_path.read_text()))
    if fmt == "dummy":
        return arch, _dummy_weights(arch, cfg.seed)
    if fmt == "hf":
        return arch, _safetensors_weights(path)
    raise ValueError(f"load_format must be auto, gguf, hf or dummy, got {fmt!r}")


def _safetensors_weights(path: Path) -> Weights:
    from safetensors.torch import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def hf_weight_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    h, d, i = arch.hidden_size, arch.head_dim, arch.intermediate_size
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for n in range(arch.num_layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
        if arch.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
    return shapes


def _dummy_weights(arch: ModelArch, seed: int) -> Weights:
    """Deterministic random weights: norms at 1, the rest N(0, 0.02) from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    for name, shape in hf_weight_shapes(arch).items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape)
        else:
            yield name, torch.randn(shape, generator=gen) * 0.02


_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _load_gguf(path: Path) -> tuple[ModelArch, Weights]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    a = _gguf_field(reader, "general.architecture")
    if a not in ("llama", "qwen2"):
        raise ValueError(f"unsupported GGUF architecture {a!r}")
    heads = _gguf_field(reader, f"{a}.attention.head_count")
    hidden = _gguf_field(reader, f"{a}.embedding_length")
    names = {t.name for t in reader.tensors}
    rope_type = _gguf_field(reader, f"{a}.rope.scaling.type")
    arch = ModelArch(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden, intermediate_size=_gguf_field(reader, f"{a}.feed_forward_length"),
        num_layers=_gguf_field(reader, f"{a}.block_count"), num_heads=heads,
        num_kv_heads=_gguf_field(reader, f"{a}.attention.head_count_kv", heads),
        head_dim=_gguf_field(reader, f"{a}.attention.key_length", hidden // heads),
        rms_norm_eps=_gguf_field(reader, f"{a}.attention.layer_norm_rms_epsilon"),
        rope_theta=_gguf_field(reader, f"{a}.rope.freq_base", 10000.0),
        max_position_embeddings=_gguf_field(reader, f"{a}.context_length"),
        tie_word_embeddings="output.weight" not in names,
        attention_bias=a == "qwen2",
        rope_scaling=None if rope_type in (None, "none") else {
            "rope_type": rope_type, "factor": _gguf_field(reader, f"{a}.rope.scaling.factor")},
        eos_token_ids=[_gguf_field(reader, "tokenizer.ggml.eos_token_id")],
    )

    def weights() -> Weights:
        for t in reader.tensors:
            w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                          dtype=np.float32))
            w = w.reshape(tuple(reversed([int(x) for x in t.shape])))
            if a == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
                n = heads if "attn_q" in t.name else arch.num_kv_heads
                w = _unpermute_rope(w, n)
            yield _hf_name(t.name), w

    return arch, weights()


def _unpermute_rope(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved (GPT-J rope); HF layout keeps the two halves apart."""
    rows = w.shape[0] // num_heads
    return w.reshape(num_heads, rows // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    _, layer, op, kind = gguf_name.split(".")
    return f"model.layers.{layer}.{_GGUF_NAMES[op]}.{kind}"
