"""The API process: OpenAI-compatible HTTP, tokenization, detokenization, CLI and config."""
