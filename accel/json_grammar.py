"""A JSON Schema as a *compact* JSON grammar (xgrammar EBNF) for OpenVINO GenAI.

Why: GenAI 2026.4 compiles ``StructuredOutputConfig(json_schema=...)`` into a grammar that admits
any run of whitespace between JSON tokens and offers no switch to turn that off.  A small model
decoding greedily can then prefer a tab or a newline to every content token, forever: on the
AMD EPYC VMs the bundled 135M model wrote tabs until ``max_tokens`` for half the findings
prompts (tests/integration/test_structured_output.py), while the same schema as a compact
grammar completes every time.  Compact output is also what an EMR integration stores.

The grammar here produces JSON with no whitespace outside strings, properties in the schema's
order, and every instance it admits validates against the schema.  It covers the keywords the
server's schemas and typical integration schemas use (objects, arrays with item bounds, strings
with length bounds, enums and consts, integers with or without bounds, numbers, booleans, null,
``anyOf``, and ``type`` lists).  ``compact_json_grammar`` returns None for anything else
(``pattern``, ``format``, ``$ref``, ``oneOf``, bounded numbers, ...), and the engine falls back
to GenAI's own schema compiler, whitespace and all: never an unenforced keyword.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

# Keywords that never change which instances are valid.
_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment"}
)
_NUMBER_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_KNOWN = _ANNOTATIONS | {
    *("type", "enum", "const", "anyOf"),
    *("properties", "required", "additionalProperties"),
    *("items", "minItems", "maxItems", "minLength", "maxLength"),
    *_NUMBER_BOUNDS,
}
# A JSON integer the model may write without bounds: at most 16 digits, so it cannot spend
# max_tokens on one number.
_MAX_DIGITS = 16
_BOUND = 10**_MAX_DIGITS - 1

_BASE_RULES = {
    "char": r'[^"\\\x00-\x1f] | "\\" ["\\/bfnrt]',
    "string": r'"\"" char* "\""',
    "integer": f'"-"? ("0" | [1-9] [0-9]{{0,{_MAX_DIGITS - 1}}})',
    "number": f'integer ("." [0-9]{{1,{_MAX_DIGITS}}})? ([eE] [+-]? [0-9]{{1,3}})?',
    "scalar": 'string | number | "true" | "false" | "null"',
}
# Schema-free JSON ({"type": "object"}, {}): any value, but bounded -- a small model asked for
# "any JSON" otherwise loops forever inside one list ({"id": 1}, {"id": 2}, ...).  Nesting
# depth, members and items are capped; every document within them is allowed.  (Not string
# length: a bounded repetition is expanded by the grammar compiler, and {0,2048} made every
# token's mask slow.)
FREE_DEPTH = 6
FREE_MEMBERS = 32
for _d in range(FREE_DEPTH):
    _inner = f"value{_d + 1}" if _d + 1 < FREE_DEPTH else "scalar"
    _BASE_RULES[f"value{_d}"] = f"object{_d} | array{_d} | scalar"
    _member = f'string ":" {_inner}'
    _BASE_RULES[f"object{_d}"] = f'"{{" ({_member} ("," {_member}){{0,{FREE_MEMBERS - 1}}})? "}}"'
    _BASE_RULES[f"array{_d}"] = f'"[" ({_inner} ("," {_inner}){{0,{FREE_MEMBERS - 1}}})? "]"'


class _Unsupported(Exception):
    """The schema uses something this module does not turn into grammar."""


def compact_json_grammar(schema: Mapping[str, Any] | bool) -> str | None:
    """The EBNF grammar of compact JSON valid under ``schema``, or None if the schema uses a
    keyword not covered here (the caller then uses the engine's JSON-Schema compiler)."""
    builder = _Builder()
    try:
        root = builder.node(schema)
    except _Unsupported:
        return None
    return builder.render(root)


def literal(text: str) -> str:
    """An EBNF string literal matching exactly ``text``."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class _Builder:
    def __init__(self) -> None:
        self.rules: dict[str, str] = {}
        self._by_body: dict[str, str] = {}
        self._used_base: set[str] = set()

    # -- rules ----------------------------------------------------------------------------

    def rule(self, body: str) -> str:
        """A named rule for ``body`` (one name per distinct body)."""
        name = self._by_body.get(body)
        if name is None:
            name = f"r{len(self.rules)}"
            self.rules[name] = body
            self._by_body[body] = name
        return name

    def base(self, name: str) -> str:
        self._used_base.add(name)
        return name

    def render(self, root: str) -> str:
        lines = [f"root ::= {root}"]
        lines += [f"{name} ::= {body}" for name, body in self.rules.items()]
        needed = self._closure()
        lines += [f"{name} ::= {_BASE_RULES[name]}" for name in _BASE_RULES if name in needed]
        return "\n".join(lines) + "\n"

    def _closure(self) -> set[str]:
        """Base rules used, with the base rules they refer to."""
        needed = set(self._used_base)
        changed = True
        while changed:
            changed = False
            for name in list(needed):
                for other in _BASE_RULES:
                    if other not in needed and _mentions(_BASE_RULES[name], other):
                        needed.add(other)
                        changed = True
        return needed

    # -- schema nodes ---------------------------------------------------------------------

    def node(self, schema: Any) -> str:
        if schema is True or schema == {}:
            return self.base("value0")
        if not isinstance(schema, Mapping):
            raise _Unsupported("false or non-object schema")
        unknown = set(schema) - _KNOWN
        if unknown:
            raise _Unsupported(sorted(unknown)[0])
        if "const" in schema or "enum" in schema:
            return self._choice(schema)
        if "anyOf" in schema:
            if set(schema) - _ANNOTATIONS - {"anyOf"}:
                raise _Unsupported("anyOf beside other keywords")
            return self.rule(" | ".join(self.node(option) for option in schema["anyOf"]))
        kind = schema.get("type")
        if kind is None:
            if set(schema) - _ANNOTATIONS:
                raise _Unsupported("constraints without a type")
            return self.base("value0")
        if isinstance(kind, list):
            return self.rule(" | ".join(self._typed(schema, k) for k in kind))
        return self._typed(schema, kind)

    def _typed(self, schema: Mapping[str, Any], kind: str) -> str:
        if kind == "object":
            return self._object(schema)
        if kind == "array":
            return self._array(schema)
        if kind == "string":
            return self._string(schema)
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            if any(k in schema for k in _NUMBER_BOUNDS):
                raise _Unsupported("bounded number")
            return self.base("number")
        if kind == "boolean":
            return self.rule('"true" | "false"')
        if kind == "null":
            return self.rule('"null"')
        raise _Unsupported(f"type {kind!r}")

    def _choice(self, schema: Mapping[str, Any]) -> str:
        values = [schema["const"]] if "const" in schema else list(schema["enum"])
        if not values:
            raise _Unsupported("empty enum")
        if set(schema) - _ANNOTATIONS - {"const", "enum", "type"}:
            raise _Unsupported("enum beside other constraints")
        kind = schema.get("type")
        if kind is not None:
            kinds = set(kind) if isinstance(kind, list) else {kind}
            values = [v for v in values if _json_type(v) in kinds or _is_integer_of(v, kinds)]
            if not values:
                raise _Unsupported("no enum value has the type")
        return self.rule(" | ".join(literal(_json(v)) for v in values))

    def _object(self, schema: Mapping[str, Any]) -> str:
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties", True)
        if not properties:
            if extra is False:
                return self.rule('"{" "}"')
            if extra is True or extra == {}:
                return self.base("object0")
            member = self.rule(f'{self.base("string")} ":" {self.node(extra)}')
            return self.rule(f'"{{" ({member} ("," {member})*)? "}}"')
        if extra not in (True, False, {}):
            raise _Unsupported("additionalProperties schema beside properties")
        # With properties, only they are written (as xgrammar's strict mode does): valid
        # whether additionalProperties allows more or not.
        required = set(schema.get("required", ()))
        if not required <= set(properties):
            raise _Unsupported("required property without a schema")
        members = [
            (self.rule(f'{literal(_json(name))} ":" {self.node(sub)}'), name in required)
            for name, sub in properties.items()
        ]
        return self.rule(f'"{{" {self._members(members)} "}}"')

    def _members(self, members: list[tuple[str, bool]]) -> str:
        """Members in order, optional ones omissible, commas only between written ones."""
        # tail[i]: what may follow once something is written, from member i on (i >= 1).
        tail = [""] * (len(members) + 1)
        for i in range(len(members) - 1, 0, -1):
            rule, needed = members[i]
            step = f'"," {rule}' if needed else f'("," {rule})?'
            tail[i] = self.rule(f"{step} {tail[i + 1]}".strip())
        # head[i]: the first written member is i or later.
        head = ""
        for i in range(len(members) - 1, -1, -1):
            rule, needed = members[i]
            first = f"{rule} {tail[i + 1]}".strip()
            if needed:
                head = self.rule(first)
            else:
                head = self.rule(f"{first} | {head}" if head else f"({first})?")
        return head

    def _array(self, schema: Mapping[str, Any]) -> str:
        item = self.node(schema.get("items", True))
        low = int(schema.get("minItems", 0))
        high = schema.get("maxItems")
        if high is not None and int(high) < low:
            raise _Unsupported("maxItems below minItems")
        if high == 0:
            return self.rule('"[" "]"')
        if high == 1:
            body = item
        else:
            more = _repeat(max(low - 1, 0), None if high is None else int(high) - 1)
            body = f'{item} ("," {item}){more}'

        return self.rule(f'"[" {body} "]"' if low >= 1 else f'"[" ({body})? "]"')

    def _string(self, schema: Mapping[str, Any]) -> str:
        for keyword in _NUMBER_BOUNDS:
            if keyword in schema:
                raise _Unsupported(f"{keyword} on a string")
        low = int(schema.get("minLength", 0))
        high = schema.get("maxLength")
        if low == 0 and high is None:
            return self.base("string")
        if high == 0:
            return self.rule(literal('""'))
        chars = self.base("char") + _repeat(low, None if high is None else int(high))
        return self.rule(f'"\\"" {chars} "\\""')

    def _integer(self, schema: Mapping[str, Any]) -> str:
        low, high = -_BOUND, _BOUND
        if "minimum" in schema:
            low = max(low, math.ceil(schema["minimum"]))
        if "exclusiveMinimum" in schema:
            low = max(low, math.floor(schema["exclusiveMinimum"]) + 1)
        if "maximum" in schema:
            high = min(high, math.floor(schema["maximum"]))
        if "exclusiveMaximum" in schema:
            high = min(high, math.ceil(schema["exclusiveMaximum"]) - 1)
        if (low, high) == (-_BOUND, _BOUND):
            return self.base("integer")
        if low > high:
            raise _Unsupported("empty integer range")
        return self.rule(" | ".join(render_digits(p) for p in integer_patterns(low, high)))


def _repeat(low: int, high: int | None) -> str:
    if high is None:
        return f"{{{low},}}" if low else "*"
    if (low, high) == (0, 1):
        return "?"
    return f"{{{low},{high}}}"


_LITERALS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]')
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _mentions(body: str, name: str) -> bool:
    """Whether the rule body refers to rule ``name`` (outside literals and char classes)."""
    return name in _NAME.findall(_LITERALS.sub(" ", body))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _is_integer_of(value: Any, kinds: set[str]) -> bool:
    return "integer" in kinds and isinstance(value, int) and not isinstance(value, bool)


# -- integer ranges -------------------------------------------------------------------------

# A pattern is (sign, [(lo_digit, hi_digit), ...]): the integers written as that sign and one
# digit from each range, most significant first.
Pattern = tuple[str, list[tuple[int, int]]]


def integer_patterns(low: int, high: int) -> list[Pattern]:
    """Digit patterns matching exactly the canonical decimal forms of low..high."""
    out: list[Pattern] = []
    if low < 0:
        # -a for a in max(1, -high)..-low
        out += [("-", digits) for digits in _unsigned(max(1, -high), -low)]
    if high >= 0:
        out += [("", digits) for digits in _unsigned(max(0, low), high)]
    return out


def _unsigned(low: int, high: int) -> list[list[tuple[int, int]]]:
    """Patterns for low..high, 0 <= low <= high, with no leading zeros."""
    if low > high:
        return []
    out: list[list[tuple[int, int]]] = []
    # Split by length so that each part has numbers of one digit count.
    length = len(str(low))
    while low <= high:
        top = min(high, 10**length - 1)
        out += _same_length(str(low), str(top))
        low, length = top + 1, length + 1
    return out


def _same_length(low: str, high: str) -> list[list[tuple[int, int]]]:
    """Patterns for the numbers from ``low`` to ``high``, both with the same digit count."""
    if len(low) == 1:
        return [[(int(low), int(high))]]
    if low[0] == high[0]:
        return [[(int(low[0]), int(low[0])), *rest] for rest in _same_length(low[1:], high[1:])]
    tail = len(low) - 1
    out: list[list[tuple[int, int]]] = []
    lead_low, lead_high = int(low[0]), int(high[0])
    # low's leading digit with every tail from low's tail to 9...9
    if low[1:] == "0" * tail:
        start = lead_low
    else:
        out += [[(lead_low, lead_low), *r] for r in _same_length(low[1:], "9" * tail)]
        start = lead_low + 1
    # high's leading digit with every tail from 0...0 to high's tail
    end = lead_high if high[1:] == "9" * tail else lead_high - 1
    if start <= end:
        out.append([(start, end), *[(0, 9)] * tail])
    if high[1:] != "9" * tail:
        out += [[(lead_high, lead_high), *r] for r in _same_length("0" * tail, high[1:])]
    return out


def render_digits(pattern: Pattern) -> str:
    sign, digits = pattern
    parts = [literal("-")] if sign else []
    for lo, hi in digits:
        parts.append(literal(str(lo)) if lo == hi else f"[{lo}-{hi}]")
    return "(" + " ".join(parts) + ")"
