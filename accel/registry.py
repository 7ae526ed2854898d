"""Which engines exist, which module implements each, and which Python runs it.

Importable in every engine's virtual environment: it names modules, it never imports an
engine library. The server reads a model folder's manifest, looks its engine up here, and
starts ``python -m medserve.accel.worker`` with that engine's interpreter; only the worker
imports the engine module.

Engines whose pins cannot live beside OpenVINO's (ipex-llm wants transformers <= 4.47, IPEX
a torch 2.8 build, the GGML engines their own native builds) get their own virtual
environment, created by ``installer/setup.sh --with NAME`` next to the main one.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

from medserve.accel.engine_core import EngineCore
from medserve.accel.protocol import Configure


class UnknownEngine(ValueError):
    pass


class EngineNotInstalled(RuntimeError):
    pass


@dataclass(frozen=True)
class EngineEntry:
    name: str
    module: str
    """Module with ``load(config: Configure) -> EngineCore``."""
    venv: str | None
    """Folder name of its virtual environment beside the main one; None: the server's own."""
    formats: tuple[str, ...]
    """Manifest ``format`` values this engine serves."""


ENGINES: dict[str, EngineEntry] = {
    "openvino": EngineEntry("openvino", "medserve.accel.openvino_engine", None, ("openvino-ir",)),
    "ipex-llm": EngineEntry(
        "ipex-llm", "medserve.accel.ipex_llm_engine", ".venv-ipex-llm", ("ipex-llm-low-bit",)
    ),
    "ipex": EngineEntry("ipex", "medserve.accel.ipex_engine", ".venv-ipex", ("hf",)),
    "chatglm-cpp": EngineEntry(
        "chatglm-cpp", "medserve.accel.chatglm_cpp_engine", ".venv-chatglm-cpp", ("chatglm-cpp",)
    ),
    "llama-cpp": EngineEntry(
        "llama-cpp", "medserve.accel.llama_cpp_engine", ".venv-llama-cpp", ("gguf",)
    ),
}


def engine_entry(name: str) -> EngineEntry:
    try:
        return ENGINES[name]
    except KeyError:
        raise UnknownEngine(
            f"unknown engine {name!r}; medserve knows: {', '.join(sorted(ENGINES))}"
        ) from None


def main_venv() -> Path:
    """The virtual environment the server runs in (``.venv`` beside the repository)."""
    return Path(sys.prefix)


def worker_python(name: str, venvs_root: Path | None = None) -> Path:
    """The interpreter that runs engine ``name``; EngineNotInstalled says how to get it."""
    entry = engine_entry(name)
    if entry.venv is None:
        return Path(sys.executable)
    root = venvs_root if venvs_root is not None else main_venv().parent
    python = root / entry.venv / "bin" / "python"
    if not python.is_file():
        raise EngineNotInstalled(
            f"engine {name!r} is not installed ({python} is missing); install it with "
            f"`bash installer/setup.sh --with {name}`"
        )
    return python


def load_engine(config: Configure) -> EngineCore:
    """Import the engine's module and load the model (runs inside the worker process)."""
    module = importlib.import_module(engine_entry(config.engine).module)
    return module.load(config)
