"""The configuration example in README.md is a valid settings file."""

from __future__ import annotations

import re
from pathlib import Path

from medserve.server.settings import load_settings

README = Path(__file__).parents[2] / "README.md"


def test_readme_toml_example_loads(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README.md has no TOML example"
    config = tmp_path / "medserve.toml"
    config.write_text(blocks[0], encoding="utf-8")
    settings = load_settings(config, env={})
    assert settings.server.host == "127.0.0.1"
    assert settings.engine.kv_cache_gb == 1
    assert settings.engine.served_models == ("smollm2-135m-instruct-fp16",)
    assert settings.engine.models_dir == Path("~/.medserve/models").expanduser()
    assert settings.cases.hnsw_ef_search == 160
