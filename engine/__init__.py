"""Tessera's engine: `from engine import LLM, SamplingParams`."""
from engine.llm import LLM
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
