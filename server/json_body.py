"""Decode a JSON request body into a msgspec type; every failure is a 400 naming the field."""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec
from medserve.server.errors import APIError

T = TypeVar("T")

_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")


def decode_json(body: bytes, request_type: type[T]) -> T:
    if not body.strip():
        raise APIError(400, "request body is empty; send a JSON object", code="invalid_json")
    try:
        return msgspec.json.decode(body, type=request_type)
    except msgspec.ValidationError as exc:
        match = _PATH_RE.search(str(exc))
        param = match.group(1) if match else None
        raise APIError(400, str(exc), param=param or None, code="invalid_request") from None
    except msgspec.DecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
