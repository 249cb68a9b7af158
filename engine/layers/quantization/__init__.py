"""Linear methods, one per weight format, and the registry that `--quantization` names.

`engine.config.QUANTIZATIONS` lists the same names without importing torch (the CLI's
choices, with "auto"); tests/test_linear_methods.py holds the two together.
"""
from collections import defaultdict
from functools import partial

from torch import nn

from engine.layers.quantization.base import LinearMethod
from engine.layers.quantization.dense import DenseMethod
from engine.layers.quantization.gguf import GGUFMethod
from engine.layers.quantization.int8 import Int8Method
from engine.layers.quantization.kernel_choice import plan_kernels

QUANTIZATION_METHODS: dict[str, type[LinearMethod]] = {
    m.name: m for m in (DenseMethod, Int8Method, GGUFMethod)}


def resolve_quantization(name: str, model_format: str, device: str) -> str:
    """"auto" is the file's own format where a kernel runs it: a GGUF on CPU is served from its
    codes (`gguf`); everything else is dense."""
    if name != "auto":
        return name
    return "gguf" if model_format == "gguf" and device == "cpu" else "none"


def get_linear_method(name: str) -> LinearMethod:
    """The method `--quantization name` selects (resolved, not "auto")."""
    method = QUANTIZATION_METHODS.get(name)
    if method is None:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}, "
                         f"got {name!r}")
    return method()


def plan_layer_kernels(layers: list[nn.Module]) -> None:
    """Give each loaded layer whose method has `candidates` its `kernel_plan`, measured (or
    read from the cache) once per shape over all the layers of that shape."""
    groups = defaultdict(list)
    for layer in layers:
        if candidates := layer.method.candidates(layer):
            key = (tuple(sorted(candidates)), *layer.weight.shape, layer.params_dtype)
            groups[key].append((layer, candidates))
    for (_, out_features, in_features, dtype), members in groups.items():
        first = members[0][0]
        plans = plan_kernels([c for _, c in members], partial(first.method.reference, first),
                             out_features, in_features, dtype)
        for (layer, _), plan in zip(members, plans):
            layer.kernel_plan = plan
