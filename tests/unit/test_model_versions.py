"""Versioned model folders: real files under tmp_path, the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from medserve.models.checksums import SUMS_NAME, read_sha256sums
from medserve.models.manifest import read_manifest, write_manifest
from medserve.models.versions import VERSIONS_DIR, ModelStore, VersionError

MEDSERVE = Path(sys.executable).with_name("medserve")


def fake_model(folder: Path, name: str = "m", weights: bytes = b"w" * 1000) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.bin").write_bytes(weights)
    (folder / "sub").mkdir()
    (folder / "sub" / "tokenizer.json").write_text('{"v": 1}', encoding="utf-8")
    write_manifest(folder, {"name": name, "precision": "int8", "engine": "openvino"})
    return folder


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    (tmp_path / "models").mkdir()
    return ModelStore(tmp_path / "models")


def _poke(path: Path, data: bytes) -> None:
    # Sealed files are 0o444; tests run as root or not, so open the bits explicitly.
    path.chmod(0o644)
    path.write_bytes(data)
    path.chmod(0o444)


def test_install_activate_rollback_remove_round_trip(store: ModelStore, tmp_path: Path) -> None:
    one = store.install(fake_model(tmp_path / "a", weights=b"1" * 100), activate=True)
    two = store.install(fake_model(tmp_path / "b", weights=b"2" * 100))
    assert (one.version, one.active, two.version, two.active) == ("v1", True, "v2", False)
    assert two.path == store.models_dir / VERSIONS_DIR / "m" / "v2"
    assert [(v.version, v.active) for v in store.versions("m")] == [("v1", True), ("v2", False)]

    store.activate("m", "v2")
    link = store.models_dir / "m"
    assert os.readlink(link) == f"{VERSIONS_DIR}/m/v2"  # relative: the folder can move
    assert (link / "model.bin").read_bytes() == b"2" * 100
    assert read_manifest(link).precision == "int8"
    assert not list(store.models_dir.glob(".m.link-*"))

    assert store.rollback("m").version == "v1"
    assert store.active("m").version == "v1"  # type: ignore[union-attr]
    with pytest.raises(VersionError, match="active"):
        store.remove("m", "v1")
    store.remove("m", "v2")
    assert [v.version for v in store.versions("m")] == ["v1"]
    assert store.install(fake_model(tmp_path / "c")).version == "v3"  # ids are never reused
    history = (store.root / "m" / "history.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in history]
    activations = [r for r in records if r["event"] in ("activate", "rollback")]
    assert [(r["version"], r["previous"]) for r in activations][:2] == [("v1", None), ("v2", "v1")]


def test_version_is_sealed_and_hashed(store: ModelStore, tmp_path: Path) -> None:
    version = store.install(fake_model(tmp_path / "src"), name="other")
    assert set(read_sha256sums(version.path)) == {
        "medserve.json",
        "model.bin",
        "sub/tokenizer.json",
    }
    for path in [version.path, *version.path.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o555 if path.is_dir() else 0o444), path
    assert version.name == "other" and version.manifest.name == "m"
    assert store.verify("other", "v1") == []
    assert (tmp_path / "src" / "model.bin").exists()  # a copy, the source stays


def test_rollback_walks_back_and_skips_removed(store: ModelStore, tmp_path: Path) -> None:
    for letter in "abc":
        store.install(fake_model(tmp_path / letter), activate=True)
    store.remove("m", "v2")
    assert store.rollback("m").version == "v1"
    with pytest.raises(VersionError, match="no earlier active version"):
        store.rollback("m")
    store.activate("m", "v3")
    store.activate("m", "v1")
    assert store.rollback("m").version == "v3"  # the one active before the current


def test_adopts_plain_folder_with_hard_link(store: ModelStore, tmp_path: Path) -> None:
    plain = fake_model(store.models_dir / "m")
    outside = tmp_path / "downloads" / "model.gguf"
    outside.parent.mkdir()
    outside.write_bytes(b"gguf")
    os.link(outside, plain / "model.gguf")
    assert store.versions("m")[0].version == "unversioned"
    assert store.names() == ["m"]

    new = store.install(fake_model(tmp_path / "new", weights=b"n"), activate=True)
    assert new.version == "v2"
    assert [v.version for v in store.versions("m")] == ["v1", "v2"]
    adopted = store.root / "m" / "v1"
    assert (adopted / "model.gguf").stat().st_ino == outside.stat().st_ino
    assert store.verify("m", "v1") == []
    assert store.rollback("m").version == "v1"
    assert (store.models_dir / "m" / "model.gguf").read_bytes() == b"gguf"
    assert store.names() == ["m"]


def test_damage_refused_by_activate_and_reported(store: ModelStore, tmp_path: Path) -> None:
    store.install(fake_model(tmp_path / "a"), activate=True)
    bad = store.install(fake_model(tmp_path / "b"))
    _poke(bad.path / "model.bin", b"flipped")
    assert store.verify("m", "v2") == ["model.bin: sha256 differs (changed or damaged)"]
    with pytest.raises(VersionError, match=r"damaged, not activated.*model\.bin"):
        store.activate("m", "v2")
    assert store.active("m").version == "v1"  # type: ignore[union-attr]
    store.activate("m", "v2", verify=False)  # the operator's explicit override
    assert store.verify("m") == ["model.bin: sha256 differs (changed or damaged)"]


def test_unlisted_extra_file_reported(store: ModelStore, tmp_path: Path) -> None:
    version = store.install(fake_model(tmp_path / "a"))
    version.path.chmod(0o755)
    (version.path / "extra.bin").write_bytes(b"?")
    problems = store.verify("m", "v1")
    assert f"extra.bin: not in {SUMS_NAME}" in problems
    assert ".: writable (sealed versions are read-only)" in problems


def test_killed_install_leaves_only_staging_then_cleaned(store: ModelStore, tmp_path: Path) -> None:
    src = fake_model(tmp_path / "src")
    # A real process dies between hashing and sealing: nothing may look installed afterwards.
    code = (
        "import os, sys; import medserve.models.versions as v;"
        "v.seal = lambda p: os._exit(9);"
        f"v.ModelStore({str(store.models_dir)!r}).install({str(src)!r})"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 9
    leftovers = list((store.root / "m").glob(".staging-*"))
    assert len(leftovers) == 1
    assert store.versions("m") == [] and store.active("m") is None
    assert store.names() == []

    assert store.install(src).version == "v1"
    assert not list((store.root / "m").glob(".staging-*"))
    assert [v.version for v in store.versions("m")] == ["v1"]


def test_refusals_leave_nothing_behind(store: ModelStore, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model.bin").write_bytes(b"x")
    with pytest.raises(VersionError, match=r"no medserve\.json"):
        store.install(empty, name="m")
    assert not store.root.exists() and empty.exists()

    src = fake_model(tmp_path / "src")
    for bad in ("../x", ".hidden", "a/b", "", "x" * 65, "history.jsonl", "v 1"):
        with pytest.raises(VersionError, match="not allowed"):
            store.install(src, version=bad)
    with pytest.raises(VersionError, match="not allowed"):
        store.install(src, name="../escape")
    assert store.install(src, version="2024-06-01").version == "2024-06-01"
    with pytest.raises(VersionError, match="already exists"):
        store.install(src, version="2024-06-01")
    assert [v.version for v in store.versions("m")] == ["2024-06-01"]
    with pytest.raises(VersionError, match="has no version 'v9'"):
        store.activate("m", "v9")


def test_move_and_remove_last_version(store: ModelStore, tmp_path: Path) -> None:
    src = fake_model(tmp_path / "src")
    version = store.install(src, move=True)
    assert not src.exists() and (version.path / "model.bin").exists()
    assert store.active("m") is None
    store.remove("m", "v1")
    assert not (store.root / "m").exists()
    assert store.names() == [] and store.versions("m") == []


def _cli(
    *args: str, models: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEDSERVE_")}
    clean["MEDSERVE_HOME"] = str(models.parent / "home")
    flags = [] if env else ["--models-dir", str(models)]
    return subprocess.run(
        [str(MEDSERVE), "models", *flags, *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_cli(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    run = _cli("install", str(fake_model(tmp_path / "a")), "--activate", models=models)
    assert run.returncode == 0, run.stderr
    assert "installed m v1" in run.stdout and "systemctl reload medserve" in run.stdout
    run = _cli("install", str(fake_model(tmp_path / "b")), "--version", "rc1", models=models)
    assert run.returncode == 0, run.stderr

    # Settings decide models_dir when no flag is given, as for the server.
    run = _cli("list", "--json", models=models, env={"MEDSERVE_ENGINE_MODELS_DIR": str(models)})
    rows = json.loads(run.stdout)
    assert [(r["version"], r["active"], r["precision"]) for r in rows] == [
        ("v1", True, "int8"),
        ("rc1", False, "int8"),
    ]
    assert rows[0]["size_bytes"] > 1000

    run = _cli("activate", "m", "rc1", models=models)
    assert run.returncode == 0 and "m now serves rc1 (was v1)" in run.stdout
    assert "POST /admin/reload" in run.stdout
    run = _cli("list", models=models)
    assert run.returncode == 0 and "rc1" in run.stdout and "*" in run.stdout

    run = _cli("remove", "m", "rc1", models=models)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("medserve models: m rc1 is active")
    assert len(run.stderr.strip().splitlines()) == 1

    run = _cli("rollback", "m", models=models)
    assert run.returncode == 0 and "m now serves v1" in run.stdout
    assert _cli("verify", "m", models=models).returncode == 0
    _poke(models / VERSIONS_DIR / "m" / "rc1" / "model.bin", b"bad")
    run = _cli("verify", "m", "rc1", models=models)
    assert run.returncode == 1 and "model.bin: sha256 differs" in run.stdout
    run = _cli("activate", "m", "rc1", models=models)
    assert run.returncode == 1 and "damaged" in run.stderr and "Traceback" not in run.stderr
    run = _cli("install", str(tmp_path / "nowhere"), models=models)
    assert run.returncode == 1 and run.stderr.startswith("medserve models: ")
