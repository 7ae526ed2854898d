"""Render a Hugging Face chat template (Jinja) the way transformers does, without transformers.

The GGML engines get their template from the model file (GGUF ``tokenizer.chat_template``)
and run in environments without transformers. Rendering must match
``tokenizer.apply_chat_template(..., tokenize=False, add_generation_prompt=True)`` exactly, or
the same model would see a different prompt on llama.cpp than on OpenVINO: same sandbox, same
whitespace rules, same ``tojson``, same ``raise_exception``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar, Literal

import jinja2
import jinja2.ext
import jinja2.sandbox
from medserve.accel.protocol import Turn

# How GLM-4-9B-chat's and ChatGLM3's templates (models/chatglm_templates.py) take tools: as a
# ``tools`` key of a system message, not as the ``tools`` variable newer templates read.
_MESSAGE_TOOLS = "message['tools']"
ToolShape = Literal["openai", "functions"]
"""OpenAI tools (``{"type": "function", "function": {...}}``, GLM-4-9B-chat's template reads
``tool['function']``) or bare function objects (ChatGLM3's template prints the list as its
official demo passes it)."""


class ChatTemplateError(ValueError):
    """The template refused the conversation (e.g. roles out of order)."""


class _GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}`` marks assistant text for training masks; ignore it."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationTag, jinja2.ext.loopcontrols],
        )
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = environment.from_string(source)
        self._specials = {"bos_token": bos_token, "eos_token": eos_token}

    def render(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **self._specials,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template failed: {exc}") from exc


def message_tools_shape(source: str) -> ToolShape | None:
    """How the template takes tools on a system message, or None if it does not."""
    if _MESSAGE_TOOLS not in source:
        return None
    return "openai" if "tool['function']" in source else "functions"


def template_messages(
    turns: Sequence[Turn],
    tools: Sequence[Mapping[str, Any]] = (),
    shape: ToolShape | None = "openai",
) -> list[dict[str, Any]]:
    """The turns as template messages, ``tools`` on the leading system message (one is added
    if there is none) and assistant calls as OpenAI ``tool_calls``, which the template writes
    in the model's own syntax. ``shape`` None (a template that takes no tools) drops them."""
    messages: list[dict[str, Any]] = [_message(turn) for turn in turns]
    if tools and shape is not None:
        if not messages or messages[0]["role"] not in ("system", "developer"):
            messages.insert(0, {"role": "system", "content": ""})
        messages[0]["tools"] = [
            dict(tool) if shape == "openai" else dict(tool["function"]) for tool in tools
        ]
    return messages


def _message(turn: Turn) -> dict[str, Any]:
    message: dict[str, Any] = {"role": turn.role, "content": turn.content}
    if turn.tool_calls:
        message["tool_calls"] = [
            {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in turn.tool_calls
        ]
    return message
