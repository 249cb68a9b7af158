"""Weights and architecture from a GGUF file, a Hugging Face directory, or dummy values.

Every source yields `(ModelArch, iterator of (hf_name, tensor))`; tensors use Hugging Face's
Llama names and layout, so the model has one `load_weights` whatever the source. A GGUF's
layer linears of the types the linear method keeps (`LinearMethod.gguf_types`, e.g. gguf's
Q4_0/Q4_1) come as that method's weight (`QuantizedWeight`: codes and per-group scales)
instead of dense tensors.
"""
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.config import ModelConfig
from engine.layers.quantization import LinearMethod
from engine.layers.quantization.checkpoint import assemble, checkpoint_scheme
from engine.layers.quantization.gguf import QuantizedWeight
from engine.logs import Progress
from engine.tokenizer import model_format, resolve_model_path

logger = logging.getLogger(__name__)

# A progress line at most this often while weights load: the bundled 135M GGUF (15 s to
# dequantize on a busy 2-core VM) shows about seven, a quick load none.
_PROGRESS_INTERVAL_S = 2.0


@dataclass
class ModelArch:
    architecture: str  # config.json's `architectures[0]` (or its model_type), a GGUF's own name
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
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k before rotary
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": ..., ...}
    local_rope_theta: float | None = None  # Gemma 3: the rope base of sliding-window layers
    hidden_act: str = "silu"  # the gated MLP's activation: silu, or gelu_pytorch_tanh (Gemma)
    attn_scale: float | None = None  # None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar)
    attn_softcap: float | None = None  # Gemma 2: scores = cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: the same on the logits
    # Mixture of experts (Mixtral, Qwen3-MoE): which layers' MLPs are experts, how many, each
    # token's top k, the experts' width, and whether the top k's weights are renormalized.
    moe_layers: list[bool] = field(default_factory=list)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    # Per layer: the sliding window of its attention, or None where it attends to everything.
    layer_windows: list[int | None] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_hf_config(cls, cfg: dict, generation_cfg: dict | None = None) -> "ModelArch":
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        local_theta = cfg.get("rope_local_base_freq")
        if "full_attention" in rope:  # per layer type (Gemma 3, as transformers 5 writes it)
            local_theta = rope.get("sliding_attention", {}).get("rope_theta", local_theta)
            rope = rope["full_attention"]
        theta = cfg.get("rope_theta") or rope.get("rope_theta", 10000.0)
        if rope.get("rope_type", rope.get("type")) in (None, "default"):
            rope = None
        pre_attn_scalar = cfg.get("query_pre_attn_scalar")
        experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
        return cls(
            architecture=(cfg.get("architectures") or [cfg.get("model_type", "unknown")])[0],
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", cfg.get("model_type") == "qwen2"),
            qk_norm=cfg.get("model_type") in ("qwen3", "qwen3_moe", "gemma3_text"),
            rope_scaling=rope, local_rope_theta=local_theta,
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act", "silu"),
            attn_scale=pre_attn_scalar ** -0.5 if pre_attn_scalar else None,
            attn_softcap=cfg.get("attn_logit_softcapping"),
            final_softcap=cfg.get("final_logit_softcapping"),
            moe_layers=_moe_layers(cfg, experts), num_experts=experts,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 0) if experts else 0,
            moe_intermediate_size=cfg.get("moe_intermediate_size") or cfg["intermediate_size"],
            norm_topk_prob=cfg.get("norm_topk_prob", True),
            layer_windows=_layer_windows(cfg),
            eos_token_ids=_eos_ids(cfg, generation_cfg or {}),
        )


def _layer_windows(cfg: dict) -> list[int | None]:
    """Each layer's sliding window. `use_sliding_window: false` (Qwen2.5's configs carry a
    `sliding_window` all the same) means none; `layer_types` names the sliding layers where a
    config has it; else Qwen2's `max_window_layers` rule (layers from that index on slide), else
    every layer slides (Mistral, Phi-3)."""
    layers, window = cfg["num_hidden_layers"], cfg.get("sliding_window")
    if window is None or cfg.get("use_sliding_window") is False:
        return [None] * layers
    if types := cfg.get("layer_types"):
        return [window if t == "sliding_attention" else None for t in types]
    if pattern := cfg.get("sliding_window_pattern"):  # Gemma 3: every pattern-th is global
        return [None if (i + 1) % pattern == 0 else window for i in range(layers)]
    first = cfg.get("max_window_layers", 0)
    return [window if i >= first else None for i in range(layers)]


def _moe_layers(cfg: dict, experts: int) -> list[bool]:
    """Which layers' MLPs are experts: all of Mixtral's; Qwen3-MoE's every
    `decoder_sparse_step`-th layer not in `mlp_only_layers`."""
    dense, step = set(cfg.get("mlp_only_layers") or ()), cfg.get("decoder_sparse_step") or 1
    return [experts > 0 and i not in dense and (i + 1) % step == 0
            for i in range(cfg["num_hidden_layers"])]


def _eos_ids(cfg: dict, generation_cfg: dict) -> list[int]:
    """End-of-sequence ids of config.json and generation_config.json together (several
    families stop on more than one: Llama 3's <|eot_id|>, Qwen's <|im_end|>)."""
    ids: list[int] = []
    for eos in (cfg.get("eos_token_id"), generation_cfg.get("eos_token_id")):
        for i in [] if eos is None else [eos] if isinstance(eos, int) else eos:
            if i not in ids:
                ids.append(i)
    return ids


Weights = Iterator[tuple[str, torch.Tensor | QuantizedWeight]]


def load(cfg: ModelConfig, method: LinearMethod, device: torch.device | str = "cpu"
         ) -> tuple[ModelArch, Weights]:
    """The architecture and a stream of HF-named weights (dummy ones are drawn on `device`);
    the stream logs its progress. Layer linears of `method.gguf_types` in a GGUF come as
    their codes."""
    path = resolve_model_path(cfg.model)
    fmt = model_format(path, cfg.load_format)
    if fmt == "gguf":
        arch, weights, total = _load_gguf(path, method)
        return arch, _with_progress(weights, total)
    if method.gguf_types:
        raise ValueError(f"quantization={method.name!r} needs a GGUF model; {path} is loaded "
                         f"as {fmt!r}")
    config_path = path / "config.json" if path.is_dir() else path
    generation_path = config_path.parent / "generation_config.json"
    arch = ModelArch.from_hf_config(
        json.loads(config_path.read_text()),
        json.loads(generation_path.read_text()) if generation_path.exists() else None)
    if fmt == "dummy":
        return arch, _with_progress(_dummy_weights(arch, cfg.dummy_weights_seed, device),
                                    len(hf_weight_shapes(arch)))
    weights, total = _safetensors_weights(path)
    if scheme := checkpoint_scheme(json.loads(config_path.read_text())):
        weights = assemble(weights, scheme)
    return arch, _with_progress(weights, total)


def checkpoint_method(cfg: ModelConfig) -> str | None:
    """The linear method a quantized HF checkpoint declares (`quantization_config`), or None;
    a `ValueError` naming a scheme Tessera cannot serve."""
    path = resolve_model_path(cfg.model)
    if model_format(path, cfg.load_format) != "hf":
        return None
    config_path = path / "config.json" if path.is_dir() else path
    scheme = checkpoint_scheme(json.loads(config_path.read_text()))
    return scheme and scheme.method


def _with_progress(weights: Weights, total: int) -> Weights:
    progress = Progress(total, "tensors", lambda line: logger.info("loading weights: %s", line),
                        _PROGRESS_INTERVAL_S)
    for done, item in enumerate(weights, 1):
        yield item
        progress.update(done)


def _safetensors_weights(path: Path) -> tuple[Weights, int]:
    """The tensors of every *.safetensors file, and how many (read from the headers)."""
    from safetensors.torch import safe_open

    files = sorted(path.glob("*.safetensors"))

    def weights() -> Weights:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)

    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            total += len(st.keys())
    return weights(), total


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
        }
        if arch.moe_layers and arch.moe_layers[n]:
            e = arch.moe_intermediate_size
            shapes[p + "mlp.gate.weight"] = (arch.num_experts, h)
            for x in range(arch.num_experts):
                shapes |= {p + f"mlp.experts.{x}.gate_proj.weight": (e, h),
                           p + f"mlp.experts.{x}.up_proj.weight": (e, h),
                           p + f"mlp.experts.{x}.down_proj.weight": (h, e)}
        else:
            shapes |= {p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)}
        if arch.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
        if arch.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
        if arch.architecture.startswith("Gemma"):  # norms after attention and around the MLP
            shapes |= {p + "pre_feedforward_layernorm.weight": (h,),
                       p + "post_feedforward_layernorm.weight": (h,)}
    return shapes


def _dummy_weights(arch: ModelArch, seed: int, device: torch.device | str) -> Weights:
    """Deterministic random weights: norms at 1, the rest N(0, 0.02) from one seeded generator.

    Drawn on the target device, so an 8B model's 8e9 values take a second on a GPU, not
    minutes on the host. The same seed gives the same weights on the same device model (a
    GPU's random numbers depend on its number of SMs).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, shape in hf_weight_shapes(arch).items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, device=device)
        else:
            yield name, torch.randn(shape, generator=gen, device=device) * 0.02


_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "ffn_gate_inp": "mlp.gate",
}
# Gemma's sandwich: `ffn_norm` is the norm before the MLP, and two more follow the blocks.
_GEMMA_NAMES = _GGUF_NAMES | {
    "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Experts come stacked, `[E, out, in]` each; they are handed over one expert at a time.
_GGUF_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj",
                 "ffn_down_exps": "down_proj"}
_GGUF_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3")
# llama.cpp's conventions where a Gemma GGUF says nothing: every `n`-th layer attends to
# everything and the others slide; Gemma 3's sliding layers use rope base 10000; attention is
# scaled by head_dim, except in the 27B models (known by their depth) by hidden / heads.
_GEMMA_GLOBAL_EVERY = {"gemma2": 2, "gemma3": 6}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_GEMMA3_LOCAL_ROPE_THETA = 10000.0


def _gguf_field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _gguf_arch(reader, a: str) -> ModelArch:
    """A GGUF's architecture from its metadata (`{a}.*` keys) and which tensors it holds."""
    def field(key, default=None):
        return _gguf_field(reader, f"{a}.{key}", default)

    names = {t.name for t in reader.tensors}
    heads, hidden, layers = (field("attention.head_count"), field("embedding_length"),
                             field("block_count"))
    head_dim = field("attention.key_length", hidden // heads)
    rope_type = field("rope.scaling.type")
    experts = field("expert_count", 0)
    window = field("attention.sliding_window")
    windows = [window or None] * layers
    attn_scale = local_theta = None
    gemma = a.startswith("gemma")
    if gemma:
        pattern = field("attention.sliding_window_pattern", _GEMMA_GLOBAL_EVERY[a])
        slides = ([bool(f) for f in pattern] if isinstance(pattern, list) else  # per layer
                  [(i + 1) % pattern != 0 for i in range(layers)])  # every n-th is global
        windows = [window if slide else None for slide in slides]
        attn_scale = (hidden // heads if layers == _GEMMA_27B_LAYERS[a] else head_dim) ** -0.5
        local_theta = _GEMMA3_LOCAL_ROPE_THETA if a == "gemma3" else None
    eos = [_gguf_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
    return ModelArch(
        architecture=a, vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden, intermediate_size=field("feed_forward_length"),
        num_layers=layers, num_heads=heads,
        num_kv_heads=field("attention.head_count_kv", heads), head_dim=head_dim,
        rms_norm_eps=field("attention.layer_norm_rms_epsilon"),
        rope_theta=field("rope.freq_base", 10000.0),
        max_position_embeddings=field("context_length"),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        rope_scaling=None if rope_type in (None, "none") else {
            "rope_type": rope_type, "factor": field("rope.scaling.factor")},
        local_rope_theta=local_theta,
        hidden_act="gelu_pytorch_tanh" if gemma else "silu", attn_scale=attn_scale,
        attn_softcap=field("attn_logit_softcapping"),
        final_softcap=field("final_logit_softcapping"),
        moe_layers=[f"blk.{i}.ffn_gate_inp.weight" in names for i in range(layers)],
        num_experts=experts, num_experts_per_tok=field("expert_used_count", 0),
        moe_intermediate_size=field("expert_feed_forward_length") or field("feed_forward_length"),
        layer_windows=windows, eos_token_ids=list(dict.fromkeys(i for i in eos if i is not None)),
    )


def _load_gguf(path: Path, method: LinearMethod) -> tuple[ModelArch, Weights, int]:
    """Tensors are renamed to Hugging Face's names and layout: llama's q/k rows unpermuted,
    Gemma's norms (stored as 1 + w) back to offsets, stacked experts split."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    a = _gguf_field(reader, "general.architecture")
    if a not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {a!r}; Tessera reads GGUFs of "
                         f"{', '.join(GGUF_ARCHITECTURES)}")
    arch = _gguf_arch(reader, a)
    gemma = a.startswith("gemma")
    linears = [t for t in reader.tensors if t.name.startswith("blk.")
               and t.name.split(".")[2] in _GGUF_LINEARS and t.name.endswith(".weight")]
    keep = {t.name for t in linears if t.tensor_type.name in method.gguf_types}

    def hf_layout(name: str, w):
        if a == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            n = arch.num_heads if "attn_q" in name else arch.num_kv_heads
            return w.map_rows(lambda x: _unpermute_rope(x, n)) if isinstance(
                w, QuantizedWeight) else _unpermute_rope(w, n)
        if gemma and name.endswith("norm.weight"):
            return w - 1
        return w

    def weights() -> Weights:
        for t in reader.tensors:
            if t.name in keep:
                yield _hf_name(t.name, gemma), hf_layout(
                    t.name, method.read_gguf(t.data, t.tensor_type.name))
                continue
            w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                          dtype=np.float32))
            w = hf_layout(t.name, w.reshape(tuple(reversed([int(x) for x in t.shape]))))
            if _is_experts(t.name):
                layer, proj = t.name.split(".")[1], _GGUF_EXPERTS[t.name.split(".")[2]]
                for expert, expert_w in enumerate(w):
                    yield f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight", expert_w
                continue
            yield _hf_name(t.name, gemma), w

    total = sum(arch.num_experts if _is_experts(t.name) else 1 for t in reader.tensors)
    return arch, weights(), total


def _is_experts(gguf_name: str) -> bool:
    parts = gguf_name.split(".")
    return parts[0] == "blk" and len(parts) > 2 and parts[2] in _GGUF_EXPERTS


def _unpermute_rope(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved (GPT-J rope); HF layout keeps the two halves apart."""
    rows = w.shape[0] // num_heads
    return w.reshape(num_heads, rows // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str, gemma: bool) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    names = _GEMMA_NAMES if gemma else _GGUF_NAMES
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in names:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no place in the model as Tessera "
                         f"builds it")
    _, layer, op, kind = parts
    return f"model.layers.{layer}.{names[op]}.{kind}"
