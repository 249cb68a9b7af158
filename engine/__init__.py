"""Tessera's engine: `from engine import LLM, SamplingParams`.

`LLM` is imported on first use: it brings torch, and the API process imports `engine.config`
and the wire messages without it.
"""
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
