"""The server process never imports an engine library: engines live in worker processes,
some in other virtual environments (ipex-llm, IPEX) whose pins cannot coexist with the
server's, and ipex-llm is archived upstream with known security issues."""

from __future__ import annotations

import subprocess
import sys

ENGINE_MODULES = ("torch", "transformers", "ipex_llm", "intel_extension_for_pytorch")


def test_server_and_registry_import_no_engine_library() -> None:
    code = (
        "import sys\n"
        "import medserve.server.app, medserve.server.cli, medserve.accel.backend\n"
        "from medserve.accel.registry import ENGINES\n"
        "assert {'ipex-llm', 'ipex'} <= set(ENGINES)\n"
        f"print([m for m in {ENGINE_MODULES!r} if m in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"
