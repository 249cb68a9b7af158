"""The single source of truth for how an engine is built: one dataclass tree, defaults in code.

YAML presets and CLI flags only override these fields (see `server/config.py`).
"""
from dataclasses import asdict, dataclass, field


def byte_size(text: str) -> int:
    """'8GiB', '512MB', '1e9' or a plain count of bytes (flags and presets)."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    low = str(text).strip().lower()
    for suffix, scale in units.items():
        if low.endswith(suffix):
            return int(float(low[: -len(suffix)]) * scale)
    return int(float(low))


@dataclass
class ModelConfig:
    model: str | None = None  # GGUF file or HF directory; None = SmolLM2-135M-Instruct
    load_format: str = "auto"  # "auto" | "gguf" | "hf" | "dummy"
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16" | "float16"
    max_model_len: int | None = None  # None = the model's own context length
    seed: int = 0  # seed of dummy weights
    # "q4": keep a GGUF's Q4_0/Q4_1 layer linears packed 4-bit for few-token steps (CPU, bf16)
    quantization: str | None = None
    enforce_eager: bool = False  # CUDA: run decode steps eagerly instead of as CUDA graphs


@dataclass
class CacheConfig:
    page_size: int = 16
    num_kv_pages: int | None = None  # wins over kv_cache_memory when set
    kv_cache_memory: int | None = None  # bytes; None = a default budget per device
    # CUDA without the two above: the share of the GPU's memory that weights, the peaks of
    # warm-up steps, the CUDA graph pool and the KV pool may take together
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"  # "auto" = the model dtype
    enable_prefix_caching: bool = True

    def __post_init__(self):
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)
