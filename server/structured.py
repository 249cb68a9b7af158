"""`response_format` (and forced tool calls) as an engine `StructuredOutput`.

A JSON schema is converted here, on behalf of the API process, to an xgrammar EBNF grammar
without free whitespace (exactly one space after each `:` and `,`, none elsewhere): a schema
xgrammar cannot handle is a 400 naming the parameter instead of an aborted request, and small
models cannot wander off into newlines and indentation between tokens. The engine compiles (and
caches) the grammar.

Numbers a schema leaves open are bounded first, as llama.cpp's grammar does: an `integer` to
16 digits, a `number` to magnitudes under 1e15 (which xgrammar writes with at most 6 fraction
digits and no exponent). Unbounded, a small model can run digits until `max_tokens` (a
300-token integer was seen, under LangChain's structured output).

xgrammar imports torch, which the API process must not load (seconds and hundreds of MB), so
the conversion runs in one helper process, started on the first schema and kept (a forkserver
child, so it is not mistaken for an engine-core process).
"""
import json
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import lru_cache
from typing import Any

from engine.logs import native_message
from engine.sampling_params import StructuredOutput
from server.errors import APIError
from server.protocol import ResponseFormat


_converter: ProcessPoolExecutor | None = None
_converter_lock = threading.Lock()


def _convert_schema(schema_text: str) -> tuple[str | None, str | None]:
    """(EBNF grammar, None), or (None, xgrammar's complaint) for a schema it rejects; a
    helper that died is replaced once."""
    global _converter
    for attempt in range(2):
        with _converter_lock:
            if _converter is None:
                _converter = ProcessPoolExecutor(
                    1, mp_context=multiprocessing.get_context("forkserver"))
            converter = _converter
        try:
            return converter.submit(_convert_in_helper, schema_text).result()
        except BrokenProcessPool:
            with _converter_lock:
                if _converter is converter:
                    _converter = None
            if attempt:
                raise


def _convert_in_helper(schema_text: str) -> tuple[str | None, str | None]:
    import xgrammar

    try:
        grammar = xgrammar.Grammar.from_json_schema(schema_text, any_whitespace=False)
    except Exception as exc:  # xgrammar raises RuntimeError with the converter's message
        return None, native_message(exc)
    return str(grammar), None


_cached_schema_grammar = lru_cache(maxsize=256)(_convert_schema)
# Larger schemas are converted on every request: 256 cached ones of a few MB each (a body may
# hold 8 MiB) would keep gigabytes alive.
_CACHED_SCHEMA_CHARS = 2**16


def _schema_grammar(schema_text: str) -> tuple[str | None, str | None]:
    if len(schema_text) > _CACHED_SCHEMA_CHARS:
        return _convert_schema(schema_text)
    return _cached_schema_grammar(schema_text)


_OPEN_BOUNDS = {"integer": 10**16 - 1, "number": 10**15}
_NOT_SCHEMAS = ("const", "enum", "default", "examples")  # keys whose values are data


def bound_open_numbers(schema: Any) -> Any:
    """A copy of `schema` where every integer or number without a bound on a side has one."""
    if isinstance(schema, list):
        return [bound_open_numbers(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _NOT_SCHEMAS else bound_open_numbers(v) for k, v in schema.items()}
    types = out.get("type")  # a str or a list; a dict here is a property named "type"
    types = types if isinstance(types, list) else [types]
    limit = max((_OPEN_BOUNDS[t] for t in types if isinstance(t, str) and t in _OPEN_BOUNDS),
                default=None)
    if limit is not None:
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -limit
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = limit
    return out


def json_schema_output(schema: dict, param: str) -> StructuredOutput:
    grammar, problem = _schema_grammar(json.dumps(bound_open_numbers(schema)))
    if grammar is None:
        raise APIError(f"{param}: unsupported JSON schema: {problem}", param=param)
    return StructuredOutput("grammar", grammar)


def response_format_output(response_format: ResponseFormat | None) -> StructuredOutput | None:
    """`text` (or none) leaves decoding free; `json_object` and `json_schema` constrain it.

    A `json_schema` is enforced whether `strict` is set or not: a mask costs nothing extra.
    """
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":  # OpenAI's contract: an object, not any value
        return json_schema_output({"type": "object"}, "response_format")
    if response_format.json_schema is None:
        raise APIError("response_format.json_schema is required for type json_schema",
                       param="response_format.json_schema")
    return json_schema_output(response_format.json_schema.schema_, "response_format")
