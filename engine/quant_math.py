"""The arithmetic of `tessera quantize`: SmoothQuant factors, integer quantization (symmetric,
or with zero points) per group of input columns (a group of all K columns = per output channel) with a clipping
search and GPTQ's error compensation, and fp8 per channel. Plain tensors in and out; the
calibration loop (engine/quantize.py) decides what they are applied to.

Symmetric int4 follows compressed-tensors' rule, so a round-to-nearest code is what its
quantizer gives for the same scale: `scale = amax / 7.5`, `q = clamp(round(w / scale), -8, 7)`.
"""
from dataclasses import dataclass

import torch

from kernels.reference import FP8_MAX

# Clip ratios the search tries per group (1.0 = round-to-nearest on the full range). Steps of
# 0.025 rather than 0.05: SmolLM2 w4a16 perplexity 19.58 against 19.67.
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(20))
GPTQ_BLOCK = 128  # columns updated together; a multiple of every group size
GPTQ_DAMPING = 0.01  # of the Hessian's mean diagonal, added to it


@dataclass(frozen=True)
class IntFormat:
    qmin: int
    qmax: int
    half_range: float  # amax / scale at ratio 1 (symmetric)
    # A zero point per group as well: `w = (q - zero) * scale` over the group's [min, max]
    asymmetric: bool = False

    def codes(self, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | float = 0
              ) -> torch.Tensor:
        return ((w / scales).round() + zeros).clamp(self.qmin, self.qmax)

    def params(self, wg: torch.Tensor, ratio: float, scale_dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each row's scale (rounded to `scale_dtype`, as a reader has it) and zero point of
        the group `wg [N, G]`, its range shrunk by `ratio`. Asymmetric: compressed-tensors'
        rule, the range widened to hold 0, `zero = qmin - round(min / scale)`."""
        if not self.asymmetric:
            amax = wg.abs().amax(-1).clamp(min=1e-12)
            return (amax * ratio / self.half_range).to(scale_dtype), None
        lo, hi = wg.amin(-1).clamp(max=0) * ratio, wg.amax(-1).clamp(min=0) * ratio
        scales = ((hi - lo).clamp(min=1e-12) / (self.qmax - self.qmin)).to(scale_dtype)
        zeros = (self.qmin - (lo / scales.float()).round()).clamp(self.qmin, self.qmax)
        return scales, zeros


INT4 = IntFormat(-8, 7, 7.5)
INT4_ASYMMETRIC = IntFormat(-8, 7, 7.5, asymmetric=True)
INT8 = IntFormat(-127, 127, 127.0)


def smooth_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor],
                   alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factor `s = max|X_j|^a / max|W_:j|^(1-a)` over every
    linear reading the activation: `X / s` and `W * s` leave `X W^T` unchanged and move the
    activation outliers' range into the weights (migration strength `alpha`)."""
    w_absmax = torch.cat([w.float() for w in weights]).abs().amax(0)
    s = act_absmax.float().clamp(min=1e-5) ** alpha / w_absmax.clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(min=1e-5)


def fake_int8_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to int8 per row (symmetric, `max |row| / 127`) and scaled back."""
    scale = t.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    return (t / scale).round().clamp(-127, 127) * scale


def smoothing_errors(x: torch.Tensor, weights: list[torch.Tensor],
                     candidates: list[torch.Tensor]) -> list[float]:
    """Output error of W8A8 on calibration inputs `x [M, K]` smoothed by each candidate `s`:
    int8 per token of `x / s` times int8 per channel of each `W * s`, against `x W^T`."""
    references = [x @ w.float().T for w in weights]
    errors = []
    for s in candidates:
        xq = fake_int8_rows(x / s)
        errors.append(sum(float((xq @ fake_int8_rows(w.float() * s).T - ref).square().sum())
                          for w, ref in zip(weights, references)))
    return errors


def fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 per output row: codes `[N, K]`, fp32 scales `[N, 1]` (`amax / 448`)."""
    scale = w.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def group_scales(wg: torch.Tensor, fmt: IntFormat, gram: torch.Tensor | None,
                 scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One group's scale and zero point (None when symmetric) per row (`wg [N, G]`).

    With `gram` (`X_g^T X_g`, `[G, G]`, of calibration activations) each row clips its range to
    the ratio of `CLIP_RATIOS` whose rounding error costs the layer's output least,
    `(w - q) X_g^T X_g (w - q)^T` (AWQ's and OmniQuant's clipping, by search); ratio 1.0 is
    among them, so it is never worse than round-to-nearest there. Without, ratio 1.0."""
    best = best_err = None
    for ratio in CLIP_RATIOS if gram is not None else (1.0,):
        scales, zeros = fmt.params(wg, ratio, scale_dtype)
        if gram is None:
            return scales, zeros
        s, z = scales.float()[:, None], 0 if zeros is None else zeros[:, None]
        d = wg - (fmt.codes(wg, s, z) - z) * s
        err = ((d @ gram) * d).sum(-1)
        if best is None:
            best, best_err = (scales, zeros), err
        else:
            better = err < best_err
            best = tuple(None if b is None else torch.where(better, new, b)
                         for new, b in zip((scales, zeros), best))
            best_err = torch.where(better, err, best_err)
    return best


def quantize_groups(w: torch.Tensor, fmt: IntFormat, group_size: int,
                    hessian: torch.Tensor | None, *, gptq_factor: torch.Tensor | None,
                    clip_search: bool, scale_dtype: torch.dtype,
                    order: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Integer codes `[N, K]` (int8 storage), scales `[N, K / group_size]` and, when `fmt` is
    asymmetric, zero points (int8, alike) of a weight `[N, K]`: a scale per row and group of
    `group_size` input columns (a divisor of `GPTQ_BLOCK`, or K: per output channel).

    With `gptq_factor` (`gptq_factor(hessian)`, `hessian` = `X^T X` of the layer's
    calibration inputs, `[K, K]`) the columns are quantized one by one and each one's rounding
    error is spread over the columns still to come in proportion to the inverse Hessian
    (GPTQ), so the layer's output error, not the weights', is what is minimized. In input
    order, a group's scale is chosen from the weights as updated when the group begins. With
    `order` (act-order: a permutation of the columns, the factor being that of the permuted
    Hessian) every scale is chosen first from the weights as they are, the groups staying the
    columns' own (static groups: the checkpoint needs no group index). `clip_search` searches
    each group's clip ratio (`group_scales`) on the Hessian's diagonal block (needs `hessian`
    too)."""
    w = w.float().clone()
    n, k = w.shape
    codes = torch.empty(n, k)
    scales = torch.empty(n, k // group_size, dtype=scale_dtype)
    zeros = torch.zeros(n, k // group_size)

    def params_at(col: int, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = col // group_size
        gram = hessian[col:col + group_size, col:col + group_size] if clip_search else None
        scales[:, g], zero = group_scales(wg, fmt, gram, scale_dtype)
        if zero is not None:
            zeros[:, g] = zero
        return scales[:, g].float(), zeros[:, g]

    if gptq_factor is None:
        for col in range(0, k, group_size):
            wg = w[:, col:col + group_size]
            s, z = params_at(col, wg)
            codes[:, col:col + group_size] = fmt.codes(wg, s[:, None], z[:, None])
        return _finish(codes, scales, zeros, fmt)
    u = gptq_factor
    static = order is not None or group_size == k
    assert static or GPTQ_BLOCK % group_size == 0
    if static:  # every scale up front; columns then in `order` (or as they are)
        for col in range(0, k, group_size):
            params_at(col, w[:, col:col + group_size])
        column_scales = scales.float().repeat_interleave(group_size, 1)
        column_zeros = zeros.repeat_interleave(group_size, 1)
        if order is not None:
            w, column_scales, column_zeros = (t[:, order] for t in (w, column_scales,
                                                                    column_zeros))
    for b0 in range(0, k, GPTQ_BLOCK):
        b1 = min(b0 + GPTQ_BLOCK, k)
        wb, errors = w[:, b0:b1].clone(), torch.empty(n, b1 - b0)
        for i in range(b1 - b0):
            col = b0 + i
            if static:
                s, z = column_scales[:, col], column_zeros[:, col]
            elif col % group_size == 0:
                s, z = params_at(col, wb[:, i:i + group_size])
            q = fmt.codes(wb[:, i], s, z)
            codes[:, col] = q
            errors[:, i] = (wb[:, i] - (q - z) * s) / u[col, col]
            wb[:, i:] -= errors[:, i:i + 1] * u[col, col:b1]
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    if order is not None:
        codes[:, order] = codes.clone()
    return _finish(codes, scales, zeros, fmt)


def _finish(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, fmt: IntFormat
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    return (codes.to(torch.int8), scales,
            zeros.to(torch.int8) if fmt.asymmetric else None)


def gptq_factor(hessian: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of the damped Hessian's inverse, which GPTQ spreads each
    column's rounding error with; shared by every linear reading the same input. An input
    column no token ever used gets a unit diagonal (its weights' errors go nowhere)."""
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    h.diagonal().add_(GPTQ_DAMPING * h.diagonal().mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()
