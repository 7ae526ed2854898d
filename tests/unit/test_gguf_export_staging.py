"""The data-only copy llama.cpp's converter reads (quant/gguf_staging.py), the converter fixes
that need no converter (quant/gguf_convert_job.py), and what `export_gguf` refuses before any
conversion starts. No llama.cpp needed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from medserve.models.tiktoken_ranks import GLM4_PATTERN
from medserve.quant import gguf_export
from medserve.quant.export import ExportError
from medserve.quant.gguf_convert_job import (
    RemoteCodeRefused,
    add_chatglm_keys,
    is_sentencepiece,
    pre_tokenizer_by_pattern,
    refuse_remote_code,
)
from medserve.quant.gguf_export import export_gguf
from medserve.quant.gguf_staging import StagingError, link_file, stage_hf_folder

AUTO_MAP = {"AutoConfig": "configuration_x.XConfig", "AutoModel": "modeling_x.XModel"}


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    """A folder shaped like a remote-code checkpoint: weights, code, auto_map everywhere."""
    folder = tmp_path / "hf"
    folder.mkdir()
    _write_json(folder / "config.json", {"model_type": "x", "auto_map": AUTO_MAP, "seq_length": 8})
    _write_json(
        folder / "tokenizer_config.json",
        {"auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}, "eos_token": "</s>"},
    )
    _write_json(folder / "generation_config.json", {"eos_token_id": 2})
    (folder / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 1024)
    (folder / "pytorch_model.bin").write_bytes(b"\1" * 512)
    (folder / "tokenizer.model").write_bytes(b"\2" * 64)
    (folder / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    for code in ("modeling_x.py", "configuration_x.py", "tokenization_x.py", "helper.cpython.pyc"):
        (folder / code).write_text("raise SystemExit('remote code ran')", encoding="utf-8")
    (folder / "original").mkdir()
    (folder / "original" / "consolidated.pth").write_bytes(b"\3")
    (folder / ".cache").mkdir()
    return folder


def test_no_code_and_no_auto_map_reach_the_staged_folder(hf_dir: Path, tmp_path: Path) -> None:
    staged = stage_hf_folder(hf_dir, tmp_path / "staged")

    names = sorted(p.name for p in staged.path.iterdir())
    assert names == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model-00001-of-00001.safetensors",
        "pytorch_model.bin",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert not list(staged.path.rglob("*.py*"))
    for name in ("config.json", "tokenizer_config.json"):
        assert "auto_map" not in json.loads((staged.path / name).read_text(encoding="utf-8"))
    assert sorted(staged.sanitized) == ["config.json", "tokenizer_config.json"]
    assert set(staged.skipped) >= {"modeling_x.py", "helper.cpython.pyc", "original", ".cache"}


def test_other_keys_and_files_are_kept_exactly(hf_dir: Path, tmp_path: Path) -> None:
    staged = stage_hf_folder(hf_dir, tmp_path / "staged").path

    assert json.loads((staged / "config.json").read_text(encoding="utf-8")) == {
        "model_type": "x",
        "seq_length": 8,
    }
    assert json.loads((staged / "tokenizer_config.json").read_text(encoding="utf-8")) == {
        "eos_token": "</s>"
    }
    # Files without auto_map are byte-for-byte copies.
    for name in ("generation_config.json", "tokenizer.model", "chat_template.jinja"):
        assert (staged / name).read_bytes() == (hf_dir / name).read_bytes()


def test_weights_are_linked_and_the_rest_copied(hf_dir: Path, tmp_path: Path) -> None:
    staged = stage_hf_folder(hf_dir, tmp_path / "staged")

    for name in ("model-00001-of-00001.safetensors", "pytorch_model.bin"):
        assert os.path.samefile(staged.path / name, hf_dir / name)
    for name in ("config.json", "tokenizer.model", "chat_template.jinja"):
        assert not os.path.samefile(staged.path / name, hf_dir / name)
        assert not (staged.path / name).is_symlink()
    assert sorted(staged.linked) == ["model-00001-of-00001.safetensors", "pytorch_model.bin"]


def test_rewriting_the_staged_copy_leaves_the_source_alone(hf_dir: Path, tmp_path: Path) -> None:
    before = (hf_dir / "config.json").read_bytes()
    staged = stage_hf_folder(hf_dir, tmp_path / "staged").path
    (staged / "config.json").write_text("{}", encoding="utf-8")
    (staged / "tokenizer.model").write_bytes(b"changed")
    assert (hf_dir / "config.json").read_bytes() == before
    assert (hf_dir / "tokenizer.model").read_bytes() == b"\2" * 64


def test_hub_cache_symlinks_are_followed_to_the_blobs(tmp_path: Path) -> None:
    # A hub cache snapshot: every file is a symlink to a blob with no suffix.
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    (blobs / "aaa").write_bytes(b"weights")
    (blobs / "bbb").write_text(json.dumps({"model_type": "x", "auto_map": AUTO_MAP}))
    (snapshot / "model.safetensors").symlink_to(blobs / "aaa")
    (snapshot / "config.json").symlink_to(blobs / "bbb")

    staged = stage_hf_folder(snapshot, tmp_path / "staged").path

    assert os.path.samefile(staged / "model.safetensors", blobs / "aaa")
    assert not (staged / "config.json").is_symlink()
    assert json.loads((staged / "config.json").read_text()) == {"model_type": "x"}


def test_a_symlink_when_hard_links_fail(
    hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(src: object, dst: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    link_file(hf_dir / "pytorch_model.bin", tmp_path / "w.bin")
    assert (tmp_path / "w.bin").is_symlink()
    assert (tmp_path / "w.bin").resolve() == (hf_dir / "pytorch_model.bin").resolve()


def test_unreadable_json_is_refused_by_name(hf_dir: Path, tmp_path: Path) -> None:
    (hf_dir / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(StagingError, match=r"tokenizer_config\.json is not readable JSON"):
        stage_hf_folder(hf_dir, tmp_path / "staged")


def test_the_staged_folder_must_be_new(hf_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "staged").mkdir()
    with pytest.raises(FileExistsError):
        stage_hf_folder(hf_dir, tmp_path / "staged")


def test_glm_keys_get_their_chatglm_spelling() -> None:
    # What GLM-4-9B-chat-hf states; llama.cpp's ChatGLMModel reads only the chatglm names.
    hparams = {
        "model_type": "glm",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1.5625e-07,
        "head_dim": 128,
    }
    add_chatglm_keys(hparams, {"rope_theta": 5_000_000.0})
    assert hparams["seq_length"] == 131072
    assert hparams["layernorm_epsilon"] == 1.5625e-07
    assert hparams["attention_dim"] == 128
    assert 10000 * hparams["rope_ratio"] == 5_000_000.0


def test_chatglm_keys_already_present_win() -> None:
    hparams = {"seq_length": 8192, "max_position_embeddings": 32768, "rope_ratio": 50.0}
    add_chatglm_keys(hparams, {"rope_theta": 10000.0})
    assert (hparams["seq_length"], hparams["rope_ratio"]) == (8192, 50.0)


@pytest.mark.parametrize(("ignore_merges", "expected"), [(True, "glm4"), (False, "chatglm-bpe")])
def test_glm4_split_regex_names_the_llama_cpp_pre_tokenizer(
    tmp_path: Path, ignore_merges: bool, expected: str
) -> None:
    split = {"type": "Split", "pattern": {"Regex": GLM4_PATTERN}, "behavior": "Isolated"}
    pre = {"type": "Sequence", "pretokenizers": [split, {"type": "ByteLevel"}]}
    _write_json(
        tmp_path / "tokenizer.json",
        {"model": {"type": "BPE", "ignore_merges": ignore_merges}, "pre_tokenizer": pre},
    )
    assert pre_tokenizer_by_pattern(tmp_path / "tokenizer.json") == expected


def test_an_unknown_split_regex_stays_unknown(tmp_path: Path) -> None:
    split = {"type": "Split", "pattern": {"Regex": r"\s+|\w+"}}
    _write_json(tmp_path / "tokenizer.json", {"model": {}, "pre_tokenizer": split})
    assert pre_tokenizer_by_pattern(tmp_path / "tokenizer.json") is None
    assert pre_tokenizer_by_pattern(tmp_path / "missing.json") is None


def test_missing_converter_names_the_setup_command(
    hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf_export, "converter_dir", lambda: tmp_path / "no-converter")
    with pytest.raises(ExportError, match=r"bash installer/setup\.sh --with llama-cpp"):
        export_gguf(hf_dir, tmp_path / "models", "x-f16", "F16", progress=False)
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    ("name", "weight_format", "message"),
    [("x", "q4_k_m", "weight_format='q4_k_m'"), ("../x", "F16", "name='../x'")],
)
def test_bad_arguments_are_refused_before_anything_runs(
    hf_dir: Path, tmp_path: Path, name: str, weight_format: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        export_gguf(hf_dir, tmp_path / "models", name, weight_format, progress=False)


def test_converter_dir_is_inside_the_llama_cpp_venv() -> None:
    folder = gguf_export.converter_dir()
    assert folder.parts[-4:] == (".venv-llama-cpp", "share", "medserve", "llama.cpp-convert")


@pytest.mark.parametrize(
    ("checkpoint", "with_sentencepiece"),
    [("tiny-chatglm3", True), ("tiny-glm4-chatglm", False), ("tiny-glm4-hf", False)],
)
def test_chatglm_checkpoints_are_staged_in_the_glm_layout(
    tmp_path: Path, checkpoint: str, with_sentencepiece: bool
) -> None:
    from medserve.models.layouts import detect_layout
    from medserve.models.tiny_chatglm import REMOTE_CODE_MARKER, build_tiny_checkpoint

    source = build_tiny_checkpoint(checkpoint, tmp_path / checkpoint)
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    staged = gguf_export._stage_source(source, detect_layout(source), scratch, progress=False)

    config = json.loads((staged / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "glm"
    assert "auto_map" not in config
    assert (staged / "tokenizer.json").is_file()
    assert not list(staged.glob("*.py"))
    # ChatGLM2/3's SentencePiece model: the converter job writes its vocabulary from it.
    # GLM-4's tokenizer.model is a tiktoken rank file, already in tokenizer.json.
    assert (staged / "tokenizer.model").is_file() is with_sentencepiece
    assert not (source / REMOTE_CODE_MARKER).exists()


def test_the_converter_job_refuses_remote_code_even_with_auto_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Defence in depth behind the staging: an unstaged chatglm folder (auto_map, *.py).
    from medserve.models.tiny_chatglm import REMOTE_CODE_MARKER, build_tiny_checkpoint
    from transformers import AutoConfig, dynamic_module_utils

    for name in ("get_cached_module_file", "get_class_in_module"):  # restored afterwards
        monkeypatch.setattr(dynamic_module_utils, name, getattr(dynamic_module_utils, name))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = build_tiny_checkpoint("tiny-chatglm3", tmp_path / "tiny-chatglm3")
    refuse_remote_code()

    with pytest.raises(RemoteCodeRefused):
        AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    assert not (folder / REMOTE_CODE_MARKER).exists()


def test_only_a_sentencepiece_file_gets_the_sentencepiece_vocabulary(tmp_path: Path) -> None:
    from medserve.models.tiny_chatglm import build_tiny_checkpoint

    chatglm3 = build_tiny_checkpoint("tiny-chatglm3", tmp_path / "c3")
    glm4 = build_tiny_checkpoint("tiny-glm4-chatglm", tmp_path / "g4")
    assert is_sentencepiece(chatglm3 / "tokenizer.model")
    assert not is_sentencepiece(glm4 / "tokenizer.model")  # a tiktoken rank file
    assert not is_sentencepiece(tmp_path / "missing.model")
