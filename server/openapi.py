"""`/openapi.json` from the route table: each route's request model as its body, its answer
model for a 200, and OpenAI's error shape for every 4xx and 5xx.

Handlers read their bodies themselves (`api._parse`: our 400s naming the field, not FastAPI's
422s), so FastAPI sees no body parameter to describe; the same pydantic models that validate a
body are declared here instead, so the document cannot drift from what the server accepts.
"""
from collections.abc import Callable
from typing import NamedTuple

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

_REF = "#/components/schemas/{model}"


class Route(NamedTuple):
    """A row of the route table; a route with a `body` model gets it parsed and passed."""
    method: str
    path: str
    handler: Callable
    body: type[BaseModel] | None = None
    answer: type[BaseModel] | None = None  # the JSON of a 200 (streams are SSE text)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, whatever its status (`server/errors.py`)."""
    error: ErrorDetail


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def describe(routes: list[Route]) -> tuple[list[dict], dict[str, dict]]:
    """Each route's OpenAPI operation fields (FastAPI's `openapi_extra`) and the component
    schemas they refer to."""
    models = [(ErrorResponse, "serialization")]
    for route in routes:
        for model, mode in ((route.body, "validation"), (route.answer, "serialization")):
            if model is not None and (model, mode) not in models:
                models.append((model, mode))
    refs, top = models_json_schema(models, ref_template=_REF)
    error = {"description": "OpenAI's error object", **_json(refs[ErrorResponse,
                                                                  "serialization"])}
    operations = []
    for route in routes:
        responses = {"4XX": error, "5XX": error}
        if route.answer is not None:
            ok = _json(refs[route.answer, "serialization"])
            if route.body is not None and "stream" in route.body.model_fields:
                ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
            responses["200"] = {"description": "Successful Response", **ok}
        operation = {"responses": responses}
        if route.body is not None:
            operation["requestBody"] = {"required": True,
                                        **_json(refs[route.body, "validation"])}
        operations.append(operation)
    return operations, top["$defs"]


def install(app: FastAPI, components: dict[str, dict]) -> None:
    """FastAPI's document, with the components that `describe`'s operations refer to."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
