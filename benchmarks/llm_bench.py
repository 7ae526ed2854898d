"""`medserve bench`: the engineers' benchmark command, dispatching to its sub-commands.

    medserve bench [run] ...      OpenAI-compatible servers over HTTP (benchmarks/run_cli.py)
    medserve bench bandwidth ...  memory bandwidth, the decode roofline (benchmarks/bandwidth.py)
    medserve bench engine ...     the engine in-process, without HTTP (benchmarks/engine_bench.py)
    medserve bench retrieval ...  embedder retrieval quality, zh/en (benchmarks/retrieval_eval.py)
    medserve bench structured ... schema validity of structured output (structured_validity.py)
    medserve bench answers ...    citation correctness of /v1/answers, zh/en (answers_eval.py)

``run`` is the default, so ``medserve bench --url ...`` works as it always did.  The other
sub-commands are imported only when asked for: they may pull in heavy libraries (torch, the
engine) that the HTTP benchmark never needs, and they may not exist yet in a checkout.
Measurement core shared by all of them: ``target.py`` (the interface), ``runner.py``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

# sub-command -> module exposing main(argv) -> int
SUBCOMMANDS = {
    "run": "medserve.benchmarks.run_cli",
    "bandwidth": "medserve.benchmarks.bandwidth",
    "engine": "medserve.benchmarks.engine_bench",
    "retrieval": "medserve.benchmarks.retrieval_eval",
    "structured": "medserve.benchmarks.structured_validity",
    "answers": "medserve.benchmarks.answers_eval",
}


def _load(command: str) -> Callable[[list[str]], int] | None:
    module_name = SUBCOMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the module exists but one of its own imports is missing: show that
        print(
            f"medserve bench {command}: not available in this checkout ({module_name} is missing).",
            file=sys.stderr,
        )
        return None
    return module.main  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "run"
    rest = argv[1:] if argv and argv[0] == command else argv
    entry = _load(command)
    return 2 if entry is None else entry(rest)


if __name__ == "__main__":
    sys.exit(main())
