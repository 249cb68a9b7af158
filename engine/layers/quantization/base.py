"""The seam between a linear layer and its weight format (vLLM's `QuantizeMethodBase`).

A method owns what a weight *is*: the parameters it registers on the layer, how a checkpoint
tensor of its format is loaded into them, what is repacked for a kernel once every shard is in,
the matmul, and the row lookup when the layer is a token embedding (the embedding and a tied
LM head are one `[vocab, hidden]` layer). The layer owns where a shard *goes*
(`Linear.load_rows`: the rows of a fused projection), so a method stays the same whatever the
layer's geometry.

Every parameter carries `weight_loader(param, loaded, shard_id=None)`, which a model's
`load_weights` calls with the whole checkpoint tensor (nano-vllm's shape). The loader, not
the caller, picks the part it keeps: `shard_id` names a fused shard today; a tensor-parallel
layer will narrow `loaded` to its rank's partition of the output or input dimension there, and
a mixture-of-experts layer will take an expert index into its stacked weight the same way.
"""
from dataclasses import dataclass

import torch

import kernels


def register_int4(layer: torch.nn.Module, codes: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor) -> None:
    """The layer's buffers `int4_packed` and `int4_scales_and_zeros` for the CPU's int4 kernel
    (`kernels.pack_int4`, `kernels.int4_linear`). Buffers, not plain attributes: torch.compile
    takes a module's buffers as fixed, where other tensors get symbolic sizes whose guards it
    checks in Python before every call."""
    packed, scales_and_zeros = kernels.pack_int4(codes, scales, zeros)
    layer.register_buffer("int4_packed", packed, persistent=False)
    layer.register_buffer("int4_scales_and_zeros", scales_and_zeros, persistent=False)


@dataclass
class QuantizedTokens:
    """Activations already int8 per token: an RMSNorm fused with the quantizer gives these to
    the linears after it when their method takes them (`LinearMethod.takes_int8_tokens`)."""
    codes: torch.Tensor  # int8 [T, K]
    scales: torch.Tensor  # fp32 [T]
    dtype: torch.dtype  # of the activations they stand for


class LinearMethod:
    name: str  # its `--quantization` name
    # On the Triton path `apply` also takes `QuantizedTokens` (int8 per token), so the RMSNorm
    # before the layer quantizes in its own pass (kernels.rms_norm_quant_int8).
    takes_int8_tokens: bool = False
    # On CPU its kernels, the LM head's included, multiply integer weights (int8, int4) by bf16
    # or int8 activations, so bf16 needs no bf16 matmuls from the CPU ("auto" dtype picks it).
    integer_kernels: bool = False
    # GGML tensor types whose codes this method loads as they are (`read_gguf`); a GGUF layer
    # linear of any other type is refused, and with none every tensor is dequantized to floats.
    gguf_types: tuple[str, ...] = ()

    def read_gguf(self, data, type_name: str):
        """A GGUF layer linear of one of `gguf_types` (raw blocks) as this method's
        `weight_loader` takes it; its `map_rows(fn)` reorders output rows (RoPE layout)."""
        raise NotImplementedError

    def create_weights(self, layer: torch.nn.Module, in_features: int,
                       out_features: int) -> None:
        """Register `layer.weight` (and any other parameters), each with a `weight_loader`."""
        raise NotImplementedError

    def check_supported(self, device: torch.device, dtype: torch.dtype) -> None:
        """Raise `ValueError` if this format cannot run on `device` with activations `dtype`."""

    def dtype_note(self, dtype: torch.dtype) -> str | None:
        """What the start-up log should say when a kernel runs in another dtype than `dtype`."""
        return None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Repack what was loaded for the kernel; called once, after every shard is in."""

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        """`x W^T + bias`."""
        raise NotImplementedError

    def logits(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """fp32 `x W^T` of an LM head (sampling and log-probs read logits in fp32)."""
        return self.apply(layer, x, None).float()

    def embed(self, layer: torch.nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
        """Rows `token_ids` of the weight, in the layer's `params_dtype` (a token embedding)."""
        raise NotImplementedError

    def vocab_method(self) -> "LinearMethod":
        """The method of the token embedding and the LM head (`[vocab, hidden]`)."""
        return self

    def candidates(self, layer: torch.nn.Module) -> dict:
        """The kernels that can run this layer (name -> `x -> x W^T`), of which
        `plan_layer_kernels` picks one per step size into `layer.kernel_plan`; none when the
        method has a single matmul."""
        return {}

    def release_unplanned(self, layer: torch.nn.Module) -> None:
        """Free what no kernel of `layer.kernel_plan` reads; called once the plan is set."""

    def held_bytes(self, layer: torch.nn.Module, names: frozenset[str]) -> float:
        """Bytes per weight that `layer` keeps once `release_unplanned` has freed what a plan
        of the kernels `names` never reads. A plan may hold at most bf16's 2."""
        return 0.0

    def reference(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """fp32 `x W^T` on the dequantized weight, which the candidates are checked against."""
        raise NotImplementedError
