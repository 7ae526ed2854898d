"""Tiny random GLM-4: built offline, exported to OpenVINO IR, generating through OpenVINO GenAI."""

from __future__ import annotations

from pathlib import Path

import pytest
from medserve.models.tiny_glm4 import CHECK_MESSAGES, build_tiny_glm4, glm4_prompt
from medserve.quant.export import REQUIRED_IR_FILES, is_valid_model_dir, read_manifest

pytest.importorskip("transformers", reason="needs the [convert] extra")
ov_genai = pytest.importorskip("openvino_genai")


@pytest.fixture(scope="module")
def model_dir(tiny_glm4_dir: Path) -> Path:
    return tiny_glm4_dir


def _greedy(max_new_tokens: int) -> object:
    config = ov_genai.GenerationConfig()
    config.max_new_tokens = max_new_tokens
    config.do_sample = False
    config.ignore_eos = True  # random weights may pick a stop token at once
    return config


def test_folder_is_a_valid_glm4_model(model_dir: Path) -> None:
    assert is_valid_model_dir(model_dir)
    assert all((model_dir / name).is_file() for name in REQUIRED_IR_FILES)
    manifest = read_manifest(model_dir)
    assert manifest is not None
    assert manifest["architecture"] == "glm4"
    assert manifest["precision"] == "fp32"
    assert manifest["context_length"] == 2048


def test_chat_template_renders_glm4_format(model_dir: Path) -> None:
    tokenizer = ov_genai.Tokenizer(str(model_dir))
    user_only = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(user_only, add_generation_prompt=True)
    assert prompt == "[gMASK]<sop><|user|>\nWhat is the capital of France?<|assistant|>"
    prompt = tokenizer.apply_chat_template(list(CHECK_MESSAGES), add_generation_prompt=True)
    assert prompt == glm4_prompt(CHECK_MESSAGES)


def test_special_tokens_are_single_tokens(model_dir: Path) -> None:
    tokenizer = ov_genai.Tokenizer(str(model_dir))
    ids = tokenizer.encode("[gMASK]<sop><|user|>").input_ids.data.tolist()[0]
    assert len(ids) == 3
    assert tokenizer.decode(ids, skip_special_tokens=True) == ""


def test_llm_pipeline_generates_tokens(model_dir: Path) -> None:
    pipeline = ov_genai.LLMPipeline(str(model_dir), "CPU")
    tokenizer = pipeline.get_tokenizer()
    prompt = tokenizer.apply_chat_template(list(CHECK_MESSAGES), add_generation_prompt=True)
    encoded = tokenizer.encode(prompt, add_special_tokens=False)
    result = pipeline.generate(encoded, _greedy(8))
    assert len(result.tokens[0]) == 8
    assert isinstance(pipeline.generate(prompt, _greedy(4)), str)


def test_continuous_batching_pipeline_generates_tokens(model_dir: Path) -> None:
    # The server's engine path: several prompts in one batch.
    scheduler = ov_genai.SchedulerConfig()
    scheduler.cache_size = 1
    pipeline = ov_genai.ContinuousBatchingPipeline(str(model_dir), scheduler, "CPU")
    prompts = [glm4_prompt([{"role": "user", "content": q}]) for q in ("Hi", "Dose of aspirin?")]
    results = pipeline.generate(prompts, [_greedy(6), _greedy(6)])
    assert [len(r.m_generation_ids) for r in results] == [1, 1]
    assert all(isinstance(r.m_generation_ids[0], str) for r in results)


def test_same_seed_rebuild_is_skipped(model_dir: Path) -> None:
    weights = model_dir / "openvino_model.bin"
    before = weights.stat().st_mtime_ns
    assert build_tiny_glm4(model_dir, seed=0) == model_dir
    assert weights.stat().st_mtime_ns == before  # nothing was rebuilt
