"""Decode a JSON request body into a msgspec type; every failure is a 400 naming the field.

One pass from bytes to the typed request: msgspec checks UTF-8, JSON syntax, types, bounds and
unknown fields together.  Nesting depth is bounded by the types themselves (no free-form JSON
except a few declared-but-unsupported fields); msgspec stops at the interpreter's recursion
limit on anything deeper, which is a 400 here, not a 500.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec
from medserve.server.errors import APIError

T = TypeVar("T")

_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")
_UNKNOWN_FIELD_RE = re.compile(r"unknown field `([^`]*)`")


def decode_json(body: bytes, request_type: type[T]) -> T:
    if not body.strip():
        raise APIError(400, "request body is empty; send a JSON object", code="invalid_json")
    try:
        return msgspec.json.decode(body, type=request_type)
    except msgspec.ValidationError as exc:
        message = str(exc)
        param = _param(message)
        if _UNKNOWN_FIELD_RE.search(message):
            message = f"unknown or unsupported field {param!r}: {message}"
        raise APIError(400, message, param=param, code="invalid_request") from None
    except msgspec.DecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from None


def _param(message: str) -> str | None:
    """The field at fault, as a path: ``messages[0].role``, ``logprobs``."""
    match = _PATH_RE.search(message)
    path = match.group(1) if match else ""
    unknown = _UNKNOWN_FIELD_RE.search(message)
    if unknown:
        # msgspec reports the object holding the unknown key; name the key itself.
        path = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
    return path or None
