"""Linear methods, one per weight format, and the registry that `--quantization` names.

`engine.config.QUANTIZATIONS` lists the same names without importing torch (the CLI's
choices, with "auto"); tests/test_linear_methods.py holds the two together.
"""
from collections import defaultdict
from functools import partial

from torch import nn

from engine.layers.quantization.base import LinearMethod
from engine.layers.quantization.checkpoint import METHODS as CHECKPOINT_METHODS
from engine.layers.quantization.dense import DenseMethod
from engine.layers.quantization.fp8 import Fp8Method
from engine.layers.quantization.gguf import GGUFMethod
from engine.layers.quantization.int8 import Int8Method
from engine.layers.quantization.kernel_choice import plan_kernels
from engine.layers.quantization.w4a16 import W4A16Method
from engine.layers.quantization.w8a8 import W8A8Method

QUANTIZATION_METHODS: dict[str, type[LinearMethod]] = {
    m.name: m for m in (DenseMethod, Int8Method, GGUFMethod, W4A16Method, W8A8Method,
                        Fp8Method)}


def resolve_quantization(name: str, model_format: str, device: str,
                         checkpoint_method: str | None = None) -> str:
    """"auto" is the file's own format where a kernel runs it: a quantized checkpoint is
    served as it declares (`checkpoint_method`), a GGUF on CPU from its codes (`gguf`);
    everything else is dense. A quantized checkpoint takes no other method, and its methods
    no other checkpoint."""
    if checkpoint_method is not None:
        if name not in ("auto", checkpoint_method):
            raise ValueError(f"the model is a {checkpoint_method} checkpoint: quantization "
                             f"must be auto or {checkpoint_method}, got {name!r}")
        return checkpoint_method
    if name in CHECKPOINT_METHODS:
        raise ValueError(f"quantization={name!r} serves checkpoints quantized so; this model "
                         f"declares no quantization_config")
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
    read from the cache) once per shape over all the layers of that shape, of kernels that
    hold no more bytes than the weight in bf16, and let the method free what that plan never
    reads."""
    groups = defaultdict(list)
    for layer in layers:
        if candidates := layer.method.candidates(layer):
            key = (tuple(sorted(candidates)), *layer.weight.shape, layer.params_dtype)
            groups[key].append((layer, candidates))
    for (_, out_features, in_features, dtype), members in groups.items():
        first = members[0][0]
        plans = plan_kernels([c for _, c in members], partial(first.method.reference, first),
                             out_features, in_features, dtype,
                             fits=lambda names: first.method.held_bytes(first, names) <= 2)
        for (layer, _), plan in zip(members, plans):
            layer.kernel_plan = plan
            layer.method.release_unplanned(layer)
