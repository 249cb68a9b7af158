"""Structured output: a grammar matcher per constrained request, masking logits each step.

Grammars come from xgrammar (JSON schema, any JSON object, regex, EBNF), compiled once per
spec and cached; the matchers live here, in the engine process, and advance with every token
the request samples.
"""
from functools import lru_cache

import torch

from engine.logs import native_message
from engine.sampling_params import StructuredOutput


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar

        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgrammar.GrammarCompiler(info)
        self.vocab_size = vocab_size
        self.matchers: dict[str, object] = {}

    @lru_cache(maxsize=256)
    def _compile(self, spec: StructuredOutput):
        c = self._compiler
        if spec.kind == "json_schema":
            return c.compile_json_schema(spec.spec)
        if spec.kind == "json_object":
            return c.compile_json_schema('{"type": "object"}')
        if spec.kind == "regex":
            return c.compile_regex(spec.spec)
        return c.compile_grammar(spec.spec)

    def add(self, request_id: str, spec: StructuredOutput) -> None:
        """Start a matcher; raises ValueError when the spec does not compile."""
        try:
            grammar = self._compile(spec)
        except Exception as e:  # xgrammar raises RuntimeError/InvalidJSONError subclasses
            raise ValueError(f"invalid {spec.kind}: {native_message(e)}") from e
        self.matchers[request_id] = self._xgr.GrammarMatcher(grammar)

    def bitmask(self, request_ids: list[str]) -> torch.Tensor | None:
        """Allowed-token bitmask rows for a batch; unconstrained rows allow every token."""
        rows = [(i, self.matchers[r]) for i, r in enumerate(request_ids) if r in self.matchers]
        if not rows:
            return None
        mask = self._xgr.allocate_token_bitmask(len(request_ids), self.vocab_size)
        for i, matcher in rows:
            matcher.fill_next_token_bitmask(mask, i)
        return mask

    def accept(self, request_id: str, token_id: int) -> None:
        matcher = self.matchers.get(request_id)
        if matcher is not None and not matcher.is_terminated():
            matcher.accept_token(token_id)

    def remove(self, request_id: str) -> None:
        self.matchers.pop(request_id, None)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set logits of disallowed tokens to -inf, in place."""
    import xgrammar

    xgrammar.apply_token_bitmask_inplace(logits, bitmask)
