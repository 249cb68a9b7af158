"""Engine `TokenLogprobs` in OpenAI's two response shapes, and vLLM's `prompt_logprobs`.

Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`; completions:
`{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`; vLLM's
prompt logprobs: `[null, {token_id: {"logprob", "rank", "decoded_token"}}, ...]`. A token's
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
                        logprobs: list[TokenLogprobs | None], text_offset: int, num_top: int
                        ) -> dict:
    """`text_offset` is where the first token's text starts in the choice's whole text. Each
    `top_logprobs` entry holds the token itself, then its `num_top` most likely alternatives
    (vLLM's rule; with 0 just the token). An echoed prompt's first token has null logprobs."""
    tokens = [texts.text(t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": tokens,
            "token_logprobs": [None if lp is None else lp.logprob for lp in logprobs],
            "top_logprobs": [None if lp is None else
                             {token: lp.logprob} | {texts.text(i): v for i, v in lp.top[:num_top]}
                             for token, lp in zip(tokens, logprobs)],
            "text_offset": offsets}


def vllm_prompt_logprobs(texts: TokenTexts, prompt_ids: list[int],
                         logprobs: list[TokenLogprobs], num_top: int) -> list[dict | None]:
    """vLLM's shape: null for the first prompt token, then per token its own entry and those of
    its `num_top` most likely alternatives, keyed by token id."""
    def entry(token_id: int, logprob: float, rank: int) -> dict:
        return {"logprob": logprob, "rank": rank, "decoded_token": texts.text(token_id)}

    out: list[dict | None] = [None]
    for token_id, lp in zip(prompt_ids[1:], logprobs):
        ranked = {token_id: entry(token_id, lp.logprob, lp.rank)}
        for rank, (i, v) in enumerate(lp.top[:num_top], 1):
            ranked.setdefault(i, entry(i, v, rank))
        out.append(ranked)
    return out
