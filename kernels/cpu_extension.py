"""The hand-written CPU kernels (`int_gemv_cpu.cpp`, `decode_attention_cpu.cpp`,
`quantize_rows_cpu.cpp`, `expert_gemm_cpu.cpp`, `rotate_cpu.cpp`), compiled once per machine
and torch version.

They are built with the C++ compiler that Inductor already needs (~20 s), into the caller's
cache directory (`extensions/`) under a name hashing the source, the flags and torch's version,
and loaded as torch ops (`torch.ops.tessera.*`), so compiled graphs call them as they call
aten's. Where torch's CPU capability is below AVX2 (`ATEN_CPU_CAPABILITY` lowers it) or no
compiler is found, `available` is False and callers offer other kernels.
"""
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.utils import cpp_extension

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(name)
            for name in ("int_gemv_cpu.cpp", "decode_attention_cpu.cpp", "quantize_rows_cpu.cpp",
                         "expert_gemm_cpu.cpp", "rotate_cpu.cpp")]
_HEADERS = [Path(__file__).with_name("avx2_vec.h")]
# torch's capabilities that imply AVX2 with FMA (and so F16C): what the source's intrinsics need.
_CAPABILITIES = ("AVX2", "AVX512")
_CXXFLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-mavx2", "-mfma", "-mf16c",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


@functools.cache
def source_digest() -> str:
    """Names one build of the kernels. Inductor's graph cache does not key on what a custom op
    does, so a cache of graphs that call these ops must key on it (cpu_compile)."""
    return hashlib.sha256(b"".join(source.read_bytes() for source in _SOURCES + _HEADERS)
                          + " ".join(_CXXFLAGS).encode()
                          + torch.__version__.encode()).hexdigest()[:16]


def _library_path(cache: Path) -> Path:
    return cache / "extensions" / f"tessera_int_gemv_cpu-{source_digest()}.so"


def _build(target: Path) -> None:
    """Compile to a temporary name, then rename: processes that start together each build
    and the last rename wins, never a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    libdir = Path(torch.__file__).parent / "lib"
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        command = [os.environ.get("CXX", "g++"), *_CXXFLAGS, *includes, *map(str, _SOURCES),
                   "-o", tmp.name, f"-L{libdir}", "-lc10", "-ltorch_cpu"]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True)
            os.replace(tmp.name, target)
        finally:
            Path(tmp.name).unlink(missing_ok=True)


_loaded: bool | None = None  # whether this process loaded the ops, once it tried


def available(cache: Path) -> bool:
    """Whether the ops (`torch.ops.tessera.q4_linear`, `i8_linear`, `decode_attention`,
    `quantize_rows`, `packed_expert_gemm`, `rotate`) are loaded, built into `cache` first if
    need be.
    A process tries once: its later callers get the same answer whatever their `cache`."""
    global _loaded
    if _loaded is None:
        _loaded = _load(cache)
    return _loaded


def _load(cache: Path) -> bool:
    if (torch.backends.cpu.get_cpu_capability() not in _CAPABILITIES
            or shutil.which(os.environ.get("CXX", "g++")) is None):
        return False
    path = _library_path(cache)
    try:
        if not path.exists():
            logger.info("building the CPU integer GEMV kernels into %s", path)
            _build(path)
        torch.ops.load_library(str(path))
    except (OSError, subprocess.CalledProcessError) as error:
        logger.warning("the CPU integer GEMV kernels are unavailable: %s",
                       getattr(error, "stderr", None) or error)
        return False
    torch.library.register_fake("tessera::q4_linear")(_q4_linear_fake)
    torch.library.register_fake("tessera::i8_linear")(_i8_linear_fake)
    torch.library.register_fake("tessera::decode_attention")(_decode_attention_fake)
    torch.library.register_fake("tessera::quantize_rows")(_quantize_rows_fake)
    torch.library.register_fake("tessera::rotate")(_rotate_fake)
    return True


def loaded() -> bool:
    """Whether this process has loaded the ops (`available` said so)."""
    return bool(_loaded)


def _q4_linear_fake(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    return x.new_empty(x.shape[0], blocks.shape[0], dtype=dtype)


def _decode_attention_fake(q: torch.Tensor, *_) -> torch.Tensor:
    return torch.empty_like(q)


def _quantize_rows_fake(x: torch.Tensor, code_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty_like(x, dtype=torch.int8),
            x.new_empty(*x.shape[:-1], 1, dtype=torch.float32))


def _rotate_fake(x: torch.Tensor, block: int) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.float32)


def _i8_linear_fake(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)
