"""LangChain's ChatOpenAI, pointed at medserve, streams from every engine.

The seed's integration path: a hospital application built on LangChain needs only
``base_url``. One server serves the bundled model through OpenVINO, its ipex-llm sym_int4
build and (when .venv-ipex is installed) its IPEX bf16 build side by side; the same client
code streams from each.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BUNDLED_MODEL, medserve_home
from tests.integration.ipex_llm_models import (
    HF_DIR_NAME,
    quantized_bundled_model,
    require_engine,
    serving_dir,
)
from tests.server_process import ServerProcess

# LangSmith tracing would post every prompt to a cloud service: off, whatever the environment.
os.environ["LANGCHAIN_TRACING_V2"] = "false"
os.environ["LANGSMITH_TRACING"] = "false"

ENGINES = ("openvino", "ipex-llm", "ipex")


@pytest.fixture(scope="module")
def served_models(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    """(server, engine -> model name); an engine that is not installed is simply absent."""
    folders = {"openvino": models_dir / BUNDLED_MODEL}
    hf_dir = medserve_home() / "hf" / HF_DIR_NAME
    for engine, precision in (("ipex-llm", "sym_int4"), ("ipex", "bf16")):
        try:
            require_engine(engine)
        except pytest.skip.Exception:
            continue
        built, name = quantized_bundled_model(tmp_path_factory, hf_dir, precision, engine=engine)
        folders[engine] = built / name
    serve = serving_dir(tmp_path_factory.mktemp("langchain") / "models", *folders.values())
    names = {engine: folder.name for engine, folder in folders.items()}
    env = {
        "MEDSERVE_ENGINE_MODELS_DIR": str(serve),
        "MEDSERVE_ENGINE_MODEL": BUNDLED_MODEL,
        "MEDSERVE_ENGINE_SERVED_MODELS": ",".join(n for n in names.values() if n != BUNDLED_MODEL),
        "MEDSERVE_CASES_ENABLED": "false",
    }
    with ServerProcess.start(serve.parent, env=env) as server:
        yield server, names


@pytest.mark.parametrize("engine", ENGINES)
def test_chat_openai_streams_from_each_engine(
    served_models: tuple[ServerProcess, dict[str, str]], engine: str
) -> None:
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    server, names = served_models
    if engine not in names:
        require_engine(engine)  # skips with the reason, or fails when CI requires it
    llm = ChatOpenAI(
        model=names[engine],
        base_url=server.base_url + "/v1",
        api_key="unused",
        temperature=0,
        max_tokens=32,
        max_retries=0,
        timeout=120,
    )
    messages = [
        SystemMessage("You are a helpful AI assistant."),
        HumanMessage("What is the capital of France?"),
    ]
    chunks = list(llm.stream(messages))
    streamed = "".join(str(chunk.content) for chunk in chunks)
    assert "Paris" in streamed
    assert len([c for c in chunks if c.content]) > 2  # token by token, not one lump
    assert llm.invoke(messages).content == streamed  # greedy: the same answer both ways
