"""What the CPU reports: the flags that choose kernels, and the ones every benchmark prints."""
from pathlib import Path

REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return set(next((line.split(":", 1)[1].split() for line in lines
                     if line.startswith("flags")), []))


def reported_cpu_flags() -> str:
    """The kernel-relevant flags present, for a benchmark's report."""
    flags = cpu_flags()
    return " ".join(f for f in REPORTED_FLAGS if f in flags) or "none of " + " ".join(
        REPORTED_FLAGS)
