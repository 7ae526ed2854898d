"""ChatGLM-family tokenizers converted without remote code give the official tokenizer's ids.

The expected ids in tests/data/chatglm/tokenizer_<family>.json were recorded once by running
the official tokenization_chatglm.py of each repository (and transformers for the -hf / 0414
tokenizer.json) on the same tiny tokenizer files these tests build; tests/data/chatglm/README.md
says exactly how. Here the tiny files are rebuilt, converted by medserve, and both the HF fast
tokenizer and the OpenVINO tokenizer IRs (converted the way ``optimum-cli`` does during
``medserve export``) must reproduce those ids, prompts and decodings.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from medserve.models.chatglm_tokenizer import (
    FAMILIES,
    TokenizerConversionError,
    convert_chatglm_tokenizer,
    detect_family,
)
from medserve.models.tiny_chatglm_tokenizers import (
    REMOTE_CODE_MARKER,
    tiny_vocab_size,
    write_tiny_tokenizer_files,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "chatglm"
MODEL_TYPES = {"glm4-hf": "glm", "glm4-0414": "glm4"}
# Templates of the -hf / 0414 hub repositories call tool.get(...) and tojson with keywords,
# which OpenVINO GenAI's template engine rejects; the server sends no tools.
OV_TOOLS_UNSUPPORTED = ("glm4-hf", "glm4-0414")


def _fixture(family: str) -> dict:
    return json.loads((DATA / f"tokenizer_{family}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
    """(family, hub-layout folder, converted folder with tokenizer IRs, TokenizerFamily)."""
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    family = request.param
    root = tmp_path_factory.mktemp(family)
    src, out = root / "hub", root / "converted"
    write_tiny_tokenizer_files(src, family)
    config = {"model_type": MODEL_TYPES.get(family, "chatglm"), "seq_length": 2048}
    (src / "config.json").write_text(json.dumps(config), encoding="utf-8")
    result = convert_chatglm_tokenizer(src, out)
    # What optimum-cli does during `medserve export`.
    tokenizer, detokenizer = convert_tokenizer(
        AutoTokenizer.from_pretrained(str(out)), with_detokenizer=True
    )
    ov.save_model(tokenizer, out / "openvino_tokenizer.xml")
    ov.save_model(detokenizer, out / "openvino_detokenizer.xml")
    return family, src, out, result


@pytest.fixture(scope="module")
def hf(converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(converted[2]), local_files_only=True)


@pytest.fixture(scope="module")
def ir(converted):
    import openvino_genai

    return openvino_genai.Tokenizer(str(converted[2]))


def _prompt_kwargs(conversation: dict) -> dict:
    return {"tools": conversation["tools"]} if conversation.get("tools") else {}


def test_hf_chat_prompt_ids_equal_official(converted, hf):
    family = converted[0]
    for name, conversation in _fixture(family)["conversations"].items():
        prompt = hf.apply_chat_template(
            conversation["messages"],
            tokenize=False,
            add_generation_prompt=True,
            **_prompt_kwargs(conversation),
        )
        if family == "chatglm2":  # build_prompt's text; chat() adds [gMASK] sop as ids
            assert prompt == "[gMASK]<sop>" + conversation["prompt"], name
        elif "prompt" in conversation:  # GLM-4: the official template's text, byte for byte
            assert prompt == conversation["prompt"], name
        assert hf.encode(prompt, add_special_tokens=False) == conversation["ids"], name


def test_hf_encode_decode_equal_official(converted, hf):
    for sample in _fixture(converted[0])["samples"]:
        text = sample["text"]
        assert hf.encode(text, add_special_tokens=False) == sample["ids"], text
        assert hf.encode(text) == sample["ids_with_prefix"], text
        assert hf.decode(sample["ids"]) == sample["decoded"], text


def test_ir_chat_prompt_ids_equal_official(converted, hf, ir):
    family = converted[0]
    for name, conversation in _fixture(family)["conversations"].items():
        if conversation.get("tools") and family in OV_TOOLS_UNSUPPORTED:
            continue
        messages = [dict(m) for m in conversation["messages"]]
        prompt = ir.apply_chat_template(
            messages, add_generation_prompt=True, **_prompt_kwargs(conversation)
        )
        expected = hf.apply_chat_template(
            conversation["messages"],
            tokenize=False,
            add_generation_prompt=True,
            **_prompt_kwargs(conversation),
        )
        assert prompt == expected, name
        ids = ir.encode(prompt, add_special_tokens=False).input_ids.data.tolist()[0]
        assert ids == conversation["ids"], name


def test_ir_encode_decode_equal_official(converted, ir):
    for sample in _fixture(converted[0])["samples"]:
        text = sample["text"]
        ids = ir.encode(text, add_special_tokens=False).input_ids.data.tolist()[0]
        assert ids == sample["ids"], text
        assert ir.encode(text).input_ids.data.tolist()[0] == sample["ids_with_prefix"], text
        assert ir.decode(ids) == sample["decoded"], text


def test_words_containing_sop_or_eop_stay_words(converted, hf):
    """'people' contains 'eop' and 'isopropyl' 'sop': no special token may appear inside."""
    special_ids = set(hf.all_special_ids) | {hf.convert_tokens_to_ids("<sop>")}
    special_ids |= {hf.convert_tokens_to_ids("<eop>")}
    ids = hf.encode("people isopropyl sop eop", add_special_tokens=False)
    assert not special_ids & set(ids)


@pytest.mark.parametrize("family", ["chatglm3", "glm4-chatglm"])
def test_openai_roles_and_tool_calls_render_as_the_official_turns(family, tmp_path):
    """OpenAI's developer / tool roles and assistant tool_calls (what an API client sends)
    render as the official system / observation / metadata turns, in HF and in the IR."""
    import openvino as ov
    import openvino_genai
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    write_tiny_tokenizer_files(tmp_path / "hub", family)
    (tmp_path / "hub" / "config.json").write_text('{"model_type": "chatglm"}', encoding="utf-8")
    convert_chatglm_tokenizer(tmp_path / "hub", tmp_path / "out")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for model, name in zip(convert_tokenizer(hf, with_detokenizer=True), ("", "de"), strict=True):
        ov.save_model(model, tmp_path / "out" / f"openvino_{name}tokenizer.xml")
    ir = openvino_genai.Tokenizer(str(tmp_path / "out"))
    conversation = _fixture(family)["conversations"]["tools"]
    openai_style = []
    for message in conversation["messages"]:
        message = {**message, "role": {"observation": "tool"}.get(message["role"], message["role"])}
        if message["role"] == "system":
            message["role"] = "developer"
        if message.get("metadata"):  # an assistant tool call
            call = {"name": message.pop("metadata"), "arguments": message["content"]}
            message.update(
                content="", tool_calls=[{"id": "c1", "type": "function", "function": call}]
            )
        openai_style.append(message)
    for rendered in (
        hf.apply_chat_template(openai_style, tokenize=False, add_generation_prompt=True),
        ir.apply_chat_template(openai_style, add_generation_prompt=True),
    ):
        assert "<|observation|>" in rendered
        assert hf.encode(rendered, add_special_tokens=False) == conversation["ids"]


def test_stop_ids_are_the_family_end_tokens(converted, hf):
    family, _, _, result = converted
    expected = {
        "chatglm2": ("</s>",),
        "chatglm3": ("</s>", "<|user|>", "<|observation|>"),
    }.get(family, ("<|endoftext|>", "<|user|>", "<|observation|>"))
    assert result.stop_tokens == expected
    assert result.stop_token_ids == tuple(hf.convert_tokens_to_ids(t) for t in expected)
    assert result.eos_token_id == hf.eos_token_id == result.stop_token_ids[0]
    assert result.vocab_size == tiny_vocab_size(family) == len(hf)
    assert result.name == detect_family(converted[1]) == family


def test_converted_folder_holds_no_remote_code(converted):
    family, src, out, _ = converted
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "auto_map" not in config
    assert config["chat_template"]
    assert not list(out.glob("*.py"))
    assert not (out / "tokenizer.model").exists()
    assert {"tokenizer.json", "special_tokens_map.json"} <= {p.name for p in out.iterdir()}
    # Everything above loaded both folders' tokenizers: the stand-in never ran.
    assert not (src / REMOTE_CODE_MARKER).exists()
    if family in ("chatglm2", "chatglm3", "glm4-chatglm"):
        assert "auto_map" in json.loads((src / "tokenizer_config.json").read_text("utf-8"))


def test_stand_in_marks_its_import(tmp_path):
    """The marker check above can fail: importing the stand-in does write the marker."""
    write_tiny_tokenizer_files(tmp_path, "chatglm3")
    spec = importlib.util.spec_from_file_location("stand_in", tmp_path / "tokenization_chatglm.py")
    with pytest.raises(RuntimeError, match="remote code"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert (tmp_path / REMOTE_CODE_MARKER).exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_files_are_deterministic_hub_layouts(family, tmp_path):
    write_tiny_tokenizer_files(tmp_path / "a", family)
    write_tiny_tokenizer_files(tmp_path / "b", family)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    if family in ("glm4-hf", "glm4-0414"):
        assert names == ["tokenizer.json", "tokenizer_config.json"]
    else:
        assert names == ["tokenization_chatglm.py", "tokenizer.model", "tokenizer_config.json"]
        first = (tmp_path / "a" / "tokenizer.model").read_bytes()[:1]
        assert (first == b"\x0a") == (family != "glm4-chatglm")  # protobuf vs base64 text
    limit = 1536 if family.startswith("glm4") else 1024
    assert tiny_vocab_size(family) <= limit


def test_unsupported_folders_are_refused_with_the_reason(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    with pytest.raises(TokenizerConversionError, match="not a ChatGLM family"):
        detect_family(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "chatglm"}', encoding="utf-8")
    (tmp_path / "ice_text.model").write_bytes(b"\x0a\x00")
    with pytest.raises(TokenizerConversionError, match="first-generation ChatGLM-6B"):
        detect_family(tmp_path)
    write_tiny_tokenizer_files(tmp_path, "chatglm2")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text("utf-8"))
    config["added_tokens_decoder"] = {"7": {"content": "[gMASK]"}}  # disagrees with the model
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(TokenizerConversionError, match=r"\[gMASK\] has id 7"):
        convert_chatglm_tokenizer(tmp_path, tmp_path / "out")
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
