"""`medserve quantize --engine ipex-llm`: the folder it writes, its accuracy gate, the
architectures it takes (llama, glm, chatglm via glm; not glm4), and glm served correctly.

Run as the user runs it (the CLI, a fresh process). The tiny GLM-family checkpoints are the
random-weight ones of models/tiny_chatglm.py, laid out as their hub repositories.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import httpx
import pytest
from medserve.accel.registry import worker_python
from medserve.models.tiny_chatglm import REMOTE_CODE_MARKER, build_tiny_checkpoint

from tests.conftest import medserve_home
from tests.integration.engine_contract import Contract, stream_text
from tests.integration.ipex_llm_models import (
    HF_DIR_NAME,
    quantized_bundled_model,
    require_engine,
    run_quantize,
)
from tests.server_process import ServerProcess

RAW_PROMPT = "The patient was admitted with"


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_engine()
    root = tmp_path_factory.mktemp("ipex_tiny_sources")
    names = ("tiny-glm4-hf", "tiny-glm4-0414", "tiny-chatglm3")
    return {name: build_tiny_checkpoint(name, root / name) for name in names}


def test_bundled_model_folder_and_manifest(tmp_path_factory: pytest.TempPathFactory) -> None:
    hf_dir = medserve_home() / "hf" / HF_DIR_NAME
    models_dir, name = quantized_bundled_model(tmp_path_factory, hf_dir, "sym_int4")
    folder = models_dir / name
    manifest = json.loads((folder / "medserve.json").read_text())
    assert manifest["engine"] == "ipex-llm" and manifest["format"] == "ipex-llm-low-bit"
    assert manifest["precision"] == "sym_int4" and manifest["architecture"] == "llama"
    assert manifest["context_length"] == 8192
    source_sha = hashlib.sha256((hf_dir / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["source"]["sha256"] == {"model.safetensors": source_sha}
    assert manifest["source"]["versions"]["ipex-llm"] == "2.2.0"
    assert 1.0 < manifest["accuracy"]["perplexity"] < 1000.0
    # What the server loads: low-bit weights, a tokenizer transformers 4.47 reads natively
    # with the chat template inside, and the generation config's end-of-turn id.
    assert (folder / "pytorch_model.bin").stat().st_size < (
        hf_dir / "model.safetensors"
    ).stat().st_size / 2
    assert (
        "<|im_start|>"
        in json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    )
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2
    assert not [p.name for p in models_dir.iterdir() if p.name.startswith(".")]  # no staging left


def test_failed_accuracy_gate_leaves_no_folder(
    tiny_sources: dict[str, Path], tmp_path: Path
) -> None:
    source = tiny_sources["tiny-glm4-hf"]
    result = run_quantize(
        "--hf-dir", str(source), "--low-bit", "sym_int4", "--name", "gated",
        "--models-dir", str(tmp_path), "--reference", str(source),
        "--max-ppl-increase", "-0.5",  # demand 50 % better than the unquantized model
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "accuracy gate" in result.stderr
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staging leftover


def test_glm4_is_refused_with_the_reason(tiny_sources: dict[str, Path], tmp_path: Path) -> None:
    result = run_quantize(
        "--hf-dir", str(tiny_sources["tiny-glm4-0414"]), "--low-bit", "sym_int8",
        "--name", "glm4", "--models-dir", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 1
    assert "model_type 'glm4'" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_fail_before_any_work(tmp_path: Path) -> None:
    nf4 = run_quantize("--hf-dir", str(tmp_path), "--low-bit", "nf4", "--name", "x")
    assert nf4.returncode == 2 and "nf4" in nf4.stderr  # does not run on CPU: not offered
    name = run_quantize("--hf-dir", str(tmp_path), "--low-bit", "sym_int8", "--name", "../x")
    assert name.returncode == 1 and "name=" in name.stderr


def _reference_completion(source: Path, prompt: str, max_tokens: int) -> str:
    """Greedy text from plain transformers (fp32, no ipex-llm) on the unquantized source."""
    script = f"""
import json, torch
from transformers import AutoModelForCausalLM
from medserve.quant.transformers4 import load_config, load_tokenizer
source = {str(source)!r}
tokenizer = load_tokenizer(__import__("pathlib").Path(source))
model = AutoModelForCausalLM.from_pretrained(
    source, config=load_config(__import__("pathlib").Path(source)),
    torch_dtype=torch.float32, trust_remote_code=False, local_files_only=True)
ids = torch.tensor([tokenizer.encode({prompt!r})])
out = model.generate(ids, max_new_tokens={max_tokens}, do_sample=False)
print(json.dumps(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
"""
    result = subprocess.run(
        [str(worker_python("ipex-llm")), "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_glm_and_chatglm_are_quantized_gated_and_served(
    tiny_sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    models_dir = tmp_path_factory.mktemp("ipex_glm") / "models"
    glm, chatglm = tiny_sources["tiny-glm4-hf"], tiny_sources["tiny-chatglm3"]
    for source, name, extra in (
        (glm, "glm-int8", ["--reference", str(glm), "--max-ppl-increase", "0.10"]),
        (chatglm, "chatglm3-int8", []),  # converted to the glm layout on the way
    ):
        result = run_quantize(
            "--hf-dir", str(source), "--low-bit", "sym_int8", "--name", name,
            "--models-dir", str(models_dir), *extra,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    glm_manifest = json.loads((models_dir / "glm-int8" / "medserve.json").read_text())
    assert glm_manifest["architecture"] == "glm"
    assert glm_manifest["accuracy"]["relative_increase"] <= 0.10
    assert "reference_perplexity" in glm_manifest["accuracy"]
    chatglm_manifest = json.loads((models_dir / "chatglm3-int8" / "medserve.json").read_text())
    assert chatglm_manifest["architecture"] == "chatglm"
    assert chatglm_manifest["source"]["exported_as"] == "glm"
    assert not (chatglm / REMOTE_CODE_MARKER).exists()  # its modeling_chatglm.py never ran

    expected = _reference_completion(glm, RAW_PROMPT, 8)
    env = {
        "MEDSERVE_ENGINE_MODELS_DIR": str(models_dir),
        "MEDSERVE_ENGINE_MODEL": "glm-int8",
        "MEDSERVE_ENGINE_SERVED_MODELS": "chatglm3-int8",
        "MEDSERVE_CASES_ENABLED": "false",
    }
    with ServerProcess.start(models_dir.parent, env=env) as server:
        completion = httpx.post(
            server.base_url + "/v1/completions",
            json={"model": "glm-int8", "prompt": RAW_PROMPT, "temperature": 0, "max_tokens": 8},
            timeout=120,
        ).json()
        assert completion["choices"][0]["text"] == expected  # ipex-llm's glm path is exact
        for name in ("glm-int8", "chatglm3-int8"):
            contract = Contract(server, name)
            body = {"temperature": 0, "max_tokens": 12}
            text = contract.chat(**body).json()["choices"][0]["message"]["content"]
            assert text and stream_text(contract, body)[0] == text
