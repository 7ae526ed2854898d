"""What a chat request with tools turns the model's text into: OpenAI ``tool_calls``.

A forced call (``tool_choice`` required or named) was constrained to the call schema, so its
text always parses; with ``auto`` the model may answer in prose, which stays content. A model
whose chat template describes the tools itself (GLM-4-9B-chat, ChatGLM3) was shown its own
call syntax, so its answers are also read in that syntax.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medserve.accel.base import CalledTool, Turn
from medserve.server.structured_output import parse_template_call, parse_tool_call


@dataclass(frozen=True)
class ToolCalls:
    tools: Sequence[Any]
    forced: bool
    template_syntax: bool = False
    """Also read a call in the chat template's own syntax (ModelInfo.template_tools)."""

    def parse(self, text: str) -> list[dict[str, Any]] | None:
        """The OpenAI ``tool_calls`` list for ``text``, or None if it is not a call."""
        call = parse_tool_call(text.strip(), self.tools)
        if call is None and self.template_syntax:
            call = parse_template_call(text, self.tools)
        if call is None:
            return None
        name, arguments = call
        return [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        ]


def chat_turns(messages: Sequence[Any], template_tools: bool) -> list[Turn]:
    """The request's messages as turns; assistant calls stay calls when the template writes
    them in the model's syntax (``template_tools``), else become the JSON the model was told
    to write (Message.text())."""
    return [_turn(message, template_tools) for message in messages]


def _turn(message: Any, template_tools: bool) -> Turn:
    if not (template_tools and message.tool_calls):
        return Turn(role=message.role, content=message.text())
    content = message.text() if message.content else ""
    calls = tuple(CalledTool(c.function.name, c.function.arguments) for c in message.tool_calls)
    return Turn(role=message.role, content=content, tool_calls=calls)


def with_system_note(turns: Sequence[Turn], note: str) -> list[Turn]:
    """``note`` added to the leading system turn (or as one): templates allow one system turn."""
    if turns and turns[0].role == "system":
        return [Turn("system", f"{turns[0].content}\n\n{note}"), *turns[1:]]
    return [Turn("system", note), *turns]
