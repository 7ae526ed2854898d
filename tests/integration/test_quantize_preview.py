"""`medserve quantize --preview` on the bundled model, CI-sized (``--quick``), run as the user
runs it: real builds (optimum export, ipex-llm), real worker processes, real figures.

Two previews share one work folder: the first builds and measures an OpenVINO int8 and an
ipex-llm sym_int4 candidate and keeps the one that passes (the kept folder is then loaded
through the server's backend, in its worker process); the second reuses the builds with an
impossible speed threshold, so every candidate must fail and nothing may be installed. The
verdict rule itself is checked on plain numbers.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from medserve.accel.backend import BackendSettings, build_backend
from medserve.accel.base import GenerationRequest, Sampling, Turn
from medserve.quant.preview import main as preview_main
from medserve.quant.preview_verdict import GIB, Thresholds, judge

from tests.conftest import BUNDLED_MODEL, medserve_home
from tests.integration.ipex_llm_models import HF_DIR_NAME, require_engine

CANDIDATES = "openvino-int8,ipex-llm-sym_int4"
MAX_PPL_INCREASE = 0.10  # int8 is ~-1 % vs fp16 here, sym_int4 ~+33 %: far on either side


def run_preview(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medserve.server.cli", "quantize", "--preview", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _figures_are_finite(candidate: dict) -> None:
    assert candidate["status"] == "measured", candidate["message"]
    assert candidate["failed_requests"] == 0, candidate["errors"]
    assert candidate["size_bytes"] > 10 * 2**20
    assert 1.0 < candidate["perplexity"] < 1000.0
    assert math.isfinite(candidate["ppl_increase"])
    assert candidate["ttft_ms"] > 0 and candidate["ttft_prompt_tokens"] > 200
    for streams in ("1", "4"):
        assert candidate["itl_ms"][streams] > 0 and candidate["tokens_per_s"][streams] > 0
    assert 50 * 2**20 < candidate["peak_rss_bytes"] < 8 * GIB


async def _chat(model_dir: Path, question: str) -> str:
    backend = build_backend({model_dir.name: model_dir}, BackendSettings(max_num_seqs=2))
    await backend.start()
    try:
        request = GenerationRequest(
            request_id="kept-1",
            model=model_dir.name,
            params=Sampling(max_tokens=12, temperature=0.0),
            messages=(Turn("user", question),),
        )
        return "".join([chunk.text async for chunk in backend.generate(request)])
    finally:
        await backend.stop()


@pytest.fixture(scope="module")
def hf_dir() -> Path:
    return medserve_home() / "hf" / HF_DIR_NAME


def test_preview_builds_measures_judges_and_keeps(
    hf_dir: Path, models_dir: Path, tmp_path: Path
) -> None:
    require_engine("ipex-llm")
    work, served = tmp_path / "work", tmp_path / "models"
    common = [
        "--hf-dir", str(hf_dir), "--quick", "--candidates", CANDIDATES,
        "--reference", str(models_dir / f"{BUNDLED_MODEL}-fp16"),
        "--work-dir", str(work), "--models-dir", str(served), "--no-progress",
    ]  # fmt: skip
    first = run_preview(
        *common, "--out", str(tmp_path / "out1"),
        "--max-ppl-increase", str(MAX_PPL_INCREASE), "--keep", "openvino-int8", "--name", "kept",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-4000:]
    report = json.loads((tmp_path / "out1" / "preview.json").read_text())
    assert report["reference"]["perplexity"] > 1.0 and report["machine"]["cpu_model"]
    rows = {c["name"]: c for c in report["candidates"]}
    assert list(rows) == CANDIDATES.split(",")
    for row in rows.values():
        _figures_are_finite(row)
        assert row["ppl_increase"] == pytest.approx(
            row["perplexity"] / report["reference"]["perplexity"] - 1
        )
        # No speed or memory threshold was given: perplexity alone decides.
        assert row["verdict"]["passed"] == (row["ppl_increase"] <= MAX_PPL_INCREASE)
        assert any(r.startswith("perplexity") for r in row["verdict"]["reasons"])
        assert row["name"] in first.stdout
    assert rows["openvino-int8"]["verdict"]["passed"]
    assert not rows["ipex-llm-sym_int4"]["verdict"]["passed"]
    assert "| openvino-int8 | pass |" in (tmp_path / "out1" / "preview.md").read_text()
    assert (tmp_path / "out1" / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --keep installed a servable folder with what the preview measured, and nothing else.
    assert sorted(p.name for p in served.iterdir()) == ["kept"]
    manifest = json.loads((served / "kept" / "medserve.json").read_text())
    assert manifest["name"] == "kept" and manifest["engine"] == "openvino"
    assert manifest["accuracy"]["relative_increase"] == pytest.approx(
        rows["openvino-int8"]["ppl_increase"]
    )
    assert manifest["preview"]["tokens_per_s"] == rows["openvino-int8"]["tokens_per_s"]
    # Loaded the way the server loads a model folder: manifest -> engine -> worker process.
    answer = asyncio.run(_chat(served / "kept", "What is the capital of France?"))
    assert "Paris" in answer

    # Same builds (reused, not rebuilt), an impossible speed: every row fails, on speed.
    second = run_preview(
        *common, "--out", str(tmp_path / "out2"), "--min-tokens-per-s", "1e9",
        "--keep", "openvino-int8", "--name", "refused",
    )  # fmt: skip
    assert second.returncode == 1, second.stderr[-4000:]
    assert "not keeping openvino-int8" in second.stderr
    again = json.loads((tmp_path / "out2" / "preview.json").read_text())
    for row in again["candidates"]:
        _figures_are_finite(row)
        assert row["reused_build"] and not row["verdict"]["passed"]
        assert any("tok/s < 1e+09" in r for r in row["verdict"]["reasons"])
    assert sorted(p.name for p in served.iterdir()) == ["kept"]  # refused: nothing installed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hf-dir", "/nonexistent"], "not a Hugging Face model folder"),
        (["--candidates", "openvino-int2"], "unknown candidate 'openvino-int2'"),
        (["--max-ppl-increase", "nan"], "--max-ppl-increase nan"),
        (["--min-tokens-per-s", "0"], "--min-tokens-per-s 0.0"),
        (["--max-memory-gb", "-1"], "--max-memory-gb -1.0"),
        (["--candidates", "ipex-llm", "--keep", "openvino-int8"], "not among the candidates"),
        (["--keep", "openvino-int8", "--name", "../x"], "--name '../x'"),
        (["--name", "x"], "give --keep too"),
        (["--reference", "/nonexistent"], "not an exported OpenVINO model folder"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    hf_dir: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--hf-dir", str(hf_dir), *args] if "--hf-dir" not in args else args
    with pytest.raises(SystemExit) as exit_info:
        preview_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_the_command_is_reached_through_medserve_quantize(tmp_path: Path) -> None:
    result = run_preview("--hf-dir", str(tmp_path))  # no config.json: refused before any work
    assert result.returncode == 2
    assert result.stderr.startswith("medserve quantize --preview: --hf-dir")


def test_verdict_follows_each_threshold() -> None:
    thresholds = Thresholds(max_ppl_increase=0.05, min_tokens_per_s=20, max_memory_gib=1.0)
    good = {"ppl_increase": 0.01, "tokens_per_s": 30.0, "peak_rss_bytes": GIB // 2}
    assert judge(thresholds, **good, failed_requests=0).passed
    for change, reason in (
        ({"ppl_increase": 0.06}, "perplexity +6.0% > +5.0%"),
        ({"ppl_increase": math.nan}, "perplexity not measured"),
        ({"tokens_per_s": 19.9}, "19.9 tok/s < 20"),
        ({"peak_rss_bytes": 2 * GIB}, "peak RSS 2.00 GiB > 1"),
        ({"peak_rss_bytes": None}, "RSS not measured"),
    ):
        verdict = judge(thresholds, **{**good, **change}, failed_requests=0)
        assert not verdict.passed and verdict.reasons[0] == reason
    failed = judge(thresholds, **good, failed_requests=2)
    assert not failed.passed and failed.reasons[0] == "2 request(s) failed"
    # Thresholds not given are not checked: a slow, large build passes on perplexity alone.
    lenient = judge(
        Thresholds(), ppl_increase=0.0, tokens_per_s=0.1, peak_rss_bytes=None, failed_requests=0
    )
    assert lenient.passed and lenient.reasons == ("perplexity +0.0% <= +10.0%",)


def test_preview_of_a_chatglm_folder_includes_the_ggml_engines(
    glm_checkpoints: dict[str, Path], glm_fp16_exports: dict[str, Path], tmp_path: Path
) -> None:
    """llama.cpp is scored by llama.cpp itself; chatglm.cpp (no logits) by its llama.cpp twin
    on the same ggml block format, and the row says so."""
    require_engine("llama-cpp")
    require_engine("chatglm-cpp")
    result = run_preview(
        "--hf-dir", str(glm_checkpoints["tiny-chatglm3"]), "--quick",
        "--candidates", "llama-cpp-Q8_0,chatglm-cpp-q8_0",
        "--reference", str(glm_fp16_exports["tiny-chatglm3-fp16"]),
        "--max-ppl-increase", "0.05", "--work-dir", str(tmp_path / "work"),
        "--out", str(tmp_path / "out"), "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "preview.json").read_text())
    rows = {c["name"]: c for c in report["candidates"]}
    assert list(rows) == ["llama-cpp-Q8_0", "chatglm-cpp-q8_0"]
    for row in rows.values():
        assert row["status"] == "measured", row["message"]
        assert row["failed_requests"] == 0, row["errors"]
        assert row["tokens_per_s"]["1"] > 0 and row["tokens_per_s"]["4"] > 0
        assert row["peak_rss_bytes"] > 0 and row["size_bytes"] > 0
    llama, glm = rows["llama-cpp-Q8_0"], rows["chatglm-cpp-q8_0"]
    # Scored by llama.cpp, which (following the GGUF) adds no [gMASK]<sop> prefix where the
    # OpenVINO tokenizer does: on random weights the two scorers differ by ~10 %, so only
    # finiteness and the verdict's arithmetic are checked here.
    assert math.isfinite(llama["ppl_increase"])
    assert llama["verdict"]["passed"] == (llama["ppl_increase"] <= 0.05)
    assert glm["perplexity"] == llama["perplexity"]
    assert "scored by llama.cpp on llama-cpp-Q8_0" in glm["message"]


def test_chatglm_cpp_candidates_are_skipped_for_other_layouts(
    hf_dir: Path, models_dir: Path, tmp_path: Path
) -> None:
    require_engine("chatglm-cpp")
    result = run_preview(
        "--hf-dir", str(hf_dir), "--quick", "--candidates", "chatglm-cpp-q4_0",
        "--reference", str(models_dir / f"{BUNDLED_MODEL}-fp16"),
        "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--no-progress",
    )  # fmt: skip
    report = json.loads((tmp_path / "out" / "preview.json").read_text())
    (row,) = report["candidates"]
    assert row["status"] == "skipped"
    assert "chatglm layout only" in row["message"] and "llama" in row["message"]
    assert result.returncode == 0, result.stderr[-2000:]  # a report, without a --keep
    assert "no chart: no candidate was measured" in result.stderr
