"""One place that turns any exception into OpenAI's error JSON.

Handlers raise; they never format errors themselves. A user's mistake is a 4xx naming the
parameter; only a fault of ours is a 500; a dead or loading engine is a 503.
"""
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Match

logger = logging.getLogger("tessera.server")


class APIError(Exception):
    """`headers` go on the answer (a 405's `Allow`, a 401's `WWW-Authenticate`)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers


class EngineUnavailable(APIError):
    def __init__(self, message: str) -> None:
        super().__init__(message, status=503)


_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "service_unavailable_error"}


def error_body(exc: APIError) -> dict:
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param,
                      "code": exc.code}}


def from_validation_error(exc: ValidationError) -> APIError:
    """A pydantic error on the request body: 400 listing every offending field (a client
    fixes them all at once), `param` the first."""
    problems = [(".".join(str(part) for part in e["loc"]) or None, e["msg"])
                for e in exc.errors()]
    message = "; ".join(f"{param or 'body'}: {msg}" for param, msg in problems)
    return APIError(message, param=problems[0][0])


def to_api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        return from_validation_error(exc)
    if isinstance(exc, HTTPException):
        return APIError(str(exc.detail), status=exc.status_code, headers=exc.headers)
    logger.exception("internal error", exc_info=exc)
    return APIError(f"internal error: {type(exc).__name__}", status=500)


def method_not_allowed(request: Request) -> APIError:
    """A 405 whose `Allow` lists the methods of every route on the path: starlette's names
    only the first route's, and `/ping` is two routes (GET and POST)."""
    allowed = sorted({method for route in request.app.router.routes
                      if route.matches(request.scope)[0] != Match.NONE
                      for method in getattr(route, "methods", None) or ()})
    return APIError(f"{request.method} is not allowed on {request.url.path}; allowed: "
                    f"{', '.join(allowed)}", status=405, headers={"Allow": ", ".join(allowed)})


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, HTTPException) and exc.status_code == 405:
        exc = method_not_allowed(request)
    error = to_api_error(exc)
    return JSONResponse(error_body(error), status_code=error.status, headers=error.headers)


def install(app: FastAPI) -> None:
    """Expected errors answer quietly; anything else (our fault) is logged as a 500."""
    for kind in (APIError, ValidationError, HTTPException, Exception):
        app.add_exception_handler(kind, _handle)


def sse_error(exc: Exception) -> str:
    """An error after the stream's 200 went out: one `data:` event with the error body."""
    return f"data: {json.dumps(error_body(to_api_error(exc)))}\n\n"
