"""The chatglm.cpp engine, on tiny GLM-family checkpoints written by medserve's own exporter.

- The shared serving contract (tests/integration/engine_contract.py) over HTTP on a q4_0
  ChatGLM3, its worker in .venv-chatglm-cpp, with a q8_0 GLM-4-9B-chat served beside it.
- Greedy parity: tiny ChatGLM3 and tiny GLM-4-9B-chat, exported at f16 and f32, give the same
  32 greedy tokens as the OpenVINO fp16 export of the same checkpoint and as the upstream
  oracle fixture (tests/data/chatglm), from the same prompt ids, which chatglm.cpp's own chat
  encoding must reproduce.
- q4_0 and q8_0 files load and generate; their single-stream decode speed is printed.

The engine runs inside .venv-chatglm-cpp only, so the direct checks go through a small runner
script started with that interpreter. Skipped when the environment is missing, unless
MEDSERVE_REQUIRE_ENGINES names chatglm-cpp (then it fails).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from medserve.accel.registry import EngineNotInstalled, worker_python
from medserve.models.tiny_chatglm import SPECS
from medserve.quant.chatglm_cpp_export import export_chatglm_cpp

from tests.chatglm_reference import PROMPT_MESSAGES, fixture_reference, genai_greedy
from tests.integration.conftest import run_export
from tests.integration.engine_contract import Contract, EngineContract, contract_env
from tests.integration.ipex_llm_models import engine_required
from tests.server_process import ServerProcess

ENGINE = "chatglm-cpp"
PARITY_MODELS = ("tiny-chatglm3", "tiny-glm4-chatglm")
LONG_CONTEXT = 16384
"""seq_length of the contract's ChatGLM3 copy: room for the contract's 2,000-token answers."""

try:
    ENGINE_PYTHON = worker_python(ENGINE)
except EngineNotInstalled as exc:
    if engine_required(ENGINE):
        pytest.fail(f"MEDSERVE_REQUIRE_ENGINES names {ENGINE}, but {exc}", pytrace=False)
    pytest.skip(
        f"{exc} (set MEDSERVE_REQUIRE_ENGINES={ENGINE} to make this a failure)",
        allow_module_level=True,
    )

# Runs in .venv-chatglm-cpp: loads each model through the engine's own load(), encodes the
# messages, then steps the engine alone until the request ends.
RUNNER = r"""
import json, sys, time
from medserve.accel.chatglm_cpp_engine import load
from medserve.accel.engine_core import PromptInput
from medserve.accel.protocol import Configure, Sampling, Turn

results = []
for job in json.loads(sys.argv[1]):
    engine = load(Configure(model_name="m", model_dir=job["model_dir"], engine="chatglm-cpp",
                            max_num_seqs=1, max_context_tokens=job.get("context", 4096),
                            kv_cache_gb=1))
    sampling = Sampling(max_tokens=job["new_tokens"], temperature=0.0,
                        ignore_eos=job.get("ignore_eos", True))
    request = PromptInput("r", sampling, messages=tuple(Turn(**m) for m in job["messages"]))
    prompt_ids = engine.encode(request)
    engine.add(request)
    tokens, finish, times = [], None, []
    while engine.has_work():
        started = time.perf_counter()
        for output in engine.step():
            tokens += output.token_ids
            finish = output.finish_reason or finish
        times.append(time.perf_counter() - started)
    decode_s = sum(times[1:])  # the first step is the prompt's prefill
    results.append({
        "prompt_ids": prompt_ids, "tokens": tokens, "finish": finish,
        "text": engine.decode(tokens),
        "decode_tok_s": (len(times) - 1) / decode_s if decode_s else 0.0,
        "stats": engine.stats().extra,
    })
    engine.close()
print(json.dumps(results))
"""


def run_engine(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``jobs`` (model_dir, messages, new_tokens, ...) through the engine in its venv."""
    result = subprocess.run(
        [str(ENGINE_PYTHON), "-c", RUNNER, json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"engine runner failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def exports(
    glm_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """chatglm.cpp folders of the parity models at every weight format, keyed by name."""
    models_dir = tmp_path_factory.mktemp("chatglm_cpp") / "models"
    folders = {}
    for name in PARITY_MODELS:
        for weight_format in ("f32", "f16", "q8_0", "q4_0"):
            export = f"{name}-{weight_format.replace('_', '-')}"
            folders[export] = export_chatglm_cpp(
                glm_checkpoints[name], models_dir, export, weight_format, progress=False
            )
    return folders


@pytest.fixture(scope="module")
def openvino_fp16(
    glm_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """OpenVINO fp16 exports (``medserve export``) of the parity models only."""
    models_dir = tmp_path_factory.mktemp("chatglm_cpp_ov") / "models"

    def export(name: str) -> Path:
        args = ["--hf-dir", str(glm_checkpoints[name]), "--name", f"{name}-fp16",
                "--weight-format", "fp16", "--models-dir", str(models_dir)]  # fmt: skip
        result = run_export(args)
        assert result.returncode == 0, result.stderr[-4000:]
        return models_dir / f"{name}-fp16"

    with ThreadPoolExecutor(len(PARITY_MODELS)) as pool:
        return dict(zip(PARITY_MODELS, pool.map(export, PARITY_MODELS), strict=True))


def test_greedy_tokens_match_openvino_fp16_and_the_oracle(
    exports: dict[str, Path], openvino_fp16: dict[str, Path]
) -> None:
    messages = [dict(m) for m in PROMPT_MESSAGES]
    jobs = [
        {"model_dir": str(exports[f"{name}-{fmt}"]), "messages": messages, "new_tokens": 32}
        for name in PARITY_MODELS
        for fmt in ("f32", "f16")
    ]
    results = iter(run_engine(jobs))
    for name in PARITY_MODELS:
        reference, _ = fixture_reference(name)
        openvino = genai_greedy(openvino_fp16[name], reference.prompt_ids)
        assert openvino == reference.greedy_ids, f"{name}: OpenVINO fp16 left the oracle"
        for fmt in ("f32", "f16"):
            result = next(results)
            # chatglm.cpp's message encoding = the official tokenizer's prompt ids.
            assert result["prompt_ids"] == reference.prompt_ids, (name, fmt)
            assert result["tokens"] == openvino, (name, fmt)
            assert result["finish"] == "length"


def test_quantized_files_load_and_generate(exports: dict[str, Path]) -> None:
    """q8_0 and q4_0 files run; their first greedy tokens are the oracle's (a wrong block
    layout would be noise from the first token on; later tokens may drift, the tiny models'
    top-2 margins being as small as 0.03)."""
    messages = [dict(m) for m in PROMPT_MESSAGES]
    jobs = [
        {"model_dir": str(exports[f"{name}-{fmt}"]), "messages": messages, "new_tokens": 32}
        for name in PARITY_MODELS
        for fmt in ("q8-0", "q4-0")
    ]
    speeds = []
    for job, result in zip(jobs, run_engine(jobs), strict=True):
        name = Path(job["model_dir"]).name
        checkpoint = name.rsplit("-", 2)[0]
        reference, _ = fixture_reference(checkpoint)
        assert len(result["tokens"]) == 32
        assert all(0 <= t < SPECS[checkpoint].vocab_size for t in result["tokens"])
        assert result["tokens"][:4] == reference.greedy_ids[:4], name
        assert isinstance(result["text"], str)
        speeds.append(f"{name}: {result['decode_tok_s']:.0f} tok/s")
    print("single-stream decode, chatglm.cpp:", "; ".join(speeds))


# -- the shared contract, over HTTP ----------------------------------------------------------


@pytest.fixture(scope="module")
def contract_models(
    glm_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A q4_0 ChatGLM3 for the contract and a q8_0 GLM-4-chat beside it, in one models dir."""
    root = tmp_path_factory.mktemp("chatglm_cpp_contract")
    hf_dir = _contract_checkpoint(glm_checkpoints["tiny-chatglm3"], root / "tiny-chatglm3-long")
    models_dir = root / "models"
    export_chatglm_cpp(hf_dir, models_dir, "chatglm3-q4-0", "q4_0", progress=False)
    glm4 = glm_checkpoints["tiny-glm4-chatglm"]
    export_chatglm_cpp(glm4, models_dir, "glm4-chat-q8-0", "q8_0", progress=False)
    return models_dir


def _contract_checkpoint(source: Path, hf_dir: Path) -> Path:
    """tiny-chatglm3 with a 16k context (room for the contract's 2,000-token answers) whose
    output layer never picks a byte-fallback token.

    A random model strings stray bytes together, which decode (correctly) to U+FFFD; the
    contract asserts streamed text has none, a check of the detokenizer meant for a trained
    model that emits only whole characters. Zero rows give those tokens logit 0, below the
    greedy pick of the ~280 others (logits spread over several units).
    """
    from medserve.models.sentencepiece_model import PieceType, read_sentencepiece_model
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, hf_dir)
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    (hf_dir / "config.json").write_text(json.dumps({**config, "seq_length": LONG_CONTEXT}))
    pieces = read_sentencepiece_model(hf_dir / "tokenizer.model").pieces
    byte_ids = [i for i, piece in enumerate(pieces) if piece.kind == PieceType.BYTE]
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text(encoding="utf-8"))
    shard = hf_dir / index["weight_map"]["transformer.output_layer.weight"]
    tensors = load_file(str(shard))
    tensors["transformer.output_layer.weight"][byte_ids] = 0
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return hf_dir


def _long_prompt(models_dir: Path) -> list[dict[str, str]]:
    """A question the random model answers greedily for 256 tokens without a stop token (it
    then loops): one that stops by itself early proves nothing about cancelling."""
    for question in (
        "Write a very long essay about medicine.",
        "Describe the ward round.",
        "列出所有检查。",
        "Explain the dosage.",
    ):
        messages = [{"role": "user", "content": question}]
        job = {"model_dir": str(models_dir / "chatglm3-q4-0"), "messages": messages,
               "new_tokens": 256, "ignore_eos": False, "context": LONG_CONTEXT}  # fmt: skip
        if run_engine([job])[0]["finish"] == "length":
            return messages
    pytest.fail("every candidate prompt stops by itself within 256 tokens")


class TestChatGLMCppContract(EngineContract):
    @pytest.fixture(scope="class")
    @classmethod
    def contract(
        cls, contract_models: Path, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[Contract]:
        env = contract_env(
            contract_models,
            "chatglm3-q4-0",
            MEDSERVE_ENGINE_SERVED_MODELS="glm4-chat-q8-0",
            MEDSERVE_ENGINE_MAX_CONTEXT_TOKENS=str(LONG_CONTEXT),
        )
        long_prompt = _long_prompt(contract_models)
        log_dir = tmp_path_factory.mktemp("chatglm_cpp_server")
        with ServerProcess.start(log_dir, env=env) as server:
            # chatglm.cpp runs this tiny model at thousands of tokens/s on one thread.
            yield Contract(server, "chatglm3-q4-0", long_prompt=long_prompt, queued_max_tokens=4000)

    def test_served_by_chatglm_cpp_in_its_own_workers(self, contract: Contract) -> None:
        stats = httpx.get(contract.url("/metrics.json")).json()["models"]
        models = {m["id"]: m for m in httpx.get(contract.url("/v1/models")).json()["data"]}
        assert stats[contract.model]["pid"] != stats["glm4-chat-q8-0"]["pid"]
        for model, model_type in (("chatglm3-q4-0", "CHATGLM3"), ("glm4-chat-q8-0", "CHATGLM4")):
            assert stats[model]["model_type"] == model_type
            assert stats[model]["scheduler"] == "one sequence at a time, FIFO"
            assert models[model]["id"] == model
            answer = contract.chat(model=model, temperature=0, max_tokens=16)
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] >= 1

    def test_prompt_longer_than_the_context_is_refused(self, contract: Contract) -> None:
        too_long = [{"role": "user", "content": "Blood pressure 150/95. " * 4000}]
        response = contract.chat(model="glm4-chat-q8-0", messages=too_long, max_tokens=4)
        assert response.status_code == 400, response.text
