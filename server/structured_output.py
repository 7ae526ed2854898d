"""response_format and tool calls -> the JSON Schema the engine constrains decoding to.

The engine (OpenVINO GenAI's xgrammar backend) compiles the schema inside the worker while it
schedules the request; a schema it cannot compile there does not fail the request but breaks
the pipeline's step for every request.  So every schema is checked here first: it must be a
valid JSON Schema (Draft 2020-12) and use only keywords the grammar compiler supports.  An
unsupported keyword is a 400 naming it, never a surprise in the worker.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jsonschema
from medserve.server.errors import APIError

MAX_SCHEMA_BYTES = 65_536
MAX_SCHEMA_DEPTH = 24

# Keywords xgrammar's JSON-Schema converter turns into grammar (or may safely ignore).
SUPPORTED_KEYWORDS = frozenset(
    {
        *("type", "properties", "required", "additionalProperties", "items", "prefixItems"),
        *("enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions"),
        *("minItems", "maxItems", "minLength", "maxLength", "minimum", "maximum"),
        *("exclusiveMinimum", "exclusiveMaximum", "pattern", "format"),
        *("title", "description", "default", "examples", "$schema", "$id", "$comment"),
        "minProperties",
        "maxProperties",
    }
)
_SCHEMA_VALUED = ("items", "additionalProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
# Lookaround and backreferences are not regular: the grammar compiler cannot build them.
_IRREGULAR_PATTERN = ("(?=", "(?!", "(?<=", "(?<!", "\\1", "\\2", "(?P")


def response_schema(response_format: Any) -> dict[str, Any] | None:
    """The schema a chat request's response_format asks for (None for plain text)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    spec = response_format.json_schema
    if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
        raise APIError(
            400,
            "response_format.json_schema must be {'name': ..., 'schema': {...}}",
            param="response_format.json_schema",
            code="invalid_schema",
        )
    schema = dict(spec["schema"])
    check_schema(schema, "response_format.json_schema.schema")
    return schema


def check_schema(schema: Mapping[str, Any], param: str) -> None:
    """400 unless ``schema`` is a valid JSON Schema the engine can enforce."""
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise APIError(400, f"{param}: schema exceeds {MAX_SCHEMA_BYTES} bytes", param=param)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        path = "".join(f"[{p!r}]" for p in exc.path)
        raise APIError(
            400,
            f"{param}{path}: not a valid JSON Schema: {exc.message}",
            param=param,
            code="invalid_schema",
        ) from None
    _check_supported(schema, param, 0)


def _check_supported(node: Any, where: str, depth: int) -> None:
    if isinstance(node, bool):
        return
    if depth > MAX_SCHEMA_DEPTH:
        raise APIError(400, f"{where}: schema nested deeper than {MAX_SCHEMA_DEPTH}", param=where)
    for keyword, value in node.items():
        if keyword not in SUPPORTED_KEYWORDS:
            raise APIError(
                400,
                f"{where}: keyword {keyword!r} cannot be enforced by constrained decoding",
                param=where,
                code="unsupported_schema",
            )
        if keyword == "pattern" and any(token in value for token in _IRREGULAR_PATTERN):
            raise APIError(
                400,
                f"{where}.pattern: lookaround and backreferences are not supported",
                param=where,
                code="unsupported_schema",
            )
        if keyword == "$ref" and not value.startswith("#"):
            raise APIError(400, f"{where}.$ref: only local references (#/...)", param=where)
        if keyword in _SCHEMA_VALUED and isinstance(value, Mapping):
            _check_supported(value, f"{where}.{keyword}", depth + 1)
        elif keyword in _SCHEMA_LISTS:
            for i, item in enumerate(value):
                _check_supported(item, f"{where}.{keyword}[{i}]", depth + 1)
        elif keyword in _SCHEMA_MAPS:
            for name, item in value.items():
                _check_supported(item, f"{where}.{keyword}.{name}", depth + 1)


# -- tools -------------------------------------------------------------------------------


def tool_call_schema(tools: Sequence[Any], tool_choice: Any) -> dict[str, Any]:
    """The schema of one call: ``{"name": <a tool>, "arguments": <its parameters>}``."""
    chosen = list(tools)
    if isinstance(tool_choice, Mapping):
        name = (tool_choice.get("function") or {}).get("name")
        chosen = [t for t in tools if t.function.name == name]
        if not chosen:
            raise APIError(
                400,
                f"tool_choice names {name!r}, which is not among the tools",
                param="tool_choice",
            )
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool.function.name},
                "arguments": tool.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in chosen
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def check_tools(tools: Sequence[Any]) -> None:
    names = [tool.function.name for tool in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: function names must be unique", param="tools")
    for i, tool in enumerate(tools):
        if tool.function.parameters is not None:
            check_schema(tool.function.parameters, f"tools[{i}].function.parameters")


def tools_instruction(tools: Sequence[Any]) -> str:
    """A system turn describing the tools, for any chat template (model-neutral)."""
    described = [
        {
            "name": t.function.name,
            "description": t.function.description or "",
            "parameters": t.function.parameters or {"type": "object"},
        }
        for t in tools
    ]
    return (
        "You can call these functions. To call one, reply with only a JSON object "
        '{"name": <function name>, "arguments": {...}}.\n'
        f"Functions: {json.dumps(described, ensure_ascii=False)}"
    )


def parse_tool_call(text: str, tools: Sequence[Any]) -> tuple[str, str] | None:
    """(name, arguments as JSON text) if ``text`` is exactly one call of a known tool."""
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or set(call) != {"name", "arguments"}:
        return None
    return _checked_call(call["name"], call["arguments"], tools)


def parse_template_call(text: str, tools: Sequence[Any]) -> tuple[str, str] | None:
    """(name, arguments as JSON text) if ``text`` is one call in GLM-4's or ChatGLM3's syntax.

    Both write a call as the tool's name on the first line (the turn's metadata in their
    templates), then the arguments: a JSON object for GLM-4, ``tool_call(key=value, ...)`` in
    a python code block for ChatGLM3 (its own demo's format; JSON is accepted from it too).
    """
    name, newline, rest = text.strip().partition("\n")
    if not newline:
        return None
    rest = rest.strip()
    arguments = _tool_call_kwargs(rest) if rest.startswith("```") else _json_value(rest)
    return _checked_call(name.strip(), arguments, tools)


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _tool_call_kwargs(block: str) -> dict[str, Any] | None:
    """The keyword arguments of ChatGLM3's python block ``tool_call(a=1)``, read as literals
    (ast.literal_eval: nothing the model wrote is ever executed)."""
    code = block.removeprefix("```python").removeprefix("```").removesuffix("```").strip()
    try:
        call = ast.parse(code, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
        return None
    if call.func.id != "tool_call" or call.args or any(k.arg is None for k in call.keywords):
        return None
    try:
        return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _checked_call(name: Any, arguments: Any, tools: Sequence[Any]) -> tuple[str, str] | None:
    """The call if ``name`` is a tool and ``arguments`` an object valid for its parameters."""
    tool = next((t for t in tools if t.function.name == name), None)
    if tool is None or not isinstance(arguments, dict):
        return None
    if tool.function.parameters is not None:
        try:
            jsonschema.validate(arguments, tool.function.parameters)
        except jsonschema.ValidationError:
            return None
    return tool.function.name, json.dumps(arguments, ensure_ascii=False)


def template_tool(tool: Any) -> dict[str, Any]:
    """A tool as the chat template gets it: the OpenAI shape, fields the client left out
    omitted (a template prints the function as JSON; ``null`` fields would be noise)."""
    function = {
        key: value
        for key, value in (
            ("name", tool.function.name),
            ("description", tool.function.description),
            ("parameters", tool.function.parameters),
        )
        if value is not None
    }
    return {"type": "function", "function": function}
