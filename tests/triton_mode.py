"""Which Triton the Triton tests get: the interpreter unless TRITON_INTERPRET=0 was given.

Import this before anything imports triton: `triton.jit` reads the variable when it decorates.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreting() -> bool:
    """Whether `triton.jit` builds interpreted kernels, read as Triton itself reads it."""
    import triton

    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_test_device() -> str:
    """Where the kernel tests run: the interpreter on CPU tensors, compiled kernels on a GPU;
    the module is skipped when neither is possible."""
    import pytest
    import torch

    if interpreting():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("TRITON_INTERPRET=0 runs compiled kernels, which need a CUDA device",
                allow_module_level=True)
