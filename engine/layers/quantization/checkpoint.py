"""Quantized checkpoints users bring: the scheme `config.json`'s `quantization_config`
declares, and each format's per-module tensors assembled into one weight per linear.

Formats (what vLLM loads from the same files):
- `compressed-tensors` (llm-compressor, `tessera quantize`): `pack-quantized` int4 groups
  (`weight_packed` int32 `[N, K/8]`, `weight_scale` `[N, K/G]`, `weight_shape`, and
  `weight_zero_point` packed along N when asymmetric) -> `w4a16`; `int-quantized` int8 per
  output channel with dynamic per-token int8 activations -> `w8a8`; `float-quantized` fp8 e4m3
  per channel or tensor -> `fp8` (activations are quantized per token at run time; a static
  `input_scale` is not used).
- AWQ (`quant_method: awq`, GEMM version): `qweight` int32 `[K, N/8]` and `qzeros`
  `[K/G, N/8]` packed along N in the interleaved order `AWQ_PACK_ORDER`, `scales` `[K/G, N]`.
- GPTQ (`quant_method: gptq`): `qweight` int32 `[K/8, N]` packed along K in order, `qzeros`
  `[K/G, N/8]` packed along N in order (v1 stores zero - 1), `scales` `[K/G, N]`, `g_idx` `[K]`
  (act-order: the group of input column k is `g_idx[k]`, not `k // G`).
Every int4 format arrives as `Int4Weight`, the same for all three; a fused layer's shards are
concatenated by the linear method.
"""
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# AutoAWQ packs 8 output columns into an int32 with nibble i holding column AWQ_PACK_ORDER[i].
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
METHODS = ("w4a16", "w8a8", "fp8")


@dataclass
class Int4Weight:
    """`w[n, k] = scales[n, g] * (codes[n, k] - zero_points[n, g])`, `g = k // group_size`,
    codes and zero points in 0..15 (a symmetric checkpoint's zero point is 8). With `perm`
    (GPTQ act-order) the columns were reordered so groups are contiguous: this is the weight
    of the input `x[:, perm]`."""
    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # float32 [N, K / group_size]
    zero_points: torch.Tensor  # uint8 [N, K / group_size]
    group_size: int
    perm: torch.Tensor | None = None  # int64 [K]

    def dequantize(self) -> torch.Tensor:
        """fp32 `[N, K]` in the order of the original input columns."""
        n, k = self.codes.shape
        q = self.codes.float().view(n, -1, self.group_size) - self.zero_points[..., None]
        w = (q * self.scales[..., None]).view(n, k)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    def narrow(self, dim: int, start: int, length: int) -> "Int4Weight":
        """Output rows, or whole groups of input columns (a tensor-parallel rank's share)."""
        if dim == 1 and self.perm is not None:
            raise ValueError("tensor parallelism cannot split the input of an act-order "
                             "(g_idx) GPTQ layer")
        codes, (scales, zeros) = narrow_grouped(self.codes, (self.scales, self.zero_points),
                                                self.group_size, dim, start, length)
        return Int4Weight(codes, scales, zeros, self.group_size, self.perm)

    @classmethod
    def cat(cls, parts: list["Int4Weight"]) -> "Int4Weight":
        """Stacked along N (fused q|k|v or gate|up), which must share group size and order."""
        first = parts[0]
        for p in parts[1:]:
            if p.group_size != first.group_size or (p.perm is None) != (first.perm is None) or (
                    p.perm is not None and not torch.equal(p.perm, first.perm)):
                raise ValueError("the fused shards of a quantized layer have different group "
                                 "sizes or act-order permutations")
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in
                     ("codes", "scales", "zero_points")), first.group_size, first.perm)


def narrow_grouped(codes: torch.Tensor, per_group: tuple[torch.Tensor, ...], group_size: int,
                   dim: int, start: int, length: int) -> tuple[torch.Tensor, tuple]:
    """Codes `[N, K]` and per-group tensors `[N, K / group_size]` cut along `dim`: rows alike,
    columns only in whole groups."""
    if dim == 0:
        return codes.narrow(0, start, length), tuple(t.narrow(0, start, length)
                                                     for t in per_group)
    if start % group_size or length % group_size:
        raise ValueError(f"a tensor-parallel share of {length} input columns cuts the "
                         f"quantization groups of {group_size}")
    return codes.narrow(1, start, length), tuple(
        t.narrow(1, start // group_size, length // group_size) for t in per_group)


@dataclass
class ChannelWeight:
    """int8 or fp8 `codes [N, K]` with one fp32 scale per output row: `w = codes * scales`."""
    codes: torch.Tensor
    scales: torch.Tensor  # float32 [N]

    def narrow(self, dim: int, start: int, length: int) -> "ChannelWeight":
        """Output rows with their scales, or input columns (a tensor-parallel rank's share)."""
        return ChannelWeight(self.codes.narrow(dim, start, length),
                             self.scales.narrow(0, start, length) if dim == 0 else self.scales)


def load_channel_weight(method: str, dtype: torch.dtype, layer, param, loaded,
                        shard_id: int | None) -> None:
    """A `ChannelWeight` of `dtype` codes into a layer's `weight` and `weight_scale` rows."""
    if not (isinstance(loaded, ChannelWeight) and loaded.codes.dtype == dtype):
        raise ValueError(f"quantization={method!r} needs a checkpoint of {dtype} codes; "
                         f"another weight came for a layer of shape {tuple(param.shape)}")
    layer.load_rows(param, loaded.codes, shard_id)
    layer.load_rows(layer.weight_scale, loaded.scales, shard_id)


@dataclass(frozen=True)
class CheckpointScheme:
    method: str  # the linear method that serves it: one of METHODS
    layout: str  # "compressed-tensors", "awq" or "gptq"
    parts: tuple[str, ...]  # the tensors of one quantized module, `<module>.<part>`
    group_size: int | None = None
    zero_minus_one: bool = False  # GPTQ v1 stores each zero point minus one


def checkpoint_scheme(config: dict) -> CheckpointScheme | None:
    """The quantization a model's `config.json` declares (None: floats); a `ValueError` naming
    any scheme Tessera cannot serve."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    kind = qc.get("quant_method")
    if kind == "awq":
        if qc.get("bits", 4) != 4 or qc.get("version", "gemm").lower() != "gemm":
            raise ValueError(f"unsupported AWQ checkpoint: bits={qc.get('bits')} version="
                             f"{qc.get('version')!r} (4-bit GEMM is supported)")
        return CheckpointScheme("w4a16", "awq", ("qweight", "qzeros", "scales"),
                                qc["group_size"])
    if kind == "gptq":
        if qc.get("bits", 4) != 4:
            raise ValueError(f"unsupported GPTQ checkpoint: bits={qc.get('bits')} (4 is "
                             f"supported)")
        fmt = qc.get("checkpoint_format", "gptq")
        return CheckpointScheme("w4a16", "gptq", ("qweight", "qzeros", "scales", "g_idx"),
                                qc["group_size"], zero_minus_one=fmt == "gptq")
    if kind == "compressed-tensors":
        return _compressed_tensors_scheme(qc)
    raise ValueError(f"unsupported quantization_config quant_method {kind!r} (supported: "
                     f"compressed-tensors, awq, gptq)")


def _compressed_tensors_scheme(qc: dict) -> CheckpointScheme:
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ValueError(f"unsupported compressed-tensors checkpoint: {len(groups)} config "
                         f"groups (one scheme for every linear is supported)")
    fmt = qc.get("format")
    w, a = groups[0].get("weights") or {}, groups[0].get("input_activations")
    desc = (f"format={fmt!r} weights={w.get('type')}{w.get('num_bits')}/{w.get('strategy')}"
            f" activations={'none' if a is None else str(a.get('type')) + str(a.get('num_bits'))}")
    if fmt == "pack-quantized" and w.get("type") == "int" and w.get("num_bits") == 4 \
            and w.get("strategy") == "group" and a is None:
        parts = ("weight_packed", "weight_scale", "weight_shape")
        if not w.get("symmetric", True):
            parts += ("weight_zero_point",)
        return CheckpointScheme("w4a16", "compressed-tensors", parts, w["group_size"])
    if fmt == "int-quantized" and w.get("type") == "int" and w.get("num_bits") == 8 \
            and w.get("strategy") == "channel" and w.get("symmetric", True) and a \
            and a.get("type") == "int" and a.get("strategy") == "token" and a.get("dynamic"):
        return CheckpointScheme("w8a8", "compressed-tensors", ("weight", "weight_scale"))
    if fmt == "float-quantized" and w.get("type") == "float" and w.get("num_bits") == 8 \
            and w.get("strategy") in ("channel", "tensor"):
        static = a is not None and not a.get("dynamic", False)
        parts = ("weight", "weight_scale") + (("input_scale",) if static else ())
        return CheckpointScheme("fp8", "compressed-tensors", parts)
    raise ValueError(f"unsupported compressed-tensors scheme ({desc}); supported: W4A16 "
                     f"pack-quantized groups, W8A8 int8 channel + dynamic token, fp8")


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def assemble(weights: Iterator[tuple[str, torch.Tensor]], scheme: CheckpointScheme
             ) -> Iterator[tuple[str, object]]:
    """HF-named checkpoint tensors -> `(module.weight, Int4Weight | ChannelWeight)` once a
    quantized module's parts are all in (in any order, across files); other tensors (norms,
    embeddings, a float LM head) pass through as they are."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        module, _, kind = name.rpartition(".")
        if kind not in scheme.parts or (kind == "weight" and tensor.dtype in _FLOATS):
            yield name, tensor
            continue
        found = pending.setdefault(module, {})
        found[kind] = tensor
        if len(found) == len(scheme.parts):
            del pending[module]
            yield f"{module}.weight", _unpack(found, scheme)
    if pending:
        module, found = next(iter(pending.items()))
        raise ValueError(f"quantized checkpoint: {module} lacks "
                         f"{sorted(set(scheme.parts) - found.keys())}")


def _unpack(t: dict[str, torch.Tensor], scheme: CheckpointScheme) -> object:
    if scheme.layout == "awq":
        return _awq_weight(t, scheme.group_size)
    if scheme.layout == "gptq":
        return _gptq_weight(t, scheme.group_size, scheme.zero_minus_one)
    if scheme.method == "w4a16":
        return _ct_int4_weight(t, scheme.group_size)
    scales = t["weight_scale"].float().flatten()
    n = t["weight"].shape[0]
    return ChannelWeight(t["weight"], scales.expand(n).contiguous() if scales.numel() == 1
                         else scales)


def unpack_nibbles(packed: torch.Tensor, order: tuple[int, ...] = tuple(range(8))
                   ) -> torch.Tensor:
    """int32 `[R, C]` -> uint8 `[R, 8 C]` along the last dimension: value `8 c + order[i]`
    is nibble i (bits 4i..4i+3) of `packed[:, c]`."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed[..., None] >> shifts) & 0xF  # [R, C, 8]: nibble i
    inverse = [order.index(v) for v in range(8)]
    return nibbles[..., inverse].flatten(-2).to(torch.uint8)


def _ct_int4_weight(t: dict, group_size: int) -> Int4Weight:
    n, k = (int(v) for v in t["weight_shape"])
    codes = unpack_nibbles(t["weight_packed"])[:, :k]
    scales = t["weight_scale"].float()
    if "weight_zero_point" in t:  # signed -8..7, packed along N
        zeros = unpack_nibbles(t["weight_zero_point"].t()).t()[:n]
    else:
        zeros = torch.full_like(scales, 8, dtype=torch.uint8)
    return Int4Weight(codes.contiguous(), scales, zeros.contiguous(), group_size)


def _awq_weight(t: dict, group_size: int) -> Int4Weight:
    codes = unpack_nibbles(t["qweight"], AWQ_PACK_ORDER).t()  # [N, K]
    zeros = unpack_nibbles(t["qzeros"], AWQ_PACK_ORDER).t()  # [N, K/G]
    return Int4Weight(codes.contiguous(), t["scales"].float().t().contiguous(),
                      zeros.contiguous(), group_size)


def _gptq_weight(t: dict, group_size: int, zero_minus_one: bool) -> Int4Weight:
    codes = unpack_nibbles(t["qweight"].t())  # [K/8, N] packed along K -> [N, K]
    zeros = unpack_nibbles(t["qzeros"]).t()  # [N, K/G]
    if zero_minus_one:
        zeros = (zeros + 1) & 0xF
    scales = t["scales"].float().t().contiguous()
    g_idx = t["g_idx"].long()
    k = codes.shape[1]
    perm = None
    if not torch.equal(g_idx, torch.arange(k) // group_size):
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], torch.arange(k) // group_size):
            raise ValueError("GPTQ g_idx does not give every group exactly group_size columns")
        codes = codes[:, perm]
    return Int4Weight(codes.contiguous(), scales, zeros.contiguous(), group_size, perm)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes `[R, 8 C]` (0..15) -> int32 `[R, C]`, value `8 c + i` in nibble i of column
    c: `unpack_nibbles`' inverse, compressed-tensors' `weight_packed` layout."""
    nibbles = codes.to(torch.int32).unflatten(-1, (-1, 8))
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=codes.device)
    return (nibbles << shifts).sum(-1, dtype=torch.int32)
