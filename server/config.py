"""Effective configuration: code defaults < YAML preset (`--config`) < command-line flags.

A preset is a flat YAML mapping whose keys are the `tessera serve` flag names (dashes or
underscores), so every flag can live in a file and the README's flag table documents both.
"""
import argparse
import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace

import yaml

from engine.config import EngineConfig, byte_size
from engine.tokenizer import DEFAULT_MODEL_NAME

logger = logging.getLogger("tessera.server")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = DEFAULT_MODEL_NAME
    log_level: str = "info"
    log_prompts: bool = False
    api_key: str | None = None  # also TESSERA_API_KEY; guards every /v1 route
    allowed_origins: list[str] = field(default_factory=list)  # CORS; empty = no CORS headers


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """Every flag defaults to None so that only flags given on the command line override."""
    add = parser.add_argument
    add("--config", help="YAML preset whose keys are these flag names")
    add("--model", help="GGUF file or HF directory (default: bundled SmolLM2-135M-Instruct)")
    add("--load-format", choices=["auto", "gguf", "hf", "dummy"],
        help="weight format; dummy = random weights from an HF config directory")
    add("--served-model-name", help=f"model name clients send (default {DEFAULT_MODEL_NAME})")
    add("--host", help="bind address (default 127.0.0.1)")
    add("--port", type=int, help="HTTP port (default 8000)")
    add("--device", help="cpu or cuda[:N] (default cpu)")
    add("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
        help="weight and activation dtype (default auto)")
    add("--quantization", choices=["q4"],
        help="q4: run a GGUF's Q4_0/Q4_1 layer weights packed 4-bit for small steps "
             "(CPU, bfloat16; default: dequantize at load)")
    add("--max-model-len", type=int, help="prompt + output token limit (default: the model's)")
    add("--max-num-seqs", type=int, help="most requests in one step (default 64)")
    add("--max-num-batched-tokens", type=int, help="token budget of one step (default 512)")
    add("--page-size", type=int, help="tokens per KV page (default 16)")
    kv = parser.add_mutually_exclusive_group()
    kv.add_argument("--num-kv-pages", type=int, help="KV pages to allocate (wins over memory)")
    kv.add_argument("--kv-cache-memory", type=byte_size,
                    help="KV cache budget in bytes, e.g. 2GiB (default: per-device budget)")
    add("--gpu-memory-utilization", type=float,
        help="CUDA: share of GPU memory for weights, activations and KV pages (default 0.9)")
    add("--enforce-eager", action="store_const", const=True,
        help="CUDA: run decode steps eagerly instead of replaying captured CUDA graphs")
    add("--kv-cache-dtype", help="KV page storage dtype (default auto = model dtype)")
    add("--no-prefix-caching", dest="enable_prefix_caching", action="store_const", const=False,
        help="disable sharing of identical prompt-prefix pages")
    add("--log-level", choices=["debug", "info", "warning", "error"],
        help="logging level (default info)")
    add("--log-prompts", action="store_const", const=True,
        help="include prompt text in per-request log lines")
    add("--api-key", help="require `Authorization: Bearer <key>` on /v1 routes "
        "(default: $TESSERA_API_KEY, else open)")
    add("--allowed-origins", type=_origins,
        help="comma-separated CORS origins, or * for any (default: no CORS)")


def _origins(text: str) -> list[str]:
    return [o.strip() for o in str(text).split(",") if o.strip()]


def _load_yaml(path: str, parser: argparse.ArgumentParser) -> dict:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    known = {a.dest for a in parser._actions} - {"config", "help"}
    out = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest == "no_prefix_caching":
            dest, value = "enable_prefix_caching", not value
        if dest not in known:
            parser.error(f"--config {path}: unknown key {key!r}")
        if dest == "kv_cache_memory" and value is not None:
            value = byte_size(value)
        if dest == "allowed_origins" and isinstance(value, str):
            value = _origins(value)
        out[dest] = value
    return out


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser,
            ) -> tuple[EngineConfig, ServerConfig]:
    """Merge defaults, the preset and the flags into the two config objects."""
    values = _load_yaml(args.config, parser) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    engine = EngineConfig()
    for attr in ("model", "cache", "scheduler"):
        section = getattr(engine, attr)
        try:
            setattr(engine, attr, replace(section, **{
                name: values[name] for name in asdict(section) if name in values}))
        except ValueError as e:
            parser.error(str(e))
    if "device" in values:
        engine.device = values["device"]
    values.setdefault("api_key", os.environ.get("TESSERA_API_KEY") or None)
    server = ServerConfig(**{k: values[k] for k in asdict(ServerConfig()) if k in values})
    return engine, server


def log_effective(engine: EngineConfig, server: ServerConfig) -> None:
    logger.info("effective config: %s", json.dumps(
        {"engine": engine.to_dict(),
         "server": {**asdict(server), "api_key": server.api_key and "<set>"}},
        sort_keys=True))
