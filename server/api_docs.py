"""Request and response bodies in the OpenAPI document, from the msgspec Structs that validate.

Handlers decode raw bytes themselves (one msgspec pass, errors in the OpenAI shape), so
Litestar cannot see their body types.  A route names them on its decorator instead:

    @post("/chat/completions", operation_class=documented(ChatCompletionRequest, ChatCompletion,
                                                          stream=ChatCompletionChunk))

and ``add_body_schemas`` puts msgspec's own JSON Schema of every named Struct into the
document's components at start-up -- the schema clients and fuzzers read is the one the
decoder enforces.  Every error response is documented once, as ``default``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec
from litestar.openapi.spec import OpenAPI, OpenAPIMediaType, OpenAPIResponse, Operation, Reference
from litestar.openapi.spec.request_body import RequestBody
from medserve.server.errors import ErrorResponse

_REF_TEMPLATE = "#/components/schemas/{name}"
_HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _ref(struct: type) -> Reference:
    return Reference(ref=_REF_TEMPLATE.format(name=struct.__name__))


@dataclass
class DocumentedOperation(Operation):
    """An operation whose bodies come from declared Structs rather than the handler signature."""

    request_type: ClassVar[type | None] = None
    response_type: ClassVar[type | None] = None
    stream_type: ClassVar[type | None] = None
    """Struct of each server-sent event when the request asks for ``stream: true``."""
    media_type: ClassVar[str] = "application/json"
    """Media type of a response without a Struct (``response_type`` None): text."""

    def __post_init__(self) -> None:
        if self.request_type is not None:
            self.request_body = RequestBody(
                required=True,
                content={"application/json": OpenAPIMediaType(schema=_ref(self.request_type))},
            )
        content: dict[str, OpenAPIMediaType] = {}
        if self.response_type is not None:
            content["application/json"] = OpenAPIMediaType(schema=_ref(self.response_type))
        else:
            content[self.media_type] = OpenAPIMediaType(schema={"type": "string"})  # type: ignore[arg-type]
        if self.stream_type is not None:
            content["text/event-stream"] = OpenAPIMediaType(
                schema={  # type: ignore[arg-type]
                    "type": "string",
                    "description": (
                        "With stream=true: server-sent events, each "
                        f"`data: <{self.stream_type.__name__} JSON>`, the last `data: [DONE]`."
                    ),
                }
            )
        self.responses = {
            "200": OpenAPIResponse(description="Success", content=content),
            "default": OpenAPIResponse(
                description='Error: {"error": {message, type, param, code}}, as OpenAI sends',
                content={"application/json": OpenAPIMediaType(schema=_ref(ErrorResponse))},
            ),
        }

    @classmethod
    def structs(cls) -> list[type]:
        named = (cls.request_type, cls.response_type, cls.stream_type, ErrorResponse)
        return [t for t in named if t is not None]


def documented(
    request: type | None = None,
    response: type | None = None,
    *,
    stream: type | None = None,
    media_type: str = "application/json",
) -> type[Operation]:
    """The ``operation_class`` for a route with these bodies (None: no body / plain text)."""
    name = (response or request or ErrorResponse).__name__
    return type(
        f"{name}Operation",
        (DocumentedOperation,),
        {
            "request_type": request,
            "response_type": response,
            "stream_type": stream,
            "media_type": media_type,
        },
    )


def add_body_schemas(openapi: OpenAPI) -> None:
    """Put the JSON Schema of every Struct the operations name into ``components.schemas``."""
    structs: dict[str, type] = {}
    for path_item in (openapi.paths or {}).values():
        for method in _HTTP_METHODS:
            operation = getattr(path_item, method, None)
            if isinstance(operation, DocumentedOperation):
                for struct in operation.structs():
                    structs.setdefault(struct.__name__, struct)
    if not structs:
        return
    _, components = msgspec.json.schema_components(
        [structs[name] for name in sorted(structs)], ref_template=_REF_TEMPLATE
    )
    schemas: dict[str, Any] = dict(openapi.components.schemas or {})
    schemas.update(components)
    openapi.components.schemas = schemas
