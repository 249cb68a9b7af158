"""The single-stream decode bound: weight bytes over the matvec bandwidth measured right now.

A batch-1 decode step must read every weight once, so no server can beat
`weight bytes / bandwidth` per token; `measure` streams the model's own linear shapes through
`F.linear` with one row (as decode does) on this machine, so the bound and the figure it is
compared with come from the same run.
"""
import time

import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.loader import hf_weight_shapes, load
from engine.model_runner import resolve_dtype


def measure(model: str | None = None, dtype: str = "auto", repeats: int = 5) -> dict:
    """Matvec time per token over the model's matrices (no tied head twice), and its GB/s."""
    arch, _ = load(ModelConfig(model=model))
    torch_dtype = resolve_dtype(dtype, "cpu")
    shapes = [s for name, s in hf_weight_shapes(arch).items() if len(s) == 2
              and name != "model.embed_tokens.weight"]
    shapes.append((arch.vocab_size, arch.hidden_size))  # the LM head reads the embedding
    weights = [torch.randn(s, dtype=torch_dtype) for s in shapes]
    inputs = [torch.randn(1, s[1], dtype=torch_dtype) for s in shapes]
    for w, x in zip(weights, inputs):  # warm-up
        F.linear(x, w)
    start = time.perf_counter()
    for _ in range(repeats):
        for w, x in zip(weights, inputs):
            F.linear(x, w)
    seconds = (time.perf_counter() - start) / repeats
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    return {"dtype": str(torch_dtype).removeprefix("torch."), "weight_bytes": nbytes,
            "matvec_gb_s": nbytes / seconds / 1e9, "tpot_bound_ms": seconds * 1000}
