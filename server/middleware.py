"""ASGI middleware: an `x-request-id` on every response, and the API key on `/v1` routes.

Plain ASGI rather than starlette's `BaseHTTPMiddleware`, so streaming responses and the
handlers' disconnect watching see the untouched `receive` channel.
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
                             status=401, type="invalid_request_error", code="invalid_api_key")
            response = JSONResponse(error_body(error), status_code=401)
            return await response(scope, receive, send_with_id)
        await self.app(scope, receive, send_with_id)
