"""Chat templates that render the ChatGLM2 / ChatGLM3 / GLM-4 (chatglm layout) prompts.

Why here and not in the checkpoint: ChatGLM2 has no template at all (its prompt is built by
``build_prompt`` in remote code), ChatGLM3's official prompt is built by ``build_chat_input``
from separately encoded pieces, and GLM-4's template names roles the OpenAI API does not send.
These templates produce text whose encoding by the converted tokenizer gives exactly the ids
the official code builds (tests/data/chatglm holds the oracle's ids):

* ChatGLM3: ``[gMASK]<sop><|role|>{metadata}\\n {content}``... ``<|assistant|>``. The space
  before the content stands for the second SentencePiece dummy prefix that
  ``build_single_message`` gets by encoding ``"{metadata}\\n"`` and the content separately.
* ChatGLM2: ``[gMASK]<sop>[Round 1]\\n\\n问：...\\n\\n答：...``; a system message is prepended to
  the last question, as ChatGLM2's own OpenAI API server does (the model has no system role).
* GLM-4: ``[gMASK]<sop><|role|>{metadata}\\n{content}``..., messages with empty content skipped,
  function tools rendered as GLM-4-9B-chat's template renders under transformers (whose
  ``trim_blocks`` eats the first newline of ``\\n\\n## name``).

OpenAI roles map onto the family's: ``tool`` -> ``observation``, ``developer`` -> ``system``.
Every literal is written inside ``{{ }}`` so the rendering does not depend on the Jinja
engine's whitespace settings (transformers trims blocks, OpenVINO GenAI's engine may not).
"""

from __future__ import annotations

# Role names of the OpenAI API mapped onto ChatGLM3 / GLM-4 roles.
_ROLE = (
    "{%- set role = message['role'] -%}"
    "{%- if role == 'tool' -%}{%- set role = 'observation' -%}"
    "{%- elif role == 'developer' -%}{%- set role = 'system' -%}{%- endif -%}"
)
_METADATA = (
    "(message['metadata'] if message['metadata'] is defined and message['metadata'] else '')"
)


def _tool_calls(separator: str) -> str:
    """OpenAI ``tool_calls`` as the family writes a call: ``<|assistant|>{name}\\n{arguments}``
    (the function name is the turn's metadata). Rendering them also tells OpenVINO GenAI's
    template engine that the template supports tools, so it passes ``tool`` messages through
    instead of rewriting them as user messages."""
    return (
        "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
        "{%- for call in message['tool_calls'] -%}"
        "{%- set function = call['function'] if call['function'] is defined else call -%}"
        "{%- if function['arguments'] is string -%}{%- set arguments = function['arguments'] -%}"
        "{%- else -%}{%- set arguments = function['arguments'] | tojson -%}{%- endif -%}"
        "{{ '<|assistant|>' + function['name'] + '\\n" + separator + "' + arguments }}"
        "{%- endfor -%}"
        "{%- endif -%}"
    )


CHATGLM3_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}{{ '[gMASK]<sop>' }}{%- endif -%}"
    + _ROLE
    + "{%- set content = message['content'] -%}"
    "{%- if role == 'system' and message['tools'] is defined -%}"
    "{%- set content = content + '\\n' + (message['tools'] | tojson(indent=4)) -%}"
    "{%- endif -%}"
    "{%- if content or not (message['tool_calls'] is defined and message['tool_calls']) -%}"
    "{{ '<|' + role + '|>' + " + _METADATA + " + '\\n' }}"
    "{%- if content -%}{{ ' ' + content }}{%- endif -%}"
    "{%- endif -%}" + _tool_calls(" ") + "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)

CHATGLM2_TEMPLATE = (
    "{{ '[gMASK]<sop>' }}"
    "{%- set ns = namespace(system='', query='', pending=false, round=1) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] in ['system', 'developer'] and loop.first -%}"
    "{%- set ns.system = message['content'] -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- set ns.query = message['content'] -%}{%- set ns.pending = true -%}"
    "{%- elif message['role'] == 'assistant' and ns.pending -%}"
    "{{ '[Round ' + ns.round | string + ']\\n\\n问：' + ns.query + '\\n\\n答：'"
    " + message['content'] + '\\n\\n' }}"
    "{%- set ns.round = ns.round + 1 -%}{%- set ns.pending = false -%}"
    "{%- else -%}"
    "{{ raise_exception('ChatGLM2 has no ' + message['role'] + ' role here: use system (first), "
    "then user and assistant turns') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.pending -%}"
    "{{ '[Round ' + ns.round | string + ']\\n\\n问：' + ns.system + ns.query + '\\n\\n答：' }}"
    "{%- endif -%}"
)

# GLM-4-9B-chat's own system prompt and instruction for function tools (its template's text).
GLM4_TOOLS_PREAMBLE = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\\n\\n# 可用工具"
)
GLM4_CALL_HINT = "在调用上述函数时，请使用 Json 格式表示调用的参数。"

GLM4_CHATGLM_TEMPLATE = (
    "{{ '[gMASK]<sop>' }}"
    "{%- for message in messages -%}" + _ROLE + "{%- if message['tools'] is defined -%}"
    "{{ '<|system|>\\n" + GLM4_TOOLS_PREAMBLE + "' }}"
    "{%- for tool in message['tools'] -%}"
    "{%- if tool['type'] == 'function' -%}"
    "{{ '\\n## ' + tool['function']['name'] + '\\n\\n' + (tool['function'] | tojson(indent=4))"
    " + '\\n" + GLM4_CALL_HINT + "' }}"
    "{%- else -%}{{ raise_exception('only function tools are supported') }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['content'] -%}"
    "{{ '<|' + role + '|>' + " + _METADATA + " + '\\n' + message['content'] }}"
    "{%- endif -%}" + _tool_calls("") + "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)
