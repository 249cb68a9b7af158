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
(int4 values alone +1.4%). int4, with 16 levels, goes three steps further. Its keys are
stored minus a calibrated offset per channel (engine/kv_calibration.py), which every score
ignores. Its values are stored rotated too: attention's output is a weighted sum of them,
rotated back once. int4 went from +10.4% to +3.1% (keys centred and values rotated; either
alone: +5.4%, +8.1%); on int8 and fp8 neither moved the figure beyond the run-to-run spread
(centring values made int4 worse, rotated or not). And an int4 key group keeps its mean
(`_mean_exact`): its rounding error is orthogonal to the rotated page's all-ones direction,
which a reflection of queries and keys alike makes the direction of the queries' mean, half
of their energy and so most of what a key's rounding did to its scores (engine/kv_calibration.py).
The group tries its range shrunk in 2.5% steps down to 80% and keeps the one of least squared
error: clamping one or two extreme channels buys a finer step for the other 62. Perplexity
over bf16 KV (SmolLM2's Q4_1 GGUF, GPL-3's first 8192 tokens in windows of 1024, chunks of
256, as `tessera bench kv-quality` runs it): +4.46% with min-max key groups searching their
range, +2.53% with mean-keeping ones (+5.5% without the reflection); over 24k tokens of the
other licences in /usr/share/common-licenses, +4.20% and +2.67%. Values keep their min-max
range: a range search, or keeping their mean, gained nothing beyond the run-to-run spread
(their rounding averages out in attention's weighted sum). At head_dim 64 against bf16's 128
bytes per token-head: int8 66 bytes (1.94x), int4 36 (3.56x). Scales are rounded to bf16
before the codes are computed from them, so the codes absorb that rounding: each value is off
by at most half a step (int8, int4) or fp8's own rounding of `x / scale`, plus, for an int4
key clamped to a shrunk range, what was cut from its end, and for an int4 key group's mean,
its zero point's bf16 rounding (an int4 value's zero point is rounded before its codes). bf16
rather than fp16 for the scales: its range is fp32's, and a bf16 scale times a code is one
bf16 rounding, as the model's own K and V are.
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
    calibrates_keys: bool  # keys stored centred and reflected (engine/kv_calibration.py)
    rotates_values: bool  # values stored Hadamard-rotated too (see the module's notes)
    key_range_steps: int = 1  # ranges an asymmetric key group tries (`_mean_exact`)

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
    QuantFormat("fp8", torch.float8_e4m3fn, 448.0, False, None, calibrates_keys=False,
                rotates_values=False),
    QuantFormat("int8", torch.int8, 127.0, False, None, calibrates_keys=False,
                rotates_values=False),
    QuantFormat("int4", torch.uint8, 15.0, True, 64, calibrates_keys=True, rotates_values=True,
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


def quantize(x: torch.Tensor, fmt: QuantFormat, keys: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`x[..., D]` -> (codes `[..., D / codes_per_byte]`, scales `[..., G]`, zeros or None).

    An int4 value group spans its min-max range; an int4 key group is `_mean_exact`."""
    groups = fmt.groups(x.shape[-1])
    xg = x.float().unflatten(-1, (groups, -1))
    if fmt.asymmetric:
        q, scales, zeros = (_mean_exact(xg, fmt.qmax, fmt.key_range_steps) if keys else
                            _min_max(xg, fmt.qmax))
        q = q.flatten(-2).to(torch.uint8)
        return q[..., 0::2] | (q[..., 1::2] << 4), scales, zeros
    scales = (xg.abs().amax(-1) / fmt.qmax).clamp_(min=1e-30).to(SCALE_DTYPE)
    # a bf16 scale can round below amax / qmax: clamp the one code that would overflow
    q = (xg / scales.float()[..., None]).flatten(-2)
    if fmt.name == "fp8":
        codes = q.clamp_(-fmt.qmax, fmt.qmax).to(fmt.code_dtype)
    else:
        codes = q.round_().clamp_(-fmt.qmax, fmt.qmax).to(fmt.code_dtype)
    return codes, scales, None


def range_ratio(step: int) -> float:
    """The fraction of a key group's largest deviation from its mean that range `step` spans."""
    return 1.0 - RANGE_STEP * step


def _min_max(xg: torch.Tensor, qmax: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (as floats), scales and zero points (bf16) of groups `xg[..., G, group_size]`
    spanning each group's min-max range."""
    lo, hi = xg.amin(-1), xg.amax(-1)
    zeros = lo.to(SCALE_DTYPE)
    scales = ((hi - zeros.float()) / qmax).clamp_(min=1e-30).to(SCALE_DTYPE)
    codes = (xg - zeros.float()[..., None]).div_(scales.float()[..., None])
    return codes.round_().clamp_(0, qmax), scales, zeros


def _mean_exact(xg: torch.Tensor, qmax: float, range_steps: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (as floats), scales and zero points (bf16) of groups `xg[..., G, group_size]`
    that keep each group's mean: the group minus its mean is rounded to `qmax + 1` levels
    spaced a scale apart about zero, and the zero point is set after the codes, so that the
    group's dequantized mean is its own (up to the zero's bf16 rounding). The rounding error
    is thus orthogonal to the group's all-ones direction, which is where the attention layer
    puts the direction of the queries' mean (`engine.kv_calibration`).

    The levels span a fraction `range_ratio(0 .. range_steps - 1)` of the group's largest
    deviation from its mean, each group's with the least squared error (the first on a tie).
    All ranges are tried at once, along a new dimension: a handful of ops, not a handful per
    range."""
    mean = xg.mean(-1, keepdim=True)
    centred = xg - mean
    half = qmax / 2
    ratios = torch.tensor([range_ratio(step) for step in range(range_steps)],
                          device=xg.device)
    scales = (centred.abs().amax(-1, keepdim=True) * ratios / half).clamp_(min=1e-30)
    scales = scales.to(SCALE_DTYPE)  # [..., G, R]
    step = scales.float()[..., None]
    codes = (centred[..., None, :] / step).add_(half).round_().clamp_(0, qmax)  # [..., G, R, S]
    best = scales.new_zeros(scales.shape[:-1] + (1,), dtype=torch.int64)
    if range_steps > 1:
        error = (codes - half).mul_(step).sub_(centred[..., None, :])
        error = error.sub_(error.mean(-1, keepdim=True)).square_().sum(-1)
        best = error.argmin(-1, keepdim=True)
    scales = scales.gather(-1, best)
    codes = codes.gather(-2, best[..., None].expand(*best.shape, xg.shape[-1])).squeeze(-2)
    zeros = (mean - scales.float() * codes.mean(-1, keepdim=True)).to(SCALE_DTYPE)
    return codes, scales.squeeze(-1), zeros.squeeze(-1)


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

