"""The Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Phi-3, SmolLM) over a flat,
unpadded token batch.

The family's variations are `ModelArch` fields: q/k/v biases (Qwen2), RMSNorm over each head
of q and k before rotary (Qwen3), a sliding window on some or all layers (Mistral, Phi-3),
mixture-of-experts MLPs (Mixtral, Qwen3-MoE; engine/layers/moe.py), and Gemma's attention
scale, soft-caps and local rope base (engine/models/gemma.py adds its structure).

q/k/v and gate/up projections are fused into one matmul each; weights arrive with Hugging
Face names and `load_weights` hands each to its parameter's `weight_loader`, naming the fused
shard. Every layer linear has the model's `LinearMethod` (its weight format); the embedding and
the LM head have its `vocab_method`.
"""
import re

import torch
from torch import nn

import kernels
from engine.layers.attention import AttentionMetadata, paged_attention
from engine.layers.linear import Linear, VocabEmbedding
from engine.layers.mlp import GatedMLP
from engine.layers.moe import MoEMLP
from engine.layers.quantization import LinearMethod, plan_layer_kernels
from engine.layers.quantization.base import QuantizedTokens
from engine.layers.rotary import cos_sin_cache
from engine.loader import ModelArch, Weights
from engine.parallel import TensorParallel


class RMSNorm(nn.Module):
    """With `int8_output`, on the Triton path the output is quantized per token in the same
    pass (`QuantizedTokens`), for linears whose method takes it (`takes_int8_tokens`)."""

    def __init__(self, size: int, eps: float, int8_output: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps, self.int8_output = eps, int8_output

    def forward(self, x, residual=None):
        if self.int8_output and kernels.uses_triton(x):
            codes, scales, residual = kernels.rms_norm_quant_int8(x, self.weight, self.eps,
                                                                  residual)
            return QuantizedTokens(codes, scales, x.dtype), residual
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, method: LinearMethod, layer: int,
                 tp: TensorParallel = TensorParallel()):
        super().__init__()
        heads, d = tp.heads(arch), arch.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = heads.num_heads, heads.num_kv_heads, d
        self.q_size = self.num_heads * d
        self.kv_size = self.num_kv_heads * d
        q, kv = tp.head_shards(arch)
        self.qkv_proj = Linear(arch.hidden_size, self.q_size + 2 * self.kv_size,
                               bias=arch.attention_bias, method=method,
                               output_sizes=[self.q_size, self.kv_size, self.kv_size],
                               output_shards=None if tp.size == 1 else [q, kv, kv])
        self.o_proj = Linear(self.q_size, arch.hidden_size, method=method, tp=tp,
                             input_shard=None if tp.size == 1 else q)
        self.q_norm = self.k_norm = None
        if arch.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps)
        self.sliding_window = arch.layer_windows[layer] if arch.layer_windows else None
        self.scale = arch.attn_scale or self.head_dim ** -0.5
        self.softcap = arch.attn_softcap

    def forward(self, x, positions, cos_sin, kv_cache, meta: AttentionMetadata):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q)[0], self.k_norm(k)[0]
        kernels.rotary_embedding(positions, q, k, cos_sin)
        o = paged_attention(q, k, v, kv_cache, meta, self.scale, self.sliding_window,
                            self.softcap)
        return self.o_proj(o.reshape(-1, self.q_size))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, method: LinearMethod, layer: int, tp: TensorParallel):
        super().__init__()
        moe = bool(arch.moe_layers and arch.moe_layers[layer])
        # Each norm feeds one linear (q|k|v; gate|up), which may take its output as int8.
        int8 = method.takes_int8_tokens
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, int8)
        self.self_attn = LlamaAttention(arch, method, layer, tp)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps,
                                                int8 and not moe)  # the router reads floats
        self.mlp = (MoEMLP(arch.hidden_size, arch.moe_intermediate_size, arch.num_experts,
                           arch.num_experts_per_tok, arch.norm_topk_prob, arch.hidden_act,
                           method)
                    if moe else
                    GatedMLP(arch.hidden_size, arch.intermediate_size, arch.hidden_act, method,
                             tp))

    def forward(self, x, residual, positions, cos_sin, kv_cache, meta):
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, cos_sin, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


_EXPERT = re.compile(r"(.*)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                     r"(w1|w3|gate_proj|up_proj|w2|down_proj)\.weight")
_MIXTRAL_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def _parameter_of(name: str) -> tuple[str, int | tuple | None]:
    """The parameter an HF-named tensor loads into, and its shard there: a projection fused
    with others (q|k|v, gate|up), or an expert of a stacked MoE layer (`(expert, part)`)."""
    if m := _EXPERT.fullmatch(name):
        prefix, expert, part = m.groups()
        part = _MIXTRAL_EXPERT_NAMES.get(part, part)
        if part == "down_proj":
            return f"{prefix}.mlp.w2", (int(expert), None)
        return f"{prefix}.mlp.w13", (int(expert), int(part == "up_proj"))
    *prefix, module, kind = name.split(".")
    module, shard = _FUSED.get(module, (module, None))
    return ".".join([*prefix, module, kind]), shard


class LlamaForCausalLM(nn.Module):
    decoder_layer = LlamaDecoderLayer

    def __init__(self, arch: ModelArch, max_positions: int, linear_method: LinearMethod,
                 tp: TensorParallel = TensorParallel()):
        """`tp`: this rank's share of every layer (engine/parallel.py); the whole model by
        default."""
        super().__init__()
        tp.check(arch)
        self.arch, self.tp = arch, tp
        vocab_method = linear_method.vocab_method()
        self.embed_tokens = VocabEmbedding(arch.vocab_size, arch.hidden_size,
                                           method=vocab_method, tp=tp)
        self.layers = nn.ModuleList(self.decoder_layer(arch, linear_method, i, tp)
                                    for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = self.embed_tokens if arch.tie_word_embeddings else Linear(
            arch.hidden_size, arch.vocab_size, method=vocab_method,
            output_shards=None if tp.size == 1 else [tp.split(arch.vocab_size,
                                                                "the vocabulary")])
        # Each layer's rope table (sliding layers may have their own base: Gemma 3). Plain
        # attributes, not buffers: `.to(dtype)` must not round the tables to bf16.
        cos_sin = cos_sin_cache(arch.head_dim, max_positions, arch.rope_theta, arch.rope_scaling)
        local = cos_sin if arch.local_rope_theta is None else cos_sin_cache(
            arch.head_dim, max_positions, arch.local_rope_theta, None)
        windows = arch.layer_windows or [None] * arch.num_layers
        self.layer_cos_sin = [local if window else cos_sin for window in windows]
        self.requires_grad_(False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens.embed(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states `[T, hidden]` after the final norm."""
        x, residual = self.embed(input_ids), None
        for layer, cos_sin, kv_cache in zip(self.layers, self.layer_cos_sin, kv_caches):
            x, residual = layer(x, residual, positions, cos_sin, kv_cache, meta)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits `[rows, vocab]` of the hidden states."""
        logits = self.tp.all_gather(self.lm_head.logits(hidden))  # each rank has a vocab slice
        if (cap := self.arch.final_softcap) is not None:  # Gemma 2
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: Weights) -> None:
        """Hand HF-named tensors to their parameters, q|k|v and gate|up as shards of the fused
        projections, then let each linear method and expert layer repack what it loaded, and
        choose the quantized layers' kernels."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, w in weights:
            name = name.removeprefix("model.").replace(".block_sparse_moe.gate.", ".mlp.gate.")
            if "rotary_emb" in name:
                continue
            name, shard = _parameter_of(name)
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in "
                                 f"{self.arch.architecture} as Tessera builds it")
            param = params[name]
            if hasattr(param, "weight_loader"):
                param.weight_loader(param, w, shard)
            else:
                param.data.copy_(w)
            loaded.add(name if shard is None else f"{name}#{shard}")
        missing = [n for n in params if n not in loaded and not any(
            k.startswith(n + "#") for k in loaded)]
        if missing:
            raise ValueError(f"weights missing from checkpoint: {missing[:5]}")
        del params, param  # so that a weight replaced by its repacked form is freed at once
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        for m in linears:
            m.method.process_weights_after_loading(m)
        plan_layer_kernels(linears)
        for m in self.modules():
            if isinstance(m, MoEMLP):
                m.process_weights_after_loading()
