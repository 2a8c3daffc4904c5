"""OpenAI error objects: ``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status.

Every failure a client can cause is an `APIError` (or a `LlavaError` mapped by `from_llava`) and answers 4xx; the
FastAPI handlers installed by `install_handlers` make sure that also holds for what FastAPI/Starlette raise
themselves (malformed JSON, schema violations, unknown routes). Only a bug of ours is a 500, and it is still an
error object.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava_cli.errors import ContextOverflowError, ImageError, InputNotFoundError, LlavaError

log = logging.getLogger("llava_cli.server")

INVALID = "invalid_request_error"


class APIError(Exception):
    """An error answer. ``type`` and ``code`` follow OpenAI's vocabulary so clients can branch on them."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_llava(exc: LlavaError, param: str | None = None) -> APIError:
    """Our own exceptions as answers: a prompt too long is 400 ``context_length_exceeded`` (OpenAI's code), bytes
    that are no usable image 422, anything else the request caused 400."""
    message = exc.message + (f" ({exc.hint})" if exc.hint else "")
    if isinstance(exc, ContextOverflowError):
        return APIError(400, message, param="messages", code="context_length_exceeded")
    if isinstance(exc, (ImageError, InputNotFoundError)):
        return APIError(422, message, param=param, code="invalid_image")
    return APIError(400, message, param=param)


def param_path(loc: tuple[Any, ...]) -> str:
    """pydantic's error location as OpenAI's ``param``: ("body", "messages", 0, "role") -> messages[0].role."""
    out = ""
    for part in loc:
        if part == "body":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = param_path(tuple(first.get("loc", ())))
        where = f"{param}: " if param else ""
        return bad_request(f"{where}{first.get('msg', 'invalid value')}", param=param or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, code=code, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()
