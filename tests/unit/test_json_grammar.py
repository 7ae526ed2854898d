"""JSON Schema -> compact grammar (accel/json_grammar.py): integer ranges are exact, keywords the
module does not cover fall back to the engine's schema compiler, and real OpenVINO GenAI decoding
under each grammar (the bundled model, greedy and sampled) writes compact JSON that validates."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from medserve.accel.json_grammar import compact_json_grammar, integer_patterns
from medserve.server.clinical.schemas import DISCHARGE_SCHEMA, SYMPTOMS_SCHEMA, similar_cases_schema
from medserve.server.structured_output import tool_call_schema

from tests.conftest import BUNDLED_MODEL
from tests.integration.test_structured_output import FINDINGS


def _regex(low: int, high: int) -> re.Pattern[str]:
    alternatives = []
    for sign, digits in integer_patterns(low, high):
        alternatives.append(re.escape(sign) + "".join(f"[{lo}-{hi}]" for lo, hi in digits))
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


def test_integer_patterns_match_exactly_the_range() -> None:
    rng = np.random.default_rng(0)
    ranges = [(0, 0), (0, 365), (-5, 12), (-300, -20), (1, 9), (10, 99), (7, 1234), (-1, 0)]
    ranges += [tuple(sorted(rng.integers(-2500, 2500, 2).tolist())) for _ in range(60)]
    for low, high in ranges:
        pattern = _regex(low, high)
        for n in range(low - 120, high + 121):
            assert bool(pattern.fullmatch(str(n))) == (low <= n <= high), (low, high, n)
        # Only canonical forms: no leading zeros, no "-0".
        assert not pattern.fullmatch("-0")
        assert not pattern.fullmatch("0" + str(abs(high)))


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "pattern": "^[A-Z]+$"},
        {"type": "string", "format": "date"},
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "$defs": {"a": {}}},
        {"oneOf": [{"type": "string"}, {"type": "integer"}]},
        {"type": "number", "minimum": 0.5},
        {"allOf": [{"type": "object"}]},
        {"type": "array", "prefixItems": [{"type": "string"}]},
        False,
    ],
)
def test_uncovered_keywords_fall_back_to_the_engine_compiler(schema: Any) -> None:
    assert compact_json_grammar(schema) is None


class _Tool:
    def __init__(self, name: str, parameters: dict[str, Any]) -> None:
        self.function = type("F", (), {"name": name, "parameters": parameters})()


SCHEMAS = {
    "findings": FINDINGS,
    "clinical symptoms": SYMPTOMS_SCHEMA,
    "clinical discharge": DISCHARGE_SCHEMA,
    "clinical similar cases": similar_cases_schema(["case-1", "病例-2"]),
    "json_object": {"type": "object"},
    "two tools": tool_call_schema(
        [
            _Tool("order_lab_test", {"type": "object", "properties": {"test": {"enum": ["CBC"]}}}),
            _Tool("find_bed", {"type": "object", "properties": {"ward": {"type": "string"}}}),
        ],
        "required",
    ),
    "all optional": {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "exclusiveMinimum": -5, "maximum": 12},
            "b": {"type": ["string", "null"], "maxLength": 8},
            "c": {"type": "number"},
        },
    },
    "odd literals": {
        "type": "object",
        "properties": {"quote": {"const": 'say "hi"\\ \n 你好'}, "n": {"enum": [1.5, None, True]}},
        "required": ["quote", "n"],
    },
    "bounded array": {
        "type": "array",
        "items": {"type": "integer", "minimum": -300, "maximum": -20},
        "minItems": 2,
        "maxItems": 3,
    },
}


SAMPLED = ("findings", "two tools", "all optional", "odd literals")


_LITERALS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]')


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_rule_referred_to_is_defined_once(name: str) -> None:
    """A grammar GenAI cannot parse fails the engine step of every request in the batch."""
    grammar = compact_json_grammar(SCHEMAS[name])
    assert grammar is not None
    defined = [line.split(" ::= ", 1)[0] for line in grammar.splitlines()]
    assert len(defined) == len(set(defined))
    bodies = " ".join(line.split(" ::= ", 1)[1] for line in grammar.splitlines())
    referred = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", _LITERALS.sub(" ", bodies)))
    assert referred <= set(defined), referred - set(defined)


@pytest.fixture(scope="module")
def pipeline(models_dir: Path) -> Any:
    import openvino_genai as ov_genai

    return ov_genai.LLMPipeline(str(models_dir / BUNDLED_MODEL), "CPU")


def _generate(pipeline: Any, grammar: str, seed: int | None) -> str:
    import openvino_genai as ov_genai

    config = ov_genai.GenerationConfig()
    config.max_new_tokens = 400
    config.structured_output_config = ov_genai.StructuredOutputConfig(grammar=grammar)
    if seed is None:
        config.do_sample = False
    else:
        config.do_sample, config.temperature, config.rng_seed = True, 0.8, seed
    prompt = pipeline.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "Extract the findings as JSON: cough and fever for 3 days"}],
        add_generation_prompt=True,
    )
    return str(pipeline.generate(prompt, config))


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_decoding_under_the_grammar_writes_compact_valid_json(pipeline: Any, name: str) -> None:
    schema = SCHEMAS[name]
    grammar = compact_json_grammar(schema)
    assert grammar is not None
    # Sampling too, where the schema is small enough to finish quickly.
    for seed in (None, 7) if name in SAMPLED else (None,):
        text = _generate(pipeline, grammar, seed)
        value = json.loads(text)  # complete: the grammar leaves no room for runaway blanks
        jsonschema.validate(value, schema)
        assert not _blanks_outside_strings(text), text


def _blanks_outside_strings(text: str) -> list[int]:
    """Offsets of whitespace between JSON tokens."""
    found, in_string, escaped = [], False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch.isspace():
            found.append(i)
    return found
