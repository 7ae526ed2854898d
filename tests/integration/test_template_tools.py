"""Tools through the model's own chat template, over real HTTP.

GLM-4-9B-chat (``chatglm`` layout) and ChatGLM3 templates describe tools given on a system
message and write assistant calls in the model's syntax; the server sends them there instead
of its generic note. The prompt the engine built is checked by its length against the ids the
official tokenizers build for the same conversation (tests/data/chatglm), so a server that
fell back to the generic note, or dropped a call or a tool turn, fails. GLM-4-9B-chat-hf,
whose template reads tools from another variable, is the control: it keeps the generic note.

The tiny GLM exports have random weights: under constrained decoding they write the blanks the
JSON grammar admits between tokens for ever (and the ChatGLM3 one, sampled, picks a padded
vocabulary id that crashes GenAI's grammar matcher), so no forced call of theirs completes.
That a forced call through the GLM-4 template is complete and valid is checked on the bundled
135M model given GLM-4-9B-chat's template: the same server and engine path, a model that
writes JSON.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import msgspec
import pytest
from medserve.models.chatglm_templates import GLM4_CHATGLM_TEMPLATE
from medserve.server.schemas import Tool
from medserve.server.structured_output import tools_instruction
from transformers import AutoTokenizer

from tests.chatglm_tool_conversation import official_tool_conversation
from tests.conftest import BUNDLED_MODEL
from tests.integration.test_structured_output import LAB_TOOL, WARD_TOOL
from tests.server_process import ServerProcess

GLM4 = "tiny-glm4-chatglm-fp16"
CHATGLM3 = "tiny-chatglm3-fp16"
GLM4_HF = "tiny-glm4-hf-fp16"  # template reads a ``tools`` variable: the generic path
SMOL_GLM4 = "smollm2-glm4-template"  # the bundled model with GLM-4-9B-chat's template
FAMILY = {GLM4: "glm4-chatglm", CHATGLM3: "chatglm3"}
ASK = [{"role": "user", "content": "Chest pain for two hours. Order a troponin, urgently."}]
LAB_ONLY = {"type": "function", "function": {"name": "order_lab_test"}}


def _with_glm4_template(src: Path, out: Path) -> Path:
    """A copy of model folder ``src`` whose chat template is GLM-4-9B-chat's (weights linked)."""
    import openvino as ov
    import openvino_tokenizers  # noqa: F401  (registers the tokenizer operations)

    out.mkdir()
    for path in src.iterdir():
        if not path.name.startswith(("openvino_tokenizer.", "chat_template")):
            (out / path.name).symlink_to(path)
    tokenizer = ov.Core().read_model(src / "openvino_tokenizer.xml")
    tokenizer.set_rt_info(GLM4_CHATGLM_TEMPLATE, "chat_template")  # what GenAI renders
    ov.save_model(tokenizer, out / "openvino_tokenizer.xml")
    (out / "chat_template.jinja").write_text(GLM4_CHATGLM_TEMPLATE, encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def tools_models(
    glm_fp16_exports: dict[str, Path], models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tools_models")
    folders = {name: root / name for name in (GLM4, CHATGLM3, GLM4_HF)}
    for name, folder in folders.items():
        shutil.copytree(glm_fp16_exports[name], folder)
    folders[SMOL_GLM4] = _with_glm4_template(models_dir / BUNDLED_MODEL, root / SMOL_GLM4)
    return folders


@pytest.fixture(scope="module")
def tools_server(
    tools_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {
        "MEDSERVE_ENGINE_MODELS_DIR": str(tools_models[GLM4].parent),
        "MEDSERVE_ENGINE_MODEL": GLM4,
        "MEDSERVE_ENGINE_SERVED_MODELS": f"{CHATGLM3},{GLM4_HF},{SMOL_GLM4}",
        "MEDSERVE_ENGINE_KV_CACHE_GB": "1",
        "MEDSERVE_ENGINE_MAX_NUM_SEQS": "2",
        "MEDSERVE_CASES_ENABLED": "false",
    }
    with ServerProcess.start(tmp_path_factory.mktemp("tools_server"), env=env) as server:
        yield server


def _chat(server: ServerProcess, model: str, **body: Any) -> dict[str, Any]:
    body = {"model": model, "temperature": 0, "max_tokens": 16, **body}
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def _hf_prompt(folder: Path, messages: list[dict[str, Any]]) -> tuple[str, int]:
    """The prompt text and its token count as the folder's own HF tokenizer renders them."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("model", [GLM4, CHATGLM3])
def test_tool_conversation_prompt_is_the_official_one(
    model: str, tools_server: ServerProcess
) -> None:
    conversation = official_tool_conversation(FAMILY[model])
    body = _chat(
        tools_server,
        model,
        messages=conversation.messages,
        tools=conversation.tools,
        tool_choice="auto",
    )
    assert body["usage"]["prompt_tokens"] == conversation.num_official_ids
    message = body["choices"][0]["message"]
    assert message["content"] is not None or message["tool_calls"]


@pytest.mark.parametrize(
    ("model", "tool_choice"),
    [(GLM4, "required"), (GLM4, LAB_ONLY), (CHATGLM3, "required"), (SMOL_GLM4, "required")],
)
def test_forced_call_is_prompted_through_the_template(
    model: str, tool_choice: Any, tools_server: ServerProcess, tools_models: dict[str, Path]
) -> None:
    tools = [LAB_TOOL, WARD_TOOL]
    body = _chat(tools_server, model, messages=ASK, tools=tools, tool_choice=tool_choice)
    system = {"role": "system", "content": "", "tools": tools}
    if model == CHATGLM3:  # its template prints the bare functions, as its demo passes them
        system["tools"] = [tool["function"] for tool in tools]
    text, num_tokens = _hf_prompt(tools_models[model], [system, *ASK])
    assert ("\n## order_lab_test\n" if model != CHATGLM3 else '"name": "order_lab_test"') in text
    assert body["usage"]["prompt_tokens"] == num_tokens


@pytest.mark.parametrize("tool_choice", ["required", LAB_ONLY])
def test_forced_call_through_the_glm4_template_is_valid(
    tool_choice: Any, tools_server: ServerProcess
) -> None:
    tools = [LAB_TOOL, WARD_TOOL]
    body = _chat(
        tools_server, SMOL_GLM4, messages=ASK, tools=tools, tool_choice=tool_choice, max_tokens=80
    )
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    name = call["function"]["name"]
    if tool_choice == LAB_ONLY:
        assert name == "order_lab_test"
    tool = {"order_lab_test": LAB_TOOL, "find_bed": WARD_TOOL}[name]
    jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])


def test_streamed_forced_call_arrives_as_one_delta(tools_server: ServerProcess) -> None:
    body = {
        "model": SMOL_GLM4, "messages": ASK, "tools": [LAB_TOOL], "tool_choice": LAB_ONLY,
        "temperature": 0, "max_tokens": 80, "stream": True,
    }  # fmt: skip
    events = []
    with httpx.stream(
        "POST", tools_server.base_url + "/v1/chat/completions", json=body, timeout=120
    ) as response:
        assert response.status_code == 200
        events = [json.loads(x[6:]) for x in response.iter_lines() if x.startswith("data: {")]
    deltas = [e["choices"][0]["delta"].get("tool_calls") for e in events if e["choices"]]
    [[call]] = [d for d in deltas if d]
    assert call["function"]["name"] == "order_lab_test"
    jsonschema.validate(
        json.loads(call["function"]["arguments"]), LAB_TOOL["function"]["parameters"]
    )
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_other_templates_keep_the_generic_tool_note(
    tools_server: ServerProcess, tools_models: dict[str, Path]
) -> None:
    tools = [LAB_TOOL]
    body = _chat(tools_server, GLM4_HF, messages=ASK, tools=tools, tool_choice="required")
    note = tools_instruction([msgspec.convert(t, Tool) for t in tools])
    system = {"role": "system", "content": note}
    _, num_tokens = _hf_prompt(tools_models[GLM4_HF], [system, *ASK])
    assert body["usage"]["prompt_tokens"] == num_tokens
