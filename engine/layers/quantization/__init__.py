"""Linear methods, one per weight format, and the registry that `--quantization` names.

`engine.config.QUANTIZATIONS` lists the same names without importing torch (the CLI's
choices); tests/test_linear_methods.py holds the two together.
"""
from engine.layers.quantization.base import LinearMethod
from engine.layers.quantization.dense import DenseMethod
from engine.layers.quantization.gguf_q4 import GGUFQ4Method

QUANTIZATION_METHODS: dict[str, type[LinearMethod]] = {
    m.name: m for m in (DenseMethod, GGUFQ4Method)}


def get_linear_method(name: str | None) -> LinearMethod:
    """The method `--quantization name` selects; None (or "none") is dense floats."""
    method = QUANTIZATION_METHODS.get(name or "none")
    if method is None:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}, "
                         f"got {name!r}")
    return method()
