"""What the benchmark measures: a *target* that serves one request and says when output came.

The measurement core (``runner.py``), the statistics, the tables and the JSON/Markdown/PNG
reports never know whether a target is a server over HTTP (``http_target.py``) or an engine
driven in-process (``medserve bench engine``); they only see this interface::

    class MyTarget:
        name: str                                   # label in tables, charts and JSON

        def describe(self) -> dict[str, Any]:       # JSON-safe facts: url, model, engine...
            ...

        async def generate(self, request: WorkloadRequest) -> Completion:
            # Serve the request; append time.perf_counter() to token_times each time a
            # piece of output is produced/received; raise TargetError on failure.
            ...
            return Completion(token_times, prompt_tokens=..., completion_tokens=...)

        async def aclose(self) -> None:             # release connections / the engine
            ...

The core reads ``time.perf_counter()`` just before awaiting ``generate`` and just after it
returns: TTFT = first token time - start, ITL = gaps between consecutive token times,
latency = end - start.  Why the target records the times itself rather than yielding each
token to the core: on this 2-core machine one asyncio wake-up per token costs the client
100-200 us of CPU that the engine then lacks; a target can take a timestamp where the token
appears (a ``recv`` in a thread, the engine's own step loop) and hand over the list once.

``completion_tokens`` is the target's exact count (the server's ``usage``, the engine's
tokens); ``None`` makes the core count ``len(token_times)`` instead (a server may merge
tokens into one delta; the reports say which count was used).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from medserve.benchmarks.workloads import WorkloadRequest


@dataclass(slots=True)
class Completion:
    """One served request, as the target saw it."""

    token_times: list[float] = field(default_factory=list)  # time.perf_counter() per output
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # exact count if known; None: len(token_times)


class TargetError(Exception):
    """A request failed (HTTP status, connection error, error event): counted as a failure."""


class Target(Protocol):
    """Something that serves a ``WorkloadRequest`` (see the module docstring)."""

    name: str

    def describe(self) -> dict[str, Any]: ...

    async def generate(self, request: WorkloadRequest) -> Completion: ...

    async def aclose(self) -> None: ...
