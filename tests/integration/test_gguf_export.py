"""`medserve export --engine llama-cpp` (quant/gguf_export.py) on tiny random checkpoints.

What it proves, per checkpoint (a tiny Llama with SmolLM2's tokenizer, tiny ChatGLM3 and GLM-4
in the chatglm layout, tiny GLM-4-9B-chat-hf): the folder holds ``model.gguf`` and a manifest
naming the llama-cpp engine; the GGUF metadata (architecture, context length, vocabulary size,
chat template, file type) is what the checkpoint says; llama.cpp tokenizes English, Chinese,
whitespace and the rendered chat prompt (special tokens included) exactly as the HF tokenizer
does, and stops on every stop token; and at F16/F32, decoding OpenVINO's greedy 32 tokens
(fp16 export of the same checkpoint), llama.cpp picks the same token at every step, or at a
near-tie (within TIE_TOLERANCE) the other one. A quantized build loads and decodes. No code
from a checkpoint runs, and an architecture llama.cpp lacks fails with the converter's own
words.

llama.cpp runs directly (llama_cpp.Llama) in one subprocess of .venv-llama-cpp; the engine
module is tested elsewhere. Skipped without that environment unless MEDSERVE_REQUIRE_ENGINES
names llama-cpp.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from medserve.accel.registry import worker_python
from medserve.models.manifest import read_manifest
from medserve.quant.export import ExportError
from medserve.quant.gguf_export import MODEL_FILE, export_gguf

from tests.chatglm_reference import NEW_TOKENS, PROMPT_MESSAGES, genai_greedy
from tests.conftest import BUNDLED_MODEL, medserve_home
from tests.integration.ipex_llm_models import require_engine

ENGINE = "llama-cpp"
TINY_LLAMA = "tiny-llama"
GLM_CHECKPOINTS = ("tiny-chatglm3", "tiny-glm4-chatglm", "tiny-glm4-hf")
# (checkpoint, weight format): F16/F32 are compared token for token with OpenVINO fp16.
EXPORTS = (
    ("tiny-chatglm3", "F16"),
    ("tiny-chatglm3", "F32"),
    ("tiny-glm4-chatglm", "F16"),
    ("tiny-glm4-chatglm", "Q4_0"),
    ("tiny-glm4-hf", "F32"),
    (TINY_LLAMA, "F16"),
    (TINY_LLAMA, "Q4_K_M"),
)
PARITY = [e for e in EXPORTS if e[1] in ("F16", "F32")]
QUANTIZED = [e for e in EXPORTS if e[1] not in ("F16", "F32")]
# llama.h's llama_ftype of each format, as general.file_type records it.
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}
TOKENIZER_SAMPLES = (
    "The capital of France is Paris.",
    "患者发热三天，体温39度。",
    "Dose: 12.5 mg/kg, 3x daily (max 4000 mg).",
    "  two  spaces,\ttab,\n\nblank line ",
    "café naïve — 你好，世界",
)
EXPORT_WORKERS = 2

# llama.cpp's top logit may exceed that of OpenVINO's token by this much at a near-tie
# (different kernels; OpenVINO also compresses its KV cache): a conversion error (wrong rope
# base, transposed or misnamed tensors) costs whole logits, not hundredths.
TIE_TOLERANCE = 0.01

# Runs in .venv-llama-cpp: tokenization (vocab only), end-of-generation ids, and decoding one
# token at a time: teacher-forced along OpenVINO's greedy tokens when given ("forced": at each
# step llama.cpp's argmax and how far OpenVINO's token is below it), else free greedy. The KV
# cache is f32 (GGML_TYPE_F32 = 0) so that llama.cpp's f16 cache adds no rounding of its own.
PROBE = r"""
import json, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama

out = []
for job in json.load(open(sys.argv[1])):
    vocab = Llama(job["model"], vocab_only=True, verbose=False)
    result = {
        "texts": [vocab.tokenize(t.encode(), add_bos=False, special=False) for t in job["texts"]],
        "prompt": vocab.tokenize(job["prompt_text"].encode(), add_bos=False, special=True),
    }
    ptr = llama_cpp.llama_model_get_vocab(vocab.model)
    result["eog"] = [i for i in range(vocab.n_vocab()) if llama_cpp.llama_vocab_is_eog(ptr, i)]
    del vocab
    llm = Llama(job["model"], n_ctx=256, n_batch=256, n_threads=2, logits_all=False,
                type_k=0, type_v=0, verbose=False)
    n_vocab = llm.n_vocab()
    llm.eval(job["prompt_ids"])
    forced = job["forced"]
    steps = []
    for i in range(job["new_tokens"]):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
        top = int(np.argmax(logits))
        token = forced[i] if forced else top
        steps.append([top, float(logits[top] - logits[token])])
        llm.eval([token])
    result["steps"] = steps
    del llm
    out.append(result)
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module", autouse=True)
def _llama_cpp_installed() -> None:
    require_engine(ENGINE)


@pytest.fixture(scope="module")
def checkpoints(
    glm_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    folders = {name: glm_checkpoints[name] for name in GLM_CHECKPOINTS}
    folders[TINY_LLAMA] = _tiny_llama(tmp_path_factory.mktemp("tiny_llama") / TINY_LLAMA)
    return folders


@pytest.fixture(scope="module")
def tokenizer_dirs(
    checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, list[int]]]:
    """Each checkpoint's HF tokenizer.json folder (chatglm ones converted, no code) and the
    ids generation stops on (generation_config.json, or the converted family's)."""
    from medserve.models.chatglm_tokenizer import convert_chatglm_tokenizer

    root = tmp_path_factory.mktemp("gguf_tokenizers")
    folders = {}
    for name, folder in checkpoints.items():
        if (folder / "tokenizer.json").is_file():
            generation = json.loads((folder / "generation_config.json").read_text("utf-8"))
            stops = generation["eos_token_id"]
            folders[name] = (folder, stops if isinstance(stops, list) else [stops])
        else:
            family = convert_chatglm_tokenizer(folder, root / name)
            folders[name] = (root / name, [int(i) for i in family.stop_token_ids])
    return folders


@pytest.fixture(scope="module")
def gguf_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf_models") / "models"


@pytest.fixture(scope="module")
def gguf_exports(checkpoints: dict[str, Path], gguf_models_dir: Path) -> dict[tuple, Path]:
    def export(job: tuple[str, str]) -> Path:
        checkpoint, weight_format = job
        name = f"{checkpoint}-{weight_format.lower()}"
        return export_gguf(
            checkpoints[checkpoint], gguf_models_dir, name, weight_format, progress=False
        )

    with ThreadPoolExecutor(EXPORT_WORKERS) as pool:
        return dict(zip(EXPORTS, pool.map(export, EXPORTS), strict=True))


@pytest.fixture(scope="module")
def openvino_fp16(
    glm_fp16_exports: dict[str, Path], checkpoints: dict[str, Path], gguf_models_dir: Path
) -> dict[str, Path]:
    from medserve.quant.convert import convert_hf_model

    folders = {name: glm_fp16_exports[f"{name}-fp16"] for name in GLM_CHECKPOINTS}
    ov_models = gguf_models_dir.parent / "openvino"
    folders[TINY_LLAMA] = convert_hf_model(
        checkpoints[TINY_LLAMA], ov_models, f"{TINY_LLAMA}-fp16", "fp16", progress=False
    )
    return folders


@pytest.fixture(scope="module")
def hf_side(tokenizer_dirs: dict[str, tuple[Path, list[int]]]) -> dict[str, dict[str, Any]]:
    """Per checkpoint: HF ids of the samples, the rendered prompt, its ids, the template."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    sides = {}
    for name, (folder, stops) in tokenizer_dirs.items():
        fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
        hf = AutoTokenizer.from_pretrained(str(folder))
        prompt = hf.apply_chat_template(
            [dict(m) for m in PROMPT_MESSAGES], tokenize=False, add_generation_prompt=True
        )
        sides[name] = {
            "texts": [fast.encode(t, add_special_tokens=False).ids for t in TOKENIZER_SAMPLES],
            "prompt_text": prompt,
            "prompt_ids": fast.encode(prompt, add_special_tokens=False).ids,
            "template": hf.chat_template,
            "vocab": len(fast.get_vocab(with_added_tokens=True)),
            "stops": stops,
        }
    return sides


@pytest.fixture(scope="module")
def openvino_greedy(
    openvino_fp16: dict[str, Path], hf_side: dict[str, dict[str, Any]]
) -> dict[str, list[int]]:
    """OpenVINO GenAI's greedy continuation of the chat prompt, per checkpoint (f32 hint)."""
    return {
        name: genai_greedy(folder, hf_side[name]["prompt_ids"])
        for name, folder in openvino_fp16.items()
    }


@pytest.fixture(scope="module")
def llama_cpp_runs(
    gguf_exports: dict[tuple, Path],
    hf_side: dict[str, dict[str, Any]],
    openvino_greedy: dict[str, list[int]],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[tuple, dict[str, Any]]:
    """Tokenization and decoding of every export, by llama.cpp, in one subprocess."""
    jobs = [
        {
            "model": str(folder / MODEL_FILE),
            "texts": list(TOKENIZER_SAMPLES),
            "prompt_text": hf_side[key[0]]["prompt_text"],
            "prompt_ids": hf_side[key[0]]["prompt_ids"],
            "new_tokens": NEW_TOKENS,
            "forced": openvino_greedy[key[0]] if key in PARITY else None,
        }
        for key, folder in gguf_exports.items()
    ]
    scratch = tmp_path_factory.mktemp("llama_cpp_probe")
    job_file, result_file = scratch / "jobs.json", scratch / "results.json"
    job_file.write_text(json.dumps(jobs), encoding="utf-8")
    run = subprocess.run(
        [str(worker_python(ENGINE)), "-c", PROBE, str(job_file), str(result_file)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(result_file.read_text(encoding="utf-8"))
    return dict(zip(gguf_exports, results, strict=True))


@pytest.mark.parametrize("key", EXPORTS, ids=lambda e: f"{e[0]}-{e[1]}")
def test_folder_holds_the_gguf_and_its_manifest(
    key: tuple[str, str], gguf_exports: dict[tuple, Path], checkpoints: dict[str, Path]
) -> None:
    from medserve.quant.quantize import _weight_hashes

    folder = gguf_exports[key]
    assert sorted(p.name for p in folder.iterdir()) == ["medserve.json", MODEL_FILE]
    manifest = read_manifest(folder)
    config = json.loads((checkpoints[key[0]] / "config.json").read_text(encoding="utf-8"))
    assert (manifest.engine, manifest.format) == (ENGINE, "gguf")
    assert manifest.precision == key[1].lower()
    assert manifest.architecture == config["model_type"]
    assert manifest.context_length == (8192 if key[0] == TINY_LLAMA else 2048)
    assert manifest.source["sha256"] == _weight_hashes(checkpoints[key[0]])
    assert manifest.source["gguf_architecture"] == _architecture(key[0])
    # Nothing left beside it: no staging folder, no scratch copy of the checkpoint.
    assert sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("key", EXPORTS, ids=lambda e: f"{e[0]}-{e[1]}")
def test_gguf_metadata(
    key: tuple[str, str],
    gguf_exports: dict[tuple, Path],
    hf_side: dict[str, dict[str, Any]],
    checkpoints: dict[str, Path],
) -> None:
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_exports[key] / MODEL_FILE)).fields
    arch = _architecture(key[0])
    assert fields["general.architecture"].contents() == arch
    assert fields["general.name"].contents() == f"{key[0]}-{key[1].lower()}"
    assert fields[f"{arch}.context_length"].contents() == (8192 if key[0] == TINY_LLAMA else 2048)
    assert fields["general.file_type"].contents() == FILE_TYPES[key[1]]
    tokens = fields["tokenizer.ggml.tokens"].contents()
    # The embedding rows: the tokenizer's ids plus [PADn] rows up to the padded size.
    assert len(tokens) >= hf_side[key[0]]["vocab"]
    assert fields["tokenizer.chat_template"].contents() == hf_side[key[0]]["template"]
    rope_base, eps = _expected_hparams(key[0], checkpoints)
    assert fields[f"{arch}.rope.freq_base"].contents() == pytest.approx(rope_base, rel=1e-6)
    eps_key = f"{arch}.attention.layer_norm_rms_epsilon"
    assert fields[eps_key].contents() == pytest.approx(eps, rel=1e-6)
    if arch == "chatglm":  # the template writes [gMASK]<sop>; a BOS would double it
        assert fields["tokenizer.ggml.add_bos_token"].contents() is False
        assert fields[f"{arch}.rope.dimension_count"].contents() == 8  # half of head_dim 16


@pytest.mark.parametrize("key", EXPORTS, ids=lambda e: f"{e[0]}-{e[1]}")
def test_llama_cpp_tokenizes_like_the_hf_tokenizer(
    key: tuple[str, str],
    llama_cpp_runs: dict[tuple, dict[str, Any]],
    hf_side: dict[str, dict[str, Any]],
) -> None:
    run, hf = llama_cpp_runs[key], hf_side[key[0]]
    for text, ids, expected in zip(TOKENIZER_SAMPLES, run["texts"], hf["texts"], strict=True):
        assert ids == expected, text
    # The chat prompt with its special tokens ([gMASK], <sop>, <|user|>, <|im_start|>...).
    assert run["prompt"] == hf["prompt_ids"]


@pytest.mark.parametrize("key", EXPORTS, ids=lambda e: f"{e[0]}-{e[1]}")
def test_llama_cpp_stops_on_every_stop_token(
    key: tuple[str, str],
    llama_cpp_runs: dict[tuple, dict[str, Any]],
    hf_side: dict[str, dict[str, Any]],
) -> None:
    # GLM: <|endoftext|> or </s>, <|user|> and <|observation|>, as the official chat() stops.
    assert set(hf_side[key[0]]["stops"]) <= set(llama_cpp_runs[key]["eog"])


@pytest.mark.parametrize("key", PARITY, ids=lambda e: f"{e[0]}-{e[1]}")
def test_greedy_tokens_equal_openvino_fp16(
    key: tuple[str, str],
    llama_cpp_runs: dict[tuple, dict[str, Any]],
    openvino_greedy: dict[str, list[int]],
) -> None:
    expected = openvino_greedy[key[0]]
    steps = llama_cpp_runs[key]["steps"]
    assert len(expected) == len(steps) == NEW_TOKENS
    differing = [
        f"step {i}: llama.cpp {top}, OpenVINO {want} ({gap:.4f} below)"
        for i, ((top, gap), want) in enumerate(zip(steps, expected, strict=True))
        if top != want
    ]
    # Every step agrees, or is a near-tie llama.cpp would break the other way.
    assert all(gap <= TIE_TOLERANCE for _, gap in steps), differing
    assert len(differing) <= 2, differing  # measured: none, or one near-tie (0.002-0.003)


@pytest.mark.parametrize("key", QUANTIZED, ids=lambda e: f"{e[0]}-{e[1]}")
def test_quantized_build_decodes(
    key: tuple[str, str],
    llama_cpp_runs: dict[tuple, dict[str, Any]],
    gguf_exports: dict[tuple, Path],
    hf_side: dict[str, dict[str, Any]],
) -> None:
    greedy = [top for top, _ in llama_cpp_runs[key]["steps"]]
    assert len(greedy) == NEW_TOKENS
    assert all(0 <= t < hf_side[key[0]]["vocab"] + 1024 for t in greedy)
    f16 = next(gguf_exports[k] for k in EXPORTS if k[0] == key[0] and k[1] == "F16")
    assert (gguf_exports[key] / MODEL_FILE).stat().st_size < (f16 / MODEL_FILE).stat().st_size


def test_no_code_from_a_checkpoint_ran(
    gguf_exports: dict[tuple, Path], checkpoints: dict[str, Path]
) -> None:
    from medserve.models.tiny_chatglm import REMOTE_CODE_MARKER

    assert gguf_exports  # after every export
    for name in ("tiny-chatglm3", "tiny-glm4-chatglm"):
        assert list(checkpoints[name].glob("*.py"))  # the stand-ins were there to be run
        assert not (checkpoints[name] / REMOTE_CODE_MARKER).exists()


def test_unsupported_architecture_fails_with_the_converters_message(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "unknown"
    shutil.copytree(checkpoints["tiny-glm4-hf"], folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.update(architectures=["MedFooForCausalLM"], model_type="medfoo")
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    models = tmp_path / "models"

    with pytest.raises(ExportError, match="MedFooForCausalLM is not supported"):
        export_gguf(folder, models, "unknown-f16", "F16", progress=False)
    assert list(models.iterdir()) == []


def _expected_hparams(checkpoint: str, checkpoints: dict[str, Path]) -> tuple[float, float]:
    """Rope base and RMSNorm eps as the checkpoint's own config states them."""
    config = json.loads((checkpoints[checkpoint] / "config.json").read_text(encoding="utf-8"))
    if config["model_type"] == "chatglm":
        return 10000.0 * float(config.get("rope_ratio") or 1), float(config["layernorm_epsilon"])
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {})["rope_theta"]
    return float(theta), float(config["rms_norm_eps"])


def _architecture(checkpoint: str) -> str:
    return "llama" if checkpoint == TINY_LLAMA else "chatglm"


def _tiny_llama(folder: Path) -> Path:
    """A random 2-layer Llama with the bundled SmolLM2 tokenizer (49152 tokens), in fp16.

    fp16 weights make the F32 GGUF and the OpenVINO fp16 IR hold the same numbers; ten times
    the default initializer spreads the logits, so near-ties between the top two are rare.
    """
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    source = medserve_home() / "hf" / BUNDLED_MODEL
    if not (source / "tokenizer.json").is_file():
        pytest.fail(f"{source} not prepared; run `bash installer/setup.sh` first", pytrace=False)
    config = AutoConfig.from_pretrained(source)
    config.update(
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "initializer_range": 0.2,
        }
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(source / name, folder / name)
    return folder
