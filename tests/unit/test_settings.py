"""Settings: TOML + env precedence, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest
from medserve.server.settings import SettingsError, load_settings


def test_defaults_bind_loopback_only() -> None:
    settings = load_settings(None, env={})
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8000
    assert settings.engine.model == "smollm2-135m-instruct"


def test_env_overrides_toml(tmp_path: Path) -> None:
    config = tmp_path / "medserve.toml"
    key = "k" * 20
    config.write_text(f'[server]\nport = 9000\napi_keys = ["{key}"]\n')
    settings = load_settings(config, env={"MEDSERVE_SERVER_PORT": "9100"})
    assert settings.server.port == 9100
    assert settings.server.api_keys == (key,)


def test_cli_overrides_win(tmp_path: Path) -> None:
    settings = load_settings(
        None, env={"MEDSERVE_SERVER_PORT": "9100"}, overrides={"server": {"port": 9200}}
    )
    assert settings.server.port == 9200


def test_env_list_and_bool_and_path_coercion() -> None:
    settings = load_settings(
        None,
        env={
            "MEDSERVE_ENGINE_SERVED_MODELS": "a, b",
            "MEDSERVE_ENGINE_ENABLE_PREFIX_CACHING": "off",
            "MEDSERVE_ENGINE_MODELS_DIR": "/srv/models",
        },
    )
    assert settings.engine.served_models == ("a", "b")
    assert settings.engine.enable_prefix_caching is False
    assert settings.engine.models_dir == Path("/srv/models")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"MEDSERVE_SERVER_PORT": "eighty"}, "server.port (from env MEDSERVE_SERVER_PORT)"),
        ({"MEDSERVE_SERVER_PORT": "70000"}, "server.port must be 1-65535"),
        ({"MEDSERVE_SERVER_PROT": "8000"}, "unknown environment variable MEDSERVE_SERVER_PROT"),
        ({"MEDSERVE_ENGINE_KV_CACHE_GB": "0"}, "engine.kv_cache_gb must be > 0"),
        ({"MEDSERVE_SERVER_DOCS": "maybe"}, "server.docs (from env MEDSERVE_SERVER_DOCS)"),
        ({"MEDSERVE_SERVER_API_KEYS": "short"}, "server.api_keys"),
    ],
)
def test_bad_values_name_the_key(env: dict[str, str], expected: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(None, env=env)
    assert expected in str(error.value)


def test_unknown_toml_key_lists_valid_keys(tmp_path: Path) -> None:
    config = tmp_path / "medserve.toml"
    config.write_text("[engine]\nmax_seqs = 4\n")
    with pytest.raises(SettingsError) as error:
        load_settings(config, env={})
    message = str(error.value)
    assert "engine.max_seqs" in message and "max_num_seqs" in message


def test_unknown_section_and_bad_toml(tmp_path: Path) -> None:
    config = tmp_path / "medserve.toml"
    config.write_text("[sever]\nport = 1\n")
    with pytest.raises(SettingsError, match=r"unknown section \[sever\]"):
        load_settings(config, env={})
    config.write_text("[server\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(config, env={})
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", env={})
