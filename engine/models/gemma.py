"""Gemma 2 and Gemma 3 (text), on the Llama family's attention and MLP.

What differs: RMSNorm weights are stored as offsets from 1 (`x * (1 + w)`; 1 is added at
load), a norm after attention and around the MLP as well as before ("sandwich" norms), a GeGLU
MLP (`hidden_act`), embeddings scaled by sqrt(hidden), attention scaled by
`query_pre_attn_scalar`, sliding-window and global layers alternating (`layer_windows`).
Gemma 2 soft-caps attention scores and logits; Gemma 3 instead normalizes q and k per head and
gives its sliding layers their own rope base (`local_rope_theta`). Those `ModelArch` fields are
read by the shared attention and `LlamaForCausalLM`; this file holds what is structural.
"""
import torch
from torch import nn

from engine.layers.quantization import LinearMethod
from engine.loader import ModelArch, Weights
from engine.layers.mlp import GatedMLP
from engine.models.llama import LlamaAttention, LlamaForCausalLM, RMSNorm
from engine.parallel import TensorParallel


class GemmaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, method: LinearMethod, layer: int, tp: TensorParallel):
        super().__init__()
        size, eps = arch.hidden_size, arch.rms_norm_eps
        self.input_layernorm = RMSNorm(size, eps)
        self.self_attn = LlamaAttention(arch, method, layer, tp)
        self.post_attention_layernorm = RMSNorm(size, eps)
        self.pre_feedforward_layernorm = RMSNorm(size, eps)
        self.mlp = GatedMLP(size, arch.intermediate_size, arch.hidden_act, method, tp)
        self.post_feedforward_layernorm = RMSNorm(size, eps)

    def forward(self, x, residual, positions, cos_sin, kv_cache, meta):
        x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(x, positions, cos_sin, kv_cache,
                                                         meta))[0]
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x))[0], residual


class GemmaForCausalLM(LlamaForCausalLM):
    decoder_layer = GemmaDecoderLayer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens.embed(input_ids)
        return x * torch.tensor(self.arch.hidden_size ** 0.5, dtype=x.dtype)

    def load_weights(self, weights: Weights) -> None:
        """Norm weights arrive as offsets from 1."""
        super().load_weights((name, w + 1 if name.endswith("norm.weight") else w)
                             for name, w in weights)
