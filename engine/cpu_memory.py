"""The CPU engine process's resident memory: what one step frees is kept for the next, what
start-up and a finished burst free is handed back, and a library it never runs is never loaded.

glibc serves an allocation over its mmap threshold (128 KiB at first, adapting up to 32 MiB)
with a fresh mmap, and returns freed heap above its trim threshold to the OS. A CPU decode
step at batch 32 allocates tens of MB per layer (gathered KV context, scores) and frees them
again; fresh pages cost a page fault each on first touch, so glibc's defaults spent about half
of a decode attention's time faulting in zeroed pages (SmolLM2, 32 x 2k context, 2 Zen 4
cores: 36 ms per layer with the defaults, 19 ms with both limits raised). The process's
resident memory then stays at its peak instead of breathing with each step. Start-up's own
temporaries (weight repacking, kernel measurements, compiles) are handed back phase by phase,
and a burst's when the engine goes idle.
"""
import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_RETAIN_BELOW = 1 << 30  # allocations below 1 GiB come from, and go back to, the heap


def _glibc_function(name: str):
    """`name` from the C library, or None where it is not glibc's."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):
        return None


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where the C library is
    not glibc (nothing changes)."""
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    ok = (mallopt(_M_MMAP_THRESHOLD, _RETAIN_BELOW) == 1
          and mallopt(_M_TRIM_THRESHOLD, _RETAIN_BELOW) == 1)
    if not ok:
        log.warning("mallopt refused the thresholds; CPU steps keep glibc's defaults")
    return ok


def release_freed_memory() -> None:
    """Return the heap's free pages to the OS. Under the raised trim threshold what a phase
    frees stays resident: start-up calls this after loading and after each compile (their
    temporaries would pile up into its peak: SmolLM2 on Zen 4, 2037 -> 1894 MiB), and an engine
    that goes idle calls it too (a burst of 64 requests left 190 MiB of free heap resident)."""
    trim = _glibc_function("malloc_trim")
    if trim is not None:
        trim(0)


def skip_triton() -> None:
    """Make `import triton` fail in this process; call it before torch is imported. torch
    imports triton wherever it is installed (to learn whether it could compile GPU kernels),
    and triton's LLVM-based library alone kept 66 MiB resident in a CPU engine, which runs no
    Triton kernel (`kernels.uses_triton`) and whose Inductor graphs are C++."""
    sys.modules.setdefault("triton", None)  # None there: the import raises ImportError
