"""Quantized KV pages: how a page stores K or V as codes and scales, and their torch twins.

A plain pool is one tensor `[num_pages, page_size, num_kv_heads, head_dim]` in a float dtype.
A quantized pool is a `QuantizedPages`: codes with the same page and slot addressing, plus a
scale (and, asymmetric, a zero point) per token, KV head and group of `group_size` channels.
Every token-head has its own scales, so appending a token never requantizes a page, and a
page's bytes are those of its tokens alone.

| format | codes                              | per group            | x ~                  |
|--------|------------------------------------|----------------------|----------------------|
| fp8    | float8_e4m3fn, one per channel     | bf16 scale           | code * scale         |
| int8   | int8 in [-127, 127]                | bf16 scale           | code * scale         |
| int4   | uint8, two per byte (channel 2i in | bf16 scale and zero  | code * scale + zero  |
|        | the low nibble, 2i+1 in the high)  | point, codes 0..15   |                      |

fp8 and int8 have one group per token-head; int4 groups of 64 channels (the whole head when
`head_dim` is not a multiple of 64). Every format stores keys Hadamard-rotated (queries are
rotated alike). A score's error sums q_c * k_c * rounding_c over the channels, and the queries'
few large channels are the keys' own: unrotated, those channels' rounding dominates (and for
int4 and int8 they set the step of every channel); rotated, both vectors spread over all
channels and the error averages out. SmolLM2, GPL-3's first 4096 tokens, perplexity over bf16
KV: int8 +0.29% unrotated, +0.09% rotated; fp8 +1.28%, +0.47%; int4 keys alone +17%, +8%
(int4 values alone +1.4%). int4, with 16 levels, goes two steps further. Its keys are stored
minus a calibrated offset per channel (engine/kv_offsets.py), which every score ignores. Its
values are stored rotated too: attention's output is a weighted sum of them, rotated back
once. int4 went from +10.4% to +3.1% (keys centred and values rotated; either alone: +5.4%,
+8.1%); on int8 and fp8 neither moved the figure beyond the run-to-run spread (centring values
made int4 worse, rotated or not). At head_dim 64 against bf16's 128 bytes per token-head:
int8 66 bytes (1.94x), int4 36 (3.56x). An int4 key group also tries its min-max range shrunk
about the middle, in 2.5% steps down to 80%, and keeps the range whose codes round it with the
least squared error: clamping one or two extreme channels buys a finer step for the other 62.
Perplexity over bf16 KV, GPL-3's first 8192 tokens, SmolLM2's Q4_1 GGUF: +4.86% -> +4.19%,
and lower under each of six offset calibrations (engine/kv_offsets.py; by 1.4 points on
average); values gained nothing (their rounding averages out in attention's weighted sum) and
keep their min-max range. Scales and zeros are rounded to bf16 before the codes are computed
from them, so the codes absorb that rounding: each value is off by at most half a step (int8,
int4) or fp8's own rounding of `x / scale`, plus, for an int4 key clamped to a shrunk range,
what was cut from its end. bf16 rather than fp16 for the scales: its range is fp32's, and a
bf16 scale times a code is one bf16 rounding, as the model's own K and V are.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch

SCALE_DTYPE = torch.bfloat16
RANGE_STEP = 0.025  # between the ranges an int4 key group tries (`range_ratio`)


@dataclass(frozen=True)
class QuantFormat:
    name: str
    code_dtype: torch.dtype
    qmax: float  # the largest code magnitude (symmetric) or code (asymmetric: codes 0..qmax)
    asymmetric: bool
    group_size: int | None  # channels sharing a scale; None = the whole head
    centers_keys: bool  # keys stored minus per-channel offsets (engine/kv_offsets.py)
    rotates_values: bool  # values stored Hadamard-rotated too (see the module's notes)
    key_range_steps: int = 1  # ranges a key group tries (`quantize`); 1: its min-max range

    @property
    def codes_per_byte(self) -> int:
        return 2 if self.name == "int4" else 1

    def groups(self, head_dim: int) -> int:
        if self.group_size is None or head_dim % self.group_size:
            return 1
        return head_dim // self.group_size

    def token_head_bytes(self, head_dim: int) -> int:
        """Bytes one token-head of K (or of V) takes: codes, scales and zeros."""
        per_group = SCALE_DTYPE.itemsize * (2 if self.asymmetric else 1)
        return head_dim // self.codes_per_byte + self.groups(head_dim) * per_group


FORMATS = {f.name: f for f in (
    QuantFormat("fp8", torch.float8_e4m3fn, 448.0, False, None, centers_keys=False,
                rotates_values=False),
    QuantFormat("int8", torch.int8, 127.0, False, None, centers_keys=False,
                rotates_values=False),
    QuantFormat("int4", torch.uint8, 15.0, True, 64, centers_keys=True, rotates_values=True,
                key_range_steps=9),
)}
_BY_CODE_DTYPE = {f.code_dtype: f for f in FORMATS.values()}


def rotatable(head_dim: int) -> bool:
    """Whether quantized pages hold keys (and int4 values) Hadamard-rotated, queries (and the
    attention's output) rotated alike by the attention layer: a power-of-two head only."""
    return head_dim & (head_dim - 1) == 0


class QuantizedPages(NamedTuple):
    """One layer's K (or V) pool in a quantized format: `codes[P, S, KvH, D / codes_per_byte]`,
    `scales[P, S, KvH, G]` and, asymmetric, `zeros[P, S, KvH, G]` (else None)."""
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None

    @property
    def format(self) -> QuantFormat:
        return _BY_CODE_DTYPE[self.codes.dtype]


def page_size(pool: "torch.Tensor | QuantizedPages") -> int:
    """Tokens per page of a plain or quantized pool."""
    return (pool.codes if isinstance(pool, QuantizedPages) else pool).shape[1]


def allocate(fmt: QuantFormat, lead: tuple[int, ...], head_dim: int,
             device: torch.device | str) -> QuantizedPages:
    """Zeroed pages of `fmt` for token-heads `lead` (`[..., num_pages, page_size, KvH]`)."""
    codes = torch.zeros(*lead, head_dim // fmt.codes_per_byte, dtype=fmt.code_dtype,
                        device=device)
    groups = (*lead, fmt.groups(head_dim))
    scales = torch.zeros(groups, dtype=SCALE_DTYPE, device=device)
    zeros = torch.zeros(groups, dtype=SCALE_DTYPE, device=device) if fmt.asymmetric else None
    return QuantizedPages(codes, scales, zeros)


def quantize(x: torch.Tensor, fmt: QuantFormat, range_steps: int = 1
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`x[..., D]` -> (codes `[..., D / codes_per_byte]`, scales `[..., G]`, zeros or None).

    An asymmetric group takes the one of `range_steps` ranges (`range_ratio`) that rounds it
    with the least squared error; 1 is its min-max range alone."""
    groups = fmt.groups(x.shape[-1])
    xg = x.float().unflatten(-1, (groups, -1))
    if fmt.asymmetric:
        zeros, scales = _least_error_range(xg, fmt.qmax, range_steps)
        xg = xg - zeros.float()[..., None]
    else:
        zeros = None
        scales = (xg.abs().amax(-1) / fmt.qmax).clamp_(min=1e-30).to(SCALE_DTYPE)
    # a bf16 scale can round below amax / qmax: clamp the one code that would overflow
    q = (xg / scales.float()[..., None]).flatten(-2)
    if fmt.name == "fp8":
        codes = q.clamp_(-fmt.qmax, fmt.qmax).to(fmt.code_dtype)
    elif fmt.asymmetric:
        q = q.round_().clamp_(0, fmt.qmax).to(torch.uint8)
        codes = q[..., 0::2] | (q[..., 1::2] << 4)
    else:
        codes = q.round_().clamp_(-fmt.qmax, fmt.qmax).to(fmt.code_dtype)
    return codes, scales, zeros


def range_ratio(step: int) -> float:
    """The fraction of a group's min-max range, about its middle, that range `step` spans."""
    return 1.0 - RANGE_STEP * step


def _least_error_range(xg: torch.Tensor, qmax: float, range_steps: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero points and scales (bf16) of groups `xg[..., G, group_size]`: of the ranges
    `range_ratio(0 .. range_steps - 1)`, each group's with the least squared rounding error
    (the first on a tie). Values outside a shrunk range are clamped to its ends. All ranges
    are tried at once, along a new dimension: a handful of ops, not a handful per range."""
    lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    bottom, top = lo, hi
    if range_steps > 1:  # [..., G, R]; range 0 is [lo, hi] itself, not recomputed from mid
        ratios = torch.tensor([range_ratio(step) for step in range(1, range_steps)],
                              device=xg.device)
        mid = (lo + hi) * 0.5
        bottom = torch.cat([lo, mid - (mid - lo) * ratios], -1)
        top = torch.cat([hi, mid + (hi - mid) * ratios], -1)
    zeros = bottom.to(SCALE_DTYPE)
    scales = ((top - zeros.float()) / qmax).clamp_(min=1e-30).to(SCALE_DTYPE)
    if range_steps > 1:
        z, s = zeros.float()[..., None], scales.float()[..., None]
        x = xg[..., None, :]
        rounded = (x - z).div_(s).round_().clamp_(0, qmax).mul_(s).add_(z)  # in place: 4x faster
        error = rounded.sub_(x).square_().sum(-1)
        best = error.argmin(-1, keepdim=True)
        zeros, scales = zeros.gather(-1, best), scales.gather(-1, best)
    return zeros.squeeze(-1), scales.squeeze(-1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `quantize`, in `dtype`: `[..., D]`, contiguous whatever the views given
    (the codes times the scale rounded to `dtype`, then plus the zero, rounded again).

    Codes are converted into the result, then scaled in place: on CPU a pass over the context
    costs as much as the attention's matmuls over it, and a mixed-dtype multiply (int8 by bf16)
    runs 3x slower than a conversion and a bf16 multiply together."""
    int4 = codes.dtype == torch.uint8
    out = torch.empty(*codes.shape[:-1], codes.shape[-1] * (2 if int4 else 1), dtype=dtype,
                      device=codes.device)
    if int4:  # the low nibble is the even channel
        pairs = out.unflatten(-1, (-1, 2))
        pairs[..., 0].copy_(codes & 0xF)
        pairs[..., 1].copy_(codes >> 4)
    else:
        out.copy_(codes)
    grouped = out.unflatten(-1, (scales.shape[-1], -1))
    grouped.mul_(scales.to(dtype)[..., None])
    if zeros is not None:
        grouped.add_(zeros.to(dtype)[..., None])
    return out

