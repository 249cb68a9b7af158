"""The single source of truth for how an engine is built: one dataclass tree, defaults in code.

YAML presets and CLI flags only override these fields (see `server/config.py`). Each section
checks its own types (from its field annotations, `check_types`) and then its ranges; an error
message starts with the field's name, which the server turns into the flag's
(`max_num_seqs` -> `--max-num-seqs`).
"""
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass

from scheduler.head_config import load_head_config
from scheduler.kv_policy import parse_kv_policy

# The names of `--quantization`: "auto", then one per linear method in
# engine/layers/quantization (whose registry is tested against this list); kept here so
# listing them does not import torch.
QUANTIZATIONS = ("auto", "none", "int8", "gguf", "w4a16", "w8a8", "fp8")
# KV page formats: "auto" is the model's dtype; fp8 (e4m3), int8 and int4 are quantized pages
# (kernels/kv_format.py), refused here when misspelled rather than at start-up in the engine.
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8", "int8", "int4")

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               type(None): "null"}


def _is_instance(value: object, hint: object) -> bool:
    """`isinstance` for the annotations configs use: int, float, str, bool, `X | None`,
    `list[X]`. bool is not an int here (`max_num_seqs: true` is a mistake); an int is a
    float (`gpu_memory_utilization: 1`)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_instance(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_is_instance(v, item) for v in value)
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _type_name(hint: object) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0]).removeprefix('a ')}s"
    return _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def check_types(obj: object) -> None:
    """Each field of the dataclass `obj` holds a value of its annotated type (nested sections
    check themselves); a YAML preset can hold anything, and `"lots" > 0` or a float count would
    otherwise pass or fail far from the key that caused it."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        hint, value = hints[f.name], getattr(obj, f.name)
        if not is_dataclass(hint) and not _is_instance(value, hint):
            raise ValueError(f"{f.name} must be {_type_name(hint)}, got {value!r}")


def _check(obj: object, rules: list[tuple[str, bool, str]]) -> None:
    for name, ok, why in rules:
        if not ok:
            raise ValueError(f"{name} {why}, got {getattr(obj, name)!r}")


def _positive(obj: object, *names: str) -> list[tuple[str, bool, str]]:
    """Rules: each named field is None (unset) or > 0."""
    return [(n, getattr(obj, n) is None or getattr(obj, n) > 0, "must be > 0") for n in names]


def byte_size(text: str) -> int:
    """'8GiB', '512MB', '1e9' or a plain count of bytes (flags and presets)."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    low = str(text).strip().lower()
    suffix = next((s for s in units if low.endswith(s)), "")
    return int(float(low[:len(low) - len(suffix)]) * units.get(suffix, 1))


@dataclass
class ModelConfig:
    model: str | None = None  # GGUF file or HF directory; None = SmolLM2-135M-Instruct
    load_format: str = "auto"  # "auto" | "gguf" | "hf" | "dummy"
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16" | "float16"
    max_model_len: int | None = None  # None = the model's own context length
    # vLLM's --seed: each sampled request without its own seed draws one from a generator
    # seeded with this, so the k-th such request samples alike on every start
    seed: int = 0
    dummy_weights_seed: int = 0
    # the weight format the linears run in (engine/layers/quantization): "none" = dense floats,
    # "int8" = int8 per channel, "gguf" = a GGUF's 4-bit codes plus int8; "auto" = "gguf" for a
    # GGUF on CPU, else "none"
    quantization: str = "auto"
    # Run decode steps eagerly: on CUDA instead of as CUDA graphs, on CPU instead of the
    # torch.compile'd forward for one-request steps (engine/cpu_compile.py).
    enforce_eager: bool = False
    tokenizer: str | None = None  # HF tokenizer directory or GGUF file; None = the model's

    def __post_init__(self) -> None:
        check_types(self)
        _check(self, _positive(self, "max_model_len") + [
            ("quantization", self.quantization in QUANTIZATIONS,
             f"must be one of {', '.join(QUANTIZATIONS)}")])

    @property
    def tokenizer_path(self) -> str | None:
        """Where the tokenizer comes from (None = the bundled model)."""
        return self.tokenizer or self.model


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
    # KV eviction for requests that name none (scheduler/kv_policy.py): "none", or
    # "streaming:sinks=S,window=W"
    kv_policy: str = "none"
    # Head-wise budgets (scheduler/head_config.py): a JSON file naming the KV heads that keep
    # only sinks and a window, in a pool of their own
    kv_head_config: str | None = None

    def __post_init__(self) -> None:
        check_types(self)
        _check(self, _positive(self, "page_size", "num_kv_pages", "kv_cache_memory") + [
            ("gpu_memory_utilization", 0 < self.gpu_memory_utilization <= 1,
             "must be in (0, 1]"),
            ("kv_cache_dtype", self.kv_cache_dtype in KV_CACHE_DTYPES,
             f"must be one of {', '.join(KV_CACHE_DTYPES)}")])
        policy = parse_kv_policy(self.kv_policy)
        if self.kv_head_config is not None:
            load_head_config(self.kv_head_config)
            _check(self, [("kv_policy", policy is None,
                           "must be none with --kv-head-config (one eviction rule at a time)")])


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512

    def __post_init__(self) -> None:
        check_types(self)
        _check(self, _positive(self, "max_num_seqs", "max_num_batched_tokens"))


ROLES = ("colocated", "prefill", "decode")
EXECUTORS = ("mp", "ray")
KV_LOAD_FAILURES = ("recompute", "fail")


@dataclass
class DisaggConfig:
    """An engine's part in a disaggregated deployment (server/router.py)."""
    role: str = "colocated"  # "prefill" hands requests on after their first token
    # A prefill engine frees a handed-off request's pages this long after sending them if the
    # decode engine has not confirmed them by then.
    kv_lease_timeout: float = 30.0
    # The router gives up on a transfer the decode engine has not confirmed by then.
    kv_transfer_timeout: float = 10.0
    # A transfer that fails, or a decode engine without pages for it: the request is recomputed
    # by a decode engine ("recompute") or ends in an error ("fail").
    kv_load_failure: str = "recompute"
    cpu_ids: list[int] = field(default_factory=list)  # cores the engine is pinned to; [] = all

    def __post_init__(self) -> None:
        check_types(self)
        _check(self, _positive(self, "kv_lease_timeout", "kv_transfer_timeout") + [
            ("role", self.role in ROLES, f"must be one of {', '.join(ROLES)}"),
            ("kv_load_failure", self.kv_load_failure in KV_LOAD_FAILURES,
             f"must be one of {', '.join(KV_LOAD_FAILURES)}")])


@dataclass
class ParallelConfig:
    """How one engine spreads its model over devices (engine/executor.py, engine/parallel.py)."""
    # ranks of tensor parallelism: each holds 1/N of every layer; gloo on CPU, NCCL on CUDA
    tensor_parallel_size: int = 1
    # A collective that a rank never joins (it died) fails the step after this many seconds.
    collective_timeout: float = 60.0
    # where replicas (server/placement.py) and ranks (engine/executor.py) run: "mp" =
    # processes on this host, "ray" = Ray actors in placement groups on the cluster's nodes
    distributed_executor_backend: str = "mp"
    ray_address: str | None = None  # a running Ray cluster; None = $RAY_ADDRESS or a new one

    def __post_init__(self) -> None:
        check_types(self)
        _check(self, _positive(self, "tensor_parallel_size", "collective_timeout") + [
            ("distributed_executor_backend", self.distributed_executor_backend in EXECUTORS,
             f"must be one of {', '.join(EXECUTORS)}")])


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = "cpu"
    disagg: DisaggConfig = field(default_factory=DisaggConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        check_types(self)
        _check(self, [("device", re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None,
                       "must be cpu, cuda or cuda:N")])
        if self.parallel.tensor_parallel_size > 1:
            _check(self, [("device", ":" not in self.device,
                           "must be cpu or cuda under tensor parallelism (rank r takes "
                           "cuda:r)")])
            _check(self.disagg, [("role", self.disagg.role == "colocated",
                                  "must be colocated under tensor parallelism (not built yet)")])
        if self.cache.kv_head_config is not None:
            _check(self.parallel, [("tensor_parallel_size",
                                    self.parallel.tensor_parallel_size == 1,
                                    "must be 1 with --kv-head-config (not built yet)")])
            _check(self.disagg, [("role", self.disagg.role == "colocated",
                                  "must be colocated with --kv-head-config (the handoff sends "
                                  "one pool; not built yet)")])

    def to_dict(self) -> dict:
        return asdict(self)
