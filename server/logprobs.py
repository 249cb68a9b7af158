"""Engine `TokenLogprobs` in OpenAI's two response shapes.

Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`; completions:
`{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`. A token's
text is its own bytes (byte-level BPE pieces mapped back), so a character split across tokens
shows as U+FFFD in `token` while `bytes` stays exact.
"""
from functools import lru_cache

from transformers.convert_slow_tokenizer import bytes_to_unicode

from engine.messages import TokenLogprobs

_BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}


class TokenTexts:
    """Per-token bytes and text for one tokenizer (cached: the same ids recur a lot)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is not None and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        return self.tokenizer.decode([token_id]).encode()  # not byte-level, or special

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")


def chat_logprobs(texts: TokenTexts, token_ids: list[int], logprobs: list[TokenLogprobs],
                  ) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        return {"token": texts.text(token_id), "logprob": logprob,
                "bytes": list(texts.bytes(token_id))}

    return {"content": [
        {**entry(t, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
        for t, lp in zip(token_ids, logprobs)]}


def completion_logprobs(texts: TokenTexts, token_ids: list[int],
                        logprobs: list[TokenLogprobs], text_offset: int) -> dict:
    """`text_offset` is where the first token's text starts in the choice's whole text."""
    tokens = [texts.text(t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{texts.text(i): v for i, v in lp.top} for lp in logprobs],
            "text_offset": offsets}
