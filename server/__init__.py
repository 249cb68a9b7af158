"""The API process: OpenAI-compatible HTTP, tokenization, detokenization, CLI and config."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tessera")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "unknown"
