"""`response_format` (and forced tool calls) as an engine `StructuredOutput`.

A JSON schema is converted here, in the API process, to an xgrammar EBNF grammar without
optional whitespace: a schema xgrammar cannot handle is a 400 naming the parameter instead of an
aborted request, and small models cannot wander off into newlines and indentation between
tokens (compact JSON is also fewer tokens). The engine compiles (and caches) the grammar.
"""
import json
from functools import lru_cache

from engine.sampling_params import StructuredOutput
from server.errors import APIError
from server.protocol import ResponseFormat


@lru_cache(maxsize=256)
def _schema_grammar(schema_text: str) -> tuple[str | None, str | None]:
    """(EBNF grammar, None), or (None, xgrammar's complaint) for a schema it rejects."""
    import xgrammar

    try:
        grammar = xgrammar.Grammar.from_json_schema(schema_text, any_whitespace=False)
    except Exception as exc:  # xgrammar raises RuntimeError with the converter's message
        return None, (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
    return str(grammar), None


def json_schema_output(schema: dict, param: str) -> StructuredOutput:
    grammar, problem = _schema_grammar(json.dumps(schema))
    if grammar is None:
        raise APIError(f"{param}: unsupported JSON schema: {problem}", param=param)
    return StructuredOutput("grammar", grammar)


def response_format_output(response_format: ResponseFormat | None) -> StructuredOutput | None:
    """`text` (or none) leaves decoding free; `json_object` and `json_schema` constrain it.

    A `json_schema` is enforced whether `strict` is set or not: a mask costs nothing extra.
    """
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutput("json_object")
    if response_format.json_schema is None:
        raise APIError("response_format.json_schema is required for type json_schema",
                       param="response_format.json_schema")
    return json_schema_output(response_format.json_schema.schema_, "response_format")
