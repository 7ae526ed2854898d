"""Every error leaves the server in the OpenAI error shape, whatever raised it.

``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`` is what the official
clients parse; a bare Litestar error body would surface in EMR integrations as an opaque failure.
"""

from __future__ import annotations

from typing import Any

import msgspec
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

log = structlog.get_logger("medserve.errors")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_overloaded",
}


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    """The request field at fault (``messages[0].role``), when one is."""
    code: str | None


class ErrorResponse(msgspec.Struct):
    """The body of every error response (documents the OpenAPI ``default`` response)."""

    error: ErrorDetail


class APIError(Exception):
    """An error meant for the client: status, message, and the request field at fault."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPE_BY_STATUS.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> Response[dict[str, Any]]:
    return Response(error_body(status, message, param, code), status_code=status)


def handle_api_error(_: Request, exc: APIError) -> Response[dict[str, Any]]:
    return error_response(exc.status, exc.message, exc.param, exc.code)


def handle_validation_error(_: Request, exc: ValidationException) -> Response[dict[str, Any]]:
    # Litestar puts per-field problems in extra; surface the first one as `param`.
    param = None
    message = exc.detail or "invalid request"
    if isinstance(exc.extra, list) and exc.extra:
        first = exc.extra[0]
        if isinstance(first, dict):
            key = first.get("key")
            param = str(key) if key else None
            detail = first.get("message")
            if detail:
                message = f"{detail}" + (f" (field '{param}')" if param else "")
    return error_response(400, message, param, "invalid_request")


def handle_http_exception(_: Request, exc: HTTPException) -> Response[dict[str, Any]]:
    status = exc.status_code
    message = exc.detail or "error"
    if status == 413:
        message = "request body is too large"
    return error_response(status, message, None, None)


def handle_unexpected(request: Request, exc: Exception) -> Response[dict[str, Any]]:
    # Log the exception type only: messages from deep inside may quote request content.
    log.error(
        "unhandled_exception",
        exc_type=type(exc).__name__,
        route=request.url.path,
        request_id=request.scope.get("state", {}).get("request_id"),
    )
    return error_response(HTTP_500_INTERNAL_SERVER_ERROR, "internal server error")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    APIError: handle_api_error,
    ValidationException: handle_validation_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
