"""`medserve serve` refuses a bad configuration at once, naming the setting and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEDSERVE_")}
    return subprocess.run(
        [sys.executable, "-m", "medserve.server.cli", "serve", *args],
        env={**clean, "MEDSERVE_CASES_ENABLED": "false", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"MEDSERVE_SERVER_PORT": "http"}, "server.port (from env MEDSERVE_SERVER_PORT)"),
        (
            {"MEDSERVE_ENGINE_MAXQUEUE": "3"},
            "unknown environment variable MEDSERVE_ENGINE_MAXQUEUE",
        ),
    ],
)
def test_bad_settings_exit_2_naming_the_key(env: dict[str, str], expected: str) -> None:
    completed = _serve(env)
    assert completed.returncode == 2
    assert expected in completed.stderr


def test_missing_model_points_to_setup(tmp_path: Path) -> None:
    completed = _serve({"MEDSERVE_ENGINE_MODELS_DIR": str(tmp_path)})
    assert completed.returncode == 2
    assert "medserve setup" in completed.stderr


def test_kv_cache_larger_than_ram_is_refused(models_dir: Path) -> None:
    completed = _serve(
        {"MEDSERVE_ENGINE_MODELS_DIR": str(models_dir), "MEDSERVE_ENGINE_KV_CACHE_GB": "4096"}
    )
    assert completed.returncode == 2
    assert "engine.kv_cache_gb=4096" in completed.stderr


def test_bad_toml_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "medserve.toml"
    config.write_text("[engine]\nmodel = 3\n")
    completed = _serve({}, "--config", str(config))
    assert completed.returncode == 2
    assert "engine.model" in completed.stderr and str(config) in completed.stderr
