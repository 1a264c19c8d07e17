"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with its status.

Every failure the server reports goes through here: ``APIError`` raised by a handler, FastAPI's
request validation (malformed JSON included; answered 400, not FastAPI's 422), unknown routes and
methods, and anything unexpected (500). The server keeps serving after each.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("tensorpar.serve")
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list|dict|.*\[.*)$")  # pydantic's union member names

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class APIError(Exception):
    """An error answered to the client as ``status`` with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return ("We could not parse the JSON body of your request. The body must be a JSON object "
                f"({first.get('msg', 'JSON decode error')})."), None
    loc = list(first.get("loc", ()))
    if loc[:1] == ["body"]:
        loc = loc[1:]
    path = []
    for part in loc:  # the field's path, without the names pydantic gives the members of a union
        if isinstance(part, str) and _UNION_TAG.match(part):
            break
        path.append(str(part))
    param = ".".join(path) or None
    msg = first.get("msg", "invalid value")
    if param is None and first.get("type") != "missing":
        return "The request body must be a JSON object, sent with 'Content-Type: application/json'.", None
    if first.get("type") == "missing":
        msg = f"'{param}' is a required property" if param else "the request body is required"
    elif param:
        msg = f"invalid value for '{param}': {msg}"
    return msg, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        return APIError(400, msg, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return JSONResponse(APIError(exc.status_code, msg).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()


DEFAULT_MAX_REQUEST_BYTES = 4 << 20  # a request body larger than this is answered 413


class BodyLimit:
    """ASGI middleware: a request body of more than ``max_bytes`` is answered 413 (OpenAI's error
    body) before the app parses it: at once when its Content-Length says so, else once that many
    bytes have arrived (a body without one is read here, at most ``max_bytes``, then handed on)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit():
            if int(length) > self.max_bytes:
                return await self._refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        messages, size = [], 0
        while True:  # no stated length: buffer the body, counting
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        error = APIError(413, f"The request body is larger than this server's limit of {self.max_bytes} bytes "
                              "(tensorpar serve --max-request-bytes).", code="request_too_large")
        await error.response()(scope, receive, send)
