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
