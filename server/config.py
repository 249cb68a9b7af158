"""Effective configuration: code defaults < YAML preset (`--config`) < command-line flags.

A preset is a flat YAML mapping whose keys are the `tessera serve` flag names (dashes or
underscores, aliases too), so every flag can live in a file and the README's flag table
documents both. Everything that can be checked without loading the model is checked here,
before the server binds its port: a bad value is argparse's usage error naming the flag.
"""
import argparse
import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from engine.config import KV_CACHE_DTYPES, QUANTIZATIONS, EngineConfig, check_types
from engine.config import byte_size as parse_byte_size
from engine.tokenizer import DEFAULT_MODEL_NAME, model_format, resolve_model_path

logger = logging.getLogger("tessera.server")

_DTYPES = ["auto", "float32", "bfloat16", "float16"]


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = DEFAULT_MODEL_NAME
    log_level: str = "info"
    log_prompts: bool = False
    api_key: str | None = None  # also TESSERA_API_KEY; guards every /v1 route
    allowed_origins: list[str] = field(default_factory=list)  # CORS; empty = no CORS headers
    chat_template: str | None = None  # Jinja text from --chat-template; None = the tokenizer's
    # Admission (server/admission.py): beyond max_num_seqs running, this many engine requests
    # may wait, holding at most this many prompt tokens not yet prefilled; more is a 429.
    # Measured with `tessera bench faults --max-tokens 64` (default model, 2-core Zen 4): 600
    # calls at once gave 192 admitted (64 running + 128 waiting), all answered within 39 s.
    max_waiting_requests: int = 128
    max_queued_prompt_tokens: int = 65536
    max_choices_per_request: int = 128  # prompts x n of one call
    max_engine_restarts: int = 5  # within 10 minutes; one more crash exits 1
    shutdown_timeout: float = 30.0  # seconds a drain waits for calls in flight
    # A 5 MB prompt (about a million tokens, past any model length) still gets its 400 naming
    # the prompt; a body several times that is refused (413) before anyone parses it.
    max_request_body_size: int = 8 * 2**20
    # Disaggregation (server/router.py): 0 and 0 = one colocated engine.
    prefill_engines: int = 0
    decode_engines: int = 0
    cpus_per_engine: int = 0  # cores each engine is pinned to; 0 = every engine uses all
    data_parallel_size: int = 1  # engine replicas behind the router

    def __post_init__(self) -> None:
        check_types(self)
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if self.data_parallel_size > 1 and self.prefill_engines:
            raise ValueError("data_parallel_size must be 1 with --prefill-engines (the "
                             "prefill and decode engines are the replicas there)")
        for name in ("prefill_engines", "decode_engines", "cpus_per_engine"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if (self.prefill_engines == 0) != (self.decode_engines == 0):
            raise ValueError(f"prefill_engines and --decode-engines go together (both 0 for "
                             f"one colocated engine), got {self.prefill_engines} and "
                             f"{self.decode_engines}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be in [1, 65535], got {self.port}")
        for name in ("max_waiting_requests", "max_engine_restarts", "shutdown_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_queued_prompt_tokens", "max_choices_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_request_body_size < 1:
            raise ValueError(f"max_request_body_size must be at least 1 byte, got "
                             f"{self.max_request_body_size}")


def byte_size(text: str) -> int:
    """A size flag: '8GiB', '512MB', '1e9' or a plain count of bytes."""
    try:
        return parse_byte_size(text)
    except (ValueError, OverflowError):  # OverflowError: "inf"
        raise argparse.ArgumentTypeError(
            f"expected a size such as 2GiB, 512MB or 1e9 (bytes), got {text!r}") from None


def origins(text: str) -> list[str]:
    return [o.strip() for o in str(text).split(",") if o.strip()]


def chat_template_file(path: str) -> str:
    """The Jinja text of a template file, parsed once so that a syntax error stops the start."""
    import jinja2

    try:
        text = Path(path).read_text()
        jinja2.Environment().parse(text)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise argparse.ArgumentTypeError(
            f"{path} line {exc.lineno}: not a Jinja template: {exc.message}") from None
    return text


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """Every flag defaults to None so that only flags given on the command line override."""
    add = parser.add_argument
    add("model_tag", nargs="?", metavar="MODEL",
        help="GGUF file or HF directory, as --model (default: bundled SmolLM2-135M-Instruct)")
    add("--config", help="YAML preset whose keys are these flag names")
    add("--model", help="GGUF file or HF directory (default: bundled SmolLM2-135M-Instruct)")
    add("--load-format", choices=["auto", "gguf", "hf", "dummy"],
        help="weight format; dummy = random weights from an HF config directory")
    add("--tokenizer", help="HF tokenizer directory or GGUF file to use instead of the model's")
    add("--chat-template", type=chat_template_file, metavar="FILE",
        help="Jinja chat template file overriding the tokenizer's (chat and /tokenize)")
    add("--served-model-name", help=f"model name clients send (default {DEFAULT_MODEL_NAME})")
    add("--host", help="bind address (default 127.0.0.1)")
    add("--port", type=int, help="HTTP port (default 8000)")
    add("--device", help="cpu, cuda or cuda:N (default cpu)")
    add("--dtype", choices=_DTYPES, help="weight and activation dtype (default auto)")
    add("--quantization", choices=QUANTIZATIONS,
        help="weight format of the linears: auto (default) = a quantized checkpoint's own "
             "scheme, gguf for a GGUF on CPU, else none; none = dense floats; int8 = int8 per "
             "channel (CPU); gguf = a GGUF's 4-bit codes plus int8 (CPU); w4a16, w8a8, fp8 = "
             "a checkpoint quantized so (compressed-tensors, AWQ, GPTQ)")
    add("--seed", type=int,
        help="seed of sampled requests that bring none of their own (default 0)")
    add("--dummy-weights-seed", type=int, help="seed of --load-format dummy weights (default 0)")
    add("--trust-remote-code", action="store_const", const=True,
        help="accepted for vLLM compatibility; no effect (no model code is ever run)")
    add("--max-model-len", type=int, help="prompt + output token limit (default: the model's)")
    add("--max-num-seqs", type=int, help="most requests in one step (default 64)")
    add("--max-num-batched-tokens", type=int, help="token budget of one step (default 512)")
    add("--page-size", "--block-size", type=int, help="tokens per KV page (default 16)")
    kv = parser.add_mutually_exclusive_group()
    kv.add_argument("--num-kv-pages", type=int, help="KV pages to allocate (wins over memory)")
    kv.add_argument("--kv-cache-memory", type=byte_size,
                    help="KV cache budget in bytes, e.g. 2GiB (default: per-device budget)")
    add("--gpu-memory-utilization", type=float,
        help="CUDA: share of GPU memory for weights, activations and KV pages (default 0.9)")
    add("--enforce-eager", action="store_const", const=True,
        help="run decode steps eagerly: CUDA without captured CUDA graphs, CPU without the "
             "torch.compile'd decode steps")
    add("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
        help="KV page format: a float dtype (default auto = the model's) or quantized pages, "
             "fp8 (e4m3), int8 or int4, with a scale per token and KV head")
    add("--kv-policy", metavar="NAME:key=value,...",
        help="KV eviction for requests that name none (kv_policy in the body): none (default) "
             "or streaming:sinks=S,window=W (the first S tokens and the last W)")
    add("--kv-head-config", metavar="FILE",
        help="head-wise KV budgets: a JSON file (from `tessera calibrate heads`) naming the KV "
             "heads that keep only sinks and a window, in a page pool of their own")
    add("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
        help="share pages of identical prompt prefixes (default on)")
    add("--no-prefix-caching", dest="enable_prefix_caching", action="store_const", const=False,
        help="same as --no-enable-prefix-caching")
    add("--log-level", choices=["debug", "info", "warning", "error"],
        help="logging level (default info)")
    add("--log-prompts", action="store_const", const=True,
        help="include prompt text in per-request log lines")
    add("--api-key", help="require `Authorization: Bearer <key>` on /v1 routes "
        "(default: $TESSERA_API_KEY, else open)")
    add("--allowed-origins", type=origins,
        help="comma-separated CORS origins, or * for any (default: no CORS)")
    add("--max-waiting-requests", type=int,
        help="engine requests that may wait beyond --max-num-seqs running; more is a 429 "
             "(default 128)")
    add("--max-queued-prompt-tokens", type=int,
        help="prompt tokens of admitted requests not yet prefilled; more is a 429 "
             "(default 65536)")
    add("--max-choices-per-request", type=int,
        help="most engine requests (prompts x n) one call may start; more is a 400 "
             "(default 128)")
    add("--max-engine-restarts", type=int,
        help="engine-core crashes restarted within 10 minutes before the server exits 1 "
             "(default 5)")
    add("--shutdown-timeout", type=float,
        help="seconds SIGTERM/SIGINT lets requests in flight finish (default 30)")
    add("--max-request-body-size", type=byte_size, metavar="SIZE",
        help="larger request bodies are refused with 413, e.g. 16MiB (default 8MiB)")
    add("--prefill-engines", type=int,
        help="disaggregated serving: engines that compute prompts and hand each request "
             "with its KV pages to a decode engine (default 0 = one colocated engine)")
    add("--decode-engines", type=int,
        help="disaggregated serving: engines that take handed-off requests and decode them "
             "(with --prefill-engines)")
    add("--cpus-per-engine", type=int,
        help="pin each engine to this many cores of its own, in order (default 0 = all)")
    add("--tensor-parallel-size", "-tp", type=int,
        help="split every layer of the model over this many ranks, processes on this host "
             "talking over torch.distributed (gloo on CPU, NCCL with one GPU each on CUDA) "
             "(default 1)")
    add("--data-parallel-size", "-dp", type=int,
        help="engine replicas behind the one API process, balanced by load and prefix "
             "affinity (default 1)")
    add("--distributed-executor-backend", choices=["mp", "ray"],
        help="where replicas and tensor-parallel ranks run: mp = processes on this host "
             "(default); ray = Ray actors in placement groups on the cluster's nodes (pip "
             "install 'tessera[ray]')")
    add("--ray-address",
        help="the Ray cluster to join, e.g. auto or 10.0.0.1:6379 (default: $RAY_ADDRESS, "
             "a cluster started on this machine, else a new local one)")
    add("--collective-timeout", type=float,
        help="seconds a tensor-parallel collective waits for a rank that never joins (a dead "
             "worker) before the engine fails (default 60)")
    add("--kv-transfer-timeout", type=float,
        help="seconds a handed-off request's pages may take to reach the decode engine "
             "(default 10)")
    add("--kv-lease-timeout", type=float,
        help="seconds a prefill engine holds handed-off pages the decode engine has not "
             "confirmed (default 30)")
    add("--kv-load-failure", choices=["recompute", "fail"],
        help="a failed handoff (dead engine, timeout, no free pages on the decode engine): "
             "recompute the request on a live engine (default) or end it with a 503")


def _yaml_value(action: argparse.Action, name: str, value, where: str,
                parser: argparse.ArgumentParser):
    """A preset's value as the flag would give it: switches take true/false, strings go
    through the flag's type, choices are checked."""
    if action.nargs == 0:  # a switch: `no-prefix-caching: true`, `enable-prefix-caching: false`
        if not isinstance(value, bool):  # `"false"` would be truthy
            parser.error(f"{where}: must be true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return bool(value) != name.startswith("no_")
        return action.const if value else not action.const
    if action.type is not None and isinstance(value, str):
        try:
            value = action.type(value)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            parser.error(f"{where}: {exc}")
    if action.choices is not None and value not in action.choices:
        parser.error(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _load_yaml(path: str, parser: argparse.ArgumentParser) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        parser.error(f"argument --config: cannot read {path}: {exc}")
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    flags = {option.lstrip("-").replace("-", "_"): action for action in parser._actions
             for option in action.option_strings if action.dest not in ("config", "help")}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in flags:
            parser.error(f"--config {path}: unknown key {key!r}")
        out[flags[name].dest] = _yaml_value(flags[name], name, value, f"--config {path}: {key}",
                                            parser)
    return out


def _flag_error(parser: argparse.ArgumentParser, exc: ValueError, preset: str | None,
                preset_keys: set[str]) -> None:
    """A config section's `field why` as argparse's `argument --field: why`, saying so when
    the value came from the preset."""
    name, _, why = str(exc).partition(" ")
    where = f" (from --config {preset})" if name in preset_keys else ""
    parser.error(f"argument --{name.replace('_', '-')}{where}: {why}")


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser,
            ) -> tuple[EngineConfig, ServerConfig]:
    """Merge defaults, the preset and the flags into the two config objects, checking ranges."""
    if args.model_tag is not None and args.model not in (None, args.model_tag):
        parser.error(f"the model is given twice: MODEL {args.model_tag} and --model "
                     f"{args.model}")
    values = _load_yaml(args.config, parser) if args.config else {}
    flags = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("config", "model_tag")}
    preset_keys = set(values) - set(flags)
    values.update(flags)
    if args.model_tag is not None:
        values["model"] = args.model_tag
    engine = EngineConfig()
    try:
        for attr in ("model", "cache", "scheduler", "disagg", "parallel"):
            section = getattr(engine, attr)
            setattr(engine, attr, replace(section, **{
                name: values[name] for name in asdict(section) if name in values}))
        engine = replace(engine, device=values.get("device", engine.device))
        values.setdefault("api_key", os.environ.get("TESSERA_API_KEY") or None)
        server = ServerConfig(**{k: values[k] for k in asdict(ServerConfig()) if k in values})
        if engine.parallel.distributed_executor_backend == "ray" and server.prefill_engines:
            raise ValueError("distributed_executor_backend ray places replicas and their "
                             "ranks; prefill and decode engines run as local processes (mp)")
    except ValueError as exc:
        _flag_error(parser, exc, args.config, preset_keys)
    return engine, server


def check_paths(engine: EngineConfig, parser: argparse.ArgumentParser) -> None:
    """The model (and tokenizer) named exist on this machine in a format we load."""
    model = engine.model
    try:
        model_format(resolve_model_path(model.model), model.load_format)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"argument MODEL/--model: {exc}")
    if model.tokenizer is not None and not Path(model.tokenizer).exists():
        parser.error(f"argument --tokenizer: no such file or directory: {model.tokenizer}")


def parse_serve_args(argv: list[str]) -> tuple[EngineConfig, ServerConfig]:
    """`tessera serve`'s flags as checked configs; a usage error exits 2 naming the flag."""
    parser = argparse.ArgumentParser(prog="tessera serve",
                                     description="Start the OpenAI-compatible server.")
    add_serve_flags(parser)
    engine, server = resolve(parser.parse_args(argv), parser)
    check_paths(engine, parser)
    return engine, server


def log_effective(engine: EngineConfig, server: ServerConfig) -> None:
    """The whole effective configuration, for a debug log (the start-up block says the rest)."""
    logger.debug("effective config: %s", json.dumps(
        {"engine": engine.to_dict(),
         "server": {**asdict(server), "api_key": server.api_key and "<set>"}},
        sort_keys=True))
