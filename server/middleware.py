"""ASGI middleware: an `x-request-id` on every response, the API key on `/v1` routes, and the
request body size limit.

Plain ASGI rather than starlette's `BaseHTTPMiddleware`, so streaming responses and the
handlers' disconnect watching see the untouched `receive` channel (the size limit only counts
the body messages that pass through it).
"""
import hmac
import uuid

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, error_body

PROTECTED_PREFIX = "/v1"


class RequestIdAndAuth:
    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    def _authorized(self, headers: Headers) -> bool:
        given = headers.get("authorization", "").encode("utf-8", "replace")
        return hmac.compare_digest(given, self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id") or uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        if (self.expected is not None and scope["path"].startswith(PROTECTED_PREFIX)
                and not self._authorized(headers)):
            error = APIError("Incorrect or missing API key: send `Authorization: Bearer <key>`",
                             status=401, type="invalid_request_error", code="invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})
            response = JSONResponse(error_body(error), status_code=401, headers=error.headers)
            return await response(scope, receive, send_with_id)
        await self.app(scope, receive, send_with_id)


class BodyTooLarge(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than this server's limit of {limit} "
                         "bytes (--max-request-body-size)", status=413,
                         code="request_too_large")


class BodySizeLimit:
    """413 for a body over `limit` bytes, before anything parses it: at once when the
    `Content-Length` says so; for a chunked body, as soon as the bytes received pass the limit
    (the handler reading the body gets `BodyTooLarge`, which `errors` answers). The rest of an
    over-size body is discarded by uvicorn as it arrives, never buffered."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            error = BodyTooLarge(self.limit)
            return await JSONResponse(error_body(error), status_code=413)(scope, receive, send)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)
