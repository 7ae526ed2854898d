"""The repaired SmolLM2 tokenizer in the prepared HF folder, and the repair itself on the real
GGUF-derived tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from medserve.installer.bundled_model import HF_MARKER, HF_NAME, default_home
from medserve.models.tokenizer_repair import (
    CHECK_MESSAGES,
    EOS,
    ROUND_TRIP_SAMPLES,
    TokenizerRepairError,
    chatml_prompt,
    repair_smollm2_tokenizer,
    verify_smollm2_tokenizer,
)

transformers = pytest.importorskip("transformers", reason="needs the [convert] extra")


@pytest.fixture(scope="module")
def hf_dir() -> Path:
    path = default_home() / "hf" / HF_NAME
    if not (path / HF_MARKER).is_file():
        pytest.fail(
            f"bundled model not prepared in {path.parent.parent}; run `medserve setup`",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
def tokenizer(hf_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


def test_prepared_folder_passes_verification(hf_dir: Path) -> None:
    verify_smollm2_tokenizer(hf_dir)


def test_eos_is_im_end_for_tokenizer_and_generation(tokenizer, hf_dir: Path) -> None:
    assert tokenizer.eos_token == EOS == "<|im_end|>"
    generation = transformers.GenerationConfig.from_pretrained(hf_dir)
    assert generation.eos_token_id == tokenizer.convert_tokens_to_ids(EOS) == 2


def test_no_bos_is_added(tokenizer) -> None:
    ids = tokenizer("The capital of France is Paris.")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[0] == "The"
    assert tokenizer.bos_token_id not in ids


@pytest.mark.parametrize("text", [*ROUND_TRIP_SAMPLES, "a   b\n\n\n  c  ", " "])
def test_text_with_spaces_round_trips(tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_spaces_are_byte_level_tokens_not_unk(tokenizer) -> None:
    tokens = tokenizer.tokenize("The capital of France")
    assert tokens == ["The", "Ġcapital", "Ġof", "ĠFrance"]


def test_chat_template_is_smollm2_chatml(tokenizer) -> None:
    prompt = tokenizer.apply_chat_template(
        list(CHECK_MESSAGES), tokenize=False, add_generation_prompt=True
    )
    assert prompt == chatml_prompt(CHECK_MESSAGES)
    assert prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    own_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(own_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_repair_fixes_the_tokenizer_transformers_derives_from_the_gguf(
    hf_dir: Path, tmp_path: Path
) -> None:
    gguf = default_home() / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.fail(f"{gguf} not present; run `medserve setup`", pytrace=False)
    broken = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    broken.save_pretrained(tmp_path)
    for name in ("config.json", "generation_config.json"):
        shutil.copy(hf_dir / name, tmp_path / name)

    with pytest.raises(TokenizerRepairError, match="eos_token"):
        verify_smollm2_tokenizer(tmp_path)

    repair_smollm2_tokenizer(tmp_path)
    verify_smollm2_tokenizer(tmp_path)
    repaired = transformers.AutoTokenizer.from_pretrained(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "Dose: 12.5 mg/kg — ask the doctor, 你好 🙂"
    assert repaired(text)["input_ids"] == reference(text)["input_ids"]
    assert len(repaired) == 49152


def test_verify_names_a_broken_chat_template(hf_dir: Path, tmp_path: Path) -> None:
    for path in hf_dir.iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, tmp_path / path.name)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    with pytest.raises(TokenizerRepairError, match="chat template"):
        verify_smollm2_tokenizer(tmp_path)
