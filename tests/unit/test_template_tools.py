"""Tools through the model's own chat template (GLM-4-9B-chat, ChatGLM3): how the tools and
calls reach the template, and how a reply in the model's call syntax becomes ``tool_calls``.

The rendering is checked against the official GLM-4 tokenizer's prompt for a tool
conversation (tests/data/chatglm), not against a copy of the template's own logic.
"""

from __future__ import annotations

import msgspec
import pytest
from medserve.accel.chat_template import ChatTemplate, message_tools_shape, template_messages
from medserve.accel.protocol import Add, CalledTool, Sampling, Turn, encode_frame, to_worker_decoder
from medserve.models.chatglm_templates import CHATGLM3_TEMPLATE, GLM4_CHATGLM_TEMPLATE
from medserve.models.tiny_chatglm_tokenizers import GLM4_HF_HUB_TEMPLATE
from medserve.models.tiny_glm4 import GLM4_CHAT_TEMPLATE
from medserve.server.schemas import Message, Tool
from medserve.server.structured_output import parse_template_call, template_tool
from medserve.server.tool_calls import ToolCalls, chat_turns

from tests.chatglm_tool_conversation import official_tool_conversation

LAB = msgspec.convert(
    {
        "type": "function",
        "function": {
            "name": "order_lab_test",
            "description": "Order a laboratory test",
            "parameters": {
                "type": "object",
                "properties": {
                    "test": {"enum": ["CBC", "CRP", "troponin"]},
                    "urgent": {"type": "boolean"},
                },
                "required": ["test", "urgent"],
                "additionalProperties": False,
            },
        },
    },
    Tool,
)
TOOLS = [LAB]


# -- the reply parser -----------------------------------------------------------------------


def test_glm4_call_syntax_is_a_call() -> None:
    text = 'order_lab_test\n{"test": "troponin", "urgent": true}'
    assert parse_template_call(text, TOOLS) == (
        "order_lab_test",
        '{"test": "troponin", "urgent": true}',
    )
    # ChatGLM3's template writes a space after the name line; surrounding blanks are noise.
    assert parse_template_call('\n order_lab_test\n {"test": "CBC", "urgent": false} \n', TOOLS)


@pytest.mark.parametrize(
    "text",
    [
        'find_bed\n{"test": "CBC", "urgent": false}',  # not one of the tools
        'order_lab_test\n{"test": "CBC", "urgent": fals',  # cut-off JSON
        'order_lab_test\n{"test": "MRI", "urgent": false}',  # not in the enum
        'order_lab_test\n{"test": "CBC"}',  # a required argument missing
        'order_lab_test\n["CBC", false]',  # arguments not an object
        'order_lab_test {"test": "CBC", "urgent": false}',  # no name line
        "Order a troponin, urgently.",  # prose
        "",
    ],
)
def test_anything_else_is_not_a_call(text: str) -> None:
    assert parse_template_call(text, TOOLS) is None


def test_chatglm3_tool_call_block_is_read_as_literals_never_run() -> None:
    block = "order_lab_test\n ```python\ntool_call(test='CRP', urgent=False)\n```"
    expected = ("order_lab_test", '{"test": "CRP", "urgent": false}')
    assert parse_template_call(block, TOOLS) == expected
    for code in (
        "tool_call(test=__import__('os').getcwd(), urgent=False)",  # not a literal
        "other_call(test='CRP', urgent=False)",
        "tool_call('CRP', False)",  # positional
        "tool_call(**{'test': 'CRP', 'urgent': False})",
        "tool_call(test='CRP', urgent=False",  # syntax error
    ):
        assert parse_template_call(f"order_lab_test\n```python\n{code}\n```", TOOLS) is None


def test_template_syntax_is_read_only_for_models_whose_template_taught_it() -> None:
    glm = 'order_lab_test\n{"test": "troponin", "urgent": true}'
    as_json = '{"name": "order_lab_test", "arguments": {"test": "troponin", "urgent": true}}'
    template = ToolCalls(TOOLS, forced=False, template_syntax=True)
    generic = ToolCalls(TOOLS, forced=False)
    for calls, text in ((template, glm), (template, as_json), (generic, as_json)):
        [call] = calls.parse(text) or []
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"] == {
            "name": "order_lab_test",
            "arguments": '{"test": "troponin", "urgent": true}',
        }
    assert generic.parse(glm) is None  # the generic path is unchanged
    assert template.parse("Troponin ordered.") is None


# -- what reaches the template --------------------------------------------------------------


def test_which_templates_take_tools_on_a_system_message() -> None:
    assert message_tools_shape(GLM4_CHATGLM_TEMPLATE) == "openai"
    assert message_tools_shape(CHATGLM3_TEMPLATE) == "functions"
    assert message_tools_shape(GLM4_CHAT_TEMPLATE) is None  # tiny-glm4: roles and text only
    assert message_tools_shape(GLM4_HF_HUB_TEMPLATE) is None  # reads a ``tools`` variable


def test_tools_go_on_the_leading_system_message() -> None:
    tool = template_tool(LAB)
    with_system = template_messages([Turn("system", "Be brief."), Turn("user", "Hi")], [tool])
    assert with_system[0] == {"role": "system", "content": "Be brief.", "tools": [tool]}
    without = template_messages([Turn("user", "Hi")], [tool])
    assert without[0] == {"role": "system", "content": "", "tools": [tool]}
    assert without[1] == {"role": "user", "content": "Hi"}
    bare = template_messages([Turn("user", "Hi")], [tool], "functions")
    assert bare[0]["tools"] == [tool["function"]]
    assert template_messages([Turn("user", "Hi")], [tool], None) == [
        {"role": "user", "content": "Hi"}
    ]


def test_template_tool_omits_fields_the_client_left_out() -> None:
    tool = msgspec.convert({"type": "function", "function": {"name": "ping"}}, Tool)
    assert template_tool(tool) == {"type": "function", "function": {"name": "ping"}}


def test_assistant_calls_stay_calls_only_for_template_tools() -> None:
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_dose", "arguments": "{}"}}]
    message = msgspec.convert({"role": "assistant", "tool_calls": calls}, Message)
    [generic] = chat_turns([message], template_tools=False)
    assert generic == Turn("assistant", '{"name": "get_dose", "arguments": {}}')
    [template] = chat_turns([message], template_tools=True)
    assert template == Turn("assistant", "", (CalledTool("get_dose", "{}"),))


def test_openai_conversation_renders_as_the_official_glm4_prompt() -> None:
    """An OpenAI tools request, through the server's conversion and the GLM-4 template, is
    the prompt the official GLM-4-9B-chat tokenizer builds for the same conversation."""
    conversation = official_tool_conversation("glm4-chatglm")
    tools = [msgspec.convert(tool, Tool) for tool in conversation.tools]
    turns = chat_turns([msgspec.convert(m, Message) for m in conversation.messages], True)
    messages = template_messages(turns, [template_tool(t) for t in tools], "openai")
    prompt = ChatTemplate(GLM4_CHATGLM_TEMPLATE).render(messages)
    assert prompt == conversation.official_prompt
    assert "\n## get_dose\n" in prompt and "<|observation|>" in prompt


def test_tools_and_calls_cross_the_worker_protocol() -> None:
    add = Add(
        request_id="r1",
        sampling=Sampling(max_tokens=8),
        messages=(Turn("assistant", "", (CalledTool("get_dose", '{"drug": "aspirin"}'),)),),
        tools=(template_tool(LAB),),
    )
    decoded = to_worker_decoder.decode(encode_frame(add)[4:])
    assert decoded == add
    # Old senders (no tools, no calls) still decode: both fields default to empty.
    plain = msgspec.msgpack.encode(
        {"type": "Add", "request_id": "r2", "sampling": {"max_tokens": 4},
         "messages": [{"role": "user", "content": "Hi"}]}
    )  # fmt: skip
    old = to_worker_decoder.decode(plain)
    assert old.tools == () and old.messages == (Turn("user", "Hi"),)
