"""Incremental detokenization and stop strings: the API process runs them per request, and so
does the offline `LLM`, which is why they live in `engine/` (the engine never imports `server/`).

`IncrementalDetokenizer` turns a growing list of token ids into text deltas. It decodes a small
window that starts a few tokens back (`prefix_offset`) so tokenizers that drop a word's leading
space at the start of a decode still get it right, and returns the part of the window past what
was already returned (`read_offset`). A window ending in U+FFFD is an incomplete UTF-8 sequence
split across tokens: it is held back until the next token completes it.

`StopStringChecker` sits on that text: it finds a stop string, trims the text there, and holds
back any tail that could still become a stop string, so a stop string never reaches a stream.
"""
from dataclasses import dataclass

# Prompt tokens that seed the window, so the first output token decodes in context.
_INITIAL_CONTEXT = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.token_ids = list(prompt_token_ids[-_INITIAL_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def add(self, new_token_ids: list[int], finished: bool = False) -> str:
        """Text that `new_token_ids` completes; with `finished`, whatever was held back too."""
        self.token_ids.extend(new_token_ids)
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        window = self._decode(self.token_ids[self.prefix_offset:])
        if (window.endswith("\ufffd") and not finished) or len(window) <= len(prefix):
            return ""
        delta = window[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return delta


@dataclass
class StopMatch:
    text: str  # releasable now
    stopped: bool  # a stop string was found: the request is over


class StopStringChecker:
    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False) -> None:
        self.stop = [s for s in stop if s]
        self.include = include_stop_str_in_output
        self.longest = max((len(s) for s in self.stop), default=0)
        self.pending = ""  # received text not yet released

    def add(self, delta: str, finished: bool = False) -> StopMatch:
        """Release what is safe of `pending + delta`; on a stop string, release up to it."""
        text = self.pending + delta
        # Only a match that ends inside the new delta is new: search from just before it.
        start = max(0, len(self.pending) - self.longest + 1)
        hits = [(i, s) for s in self.stop if (i := text.find(s, start)) != -1]
        if hits:
            index, stop = min(hits)
            self.pending = ""
            return StopMatch(text[: index + len(stop) if self.include else index], True)
        hold = 0 if finished else self._partial_stop_tail(text)
        self.pending = text[len(text) - hold:] if hold else ""
        return StopMatch(text[: len(text) - hold], False)

    def _partial_stop_tail(self, text: str) -> int:
        """Length of the longest end of `text` that is the start of some stop string."""
        for size in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self.stop):
                return size
        return 0
