"""What a chat request with tools turns the model's text into: OpenAI ``tool_calls``.

A forced call (``tool_choice`` required or named) was constrained to the call schema, so its
text always parses; with ``auto`` the model may answer in prose, which stays content.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medserve.accel.base import Turn
from medserve.server.structured_output import parse_tool_call


@dataclass(frozen=True)
class ToolCalls:
    tools: Sequence[Any]
    forced: bool

    def parse(self, text: str) -> list[dict[str, Any]] | None:
        """The OpenAI ``tool_calls`` list for ``text``, or None if it is not a call."""
        call = parse_tool_call(text.strip(), self.tools)
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


def with_system_note(turns: Sequence[Turn], note: str) -> list[Turn]:
    """``note`` added to the leading system turn (or as one): templates allow one system turn."""
    if turns and turns[0].role == "system":
        return [Turn("system", f"{turns[0].content}\n\n{note}"), *turns[1:]]
    return [Turn("system", note), *turns]
