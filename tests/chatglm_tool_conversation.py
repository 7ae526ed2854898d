"""The official tokenizers' tool conversation (tests/data/chatglm) as an OpenAI client sends it.

The fixture holds a GLM-family conversation (system with tools, user, assistant call, tool
observation) and what the official tokenizer built for it; both the unit test of the template
path and the HTTP test read it through this one conversion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data" / "chatglm"


@dataclass(frozen=True)
class ToolConversation:
    messages: list[dict[str, Any]]  # OpenAI chat messages, the call as ``tool_calls``
    tools: list[dict[str, Any]]  # OpenAI ``tools`` entries
    official_prompt: str | None  # prompt text, where the fixture recorded it
    num_official_ids: int


def official_tool_conversation(family: str) -> ToolConversation:
    """``family`` names the fixture: ``glm4-chatglm`` or ``chatglm3``."""
    conversation = json.loads((DATA / f"tokenizer_{family}.json").read_text(encoding="utf-8"))[
        "conversations"
    ]["tools"]
    system, user, call, observation = conversation["messages"]
    tools = [
        tool if "function" in tool else {"type": "function", "function": tool}
        for tool in system["tools"]
    ]
    messages = [{"role": "system", "content": system["content"]}] if system["content"] else []
    messages += [
        {"role": "user", "content": user["content"]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": call["metadata"], "arguments": call["content"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": observation["content"]},
    ]
    return ToolConversation(messages, tools, conversation.get("prompt"), len(conversation["ids"]))
