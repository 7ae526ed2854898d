"""Reloading models without downtime: ``POST /admin/reload`` and SIGHUP run the same reload.

After ``medserve models activate`` (or ``rollback``) has swapped a model's link, a reload
starts a worker on the new version beside the old one, sends new requests to it once it is
ready and stops the old worker when its requests have finished (accel/backend.py). Requests
and streams already running are not touched. Reloads run one at a time: over HTTP a second
one is refused with 409 while one runs; a SIGHUP waits for the running one and then reloads.

Logs name models, versions and outcomes only: nothing of any request is involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol, runtime_checkable

import msgspec
import structlog
from litestar import Response, post
from medserve.accel.backend import ReloadBusy, ReloadResult, version_of
from medserve.accel.base import BackendError
from medserve.server.api_docs import documented
from medserve.server.auth.scopes import ADMIN, route_scope
from medserve.server.errors import APIError, error_body
from medserve.server.state import ServerState

log = structlog.get_logger("medserve.reload")


@runtime_checkable
class Reloadable(Protocol):
    async def reload(self, *, wait: bool = True) -> dict[str, ReloadResult]: ...


class ModelReload(msgspec.Struct):
    status: Literal["switched", "unchanged", "failed"]
    """switched: a new worker serves the new folder; unchanged: the link did not move;
    failed: the old worker keeps serving (see error)."""
    from_: str = msgspec.field(name="from")
    """The folder served before the reload."""
    to: str
    """The folder the model's link points to now."""
    error: str | None


class ReloadReport(msgspec.Struct):
    """The body of ``POST /admin/reload``: one entry per served model."""

    models: dict[str, ModelReload]


@post(
    "/admin/reload",
    status_code=200,
    opt=route_scope(ADMIN),
    operation_class=documented(None, ReloadReport),
)
async def reload_models(runtime: ServerState) -> Response[Any]:
    """Serve each model from its active version; 200 with the report, 500 if one failed.

    Returns once every changed model's new worker serves (its old one drains in the
    background). 409 while another reload runs. On 500 the body is an OpenAI error whose
    ``models`` field holds the same report: the models that did not fail were switched.
    """
    backend = runtime.require_backend()
    if not isinstance(backend, Reloadable):
        raise APIError(501, "this backend cannot reload models", code="not_supported")
    try:
        report = await reload_logged(backend, "http", wait=False)
    except ReloadBusy as exc:
        raise APIError(409, str(exc), code="reload_in_progress") from None
    except BackendError as exc:
        raise APIError(503, str(exc), code="backend_error") from None
    failed = sorted(name for name, result in report.items() if result["status"] == "failed")
    if failed:
        message = "; ".join(f"{report[name]['error']}" for name in failed)
        body = error_body(500, f"reload failed for {', '.join(failed)}: {message}")
        body["error"]["code"] = "reload_failed"
        return Response({**body, "models": report}, status_code=500)
    return Response({"models": report}, status_code=200)


async def reload_logged(
    backend: Reloadable, trigger: str, *, wait: bool = True
) -> dict[str, ReloadResult]:
    """Run a reload and log its outcome per model (names, versions, status, error)."""
    try:
        report = await backend.reload(wait=wait)
    except BackendError as exc:
        log.warning("models_reload_refused", trigger=trigger, reason=str(exc))
        raise
    for name, result in report.items():
        fields = {
            "trigger": trigger,
            "model": name,
            "status": result["status"],
            "from_version": version_of(result["from"]),
            "to_version": version_of(result["to"]),
        }
        if result["status"] == "failed":
            log.error("model_reload_failed", **fields, error=result["error"])
        else:
            log.info("model_reloaded", **fields)
    return report


@contextlib.asynccontextmanager
async def reload_on_sighup(backend: Reloadable) -> AsyncIterator[None]:
    """While open, SIGHUP reloads the models (the default action would kill the server).

    Enter it before the workers start: a handled signal is reset to its default in a child,
    an ignored one would stay ignored in every worker.
    """
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[Any]] = set()

    def on_sighup() -> None:
        task = loop.create_task(_sighup_reload(backend), name="sighup-reload")
        pending.add(task)  # the loop keeps only a weak reference to tasks
        task.add_done_callback(pending.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    except (ValueError, RuntimeError, NotImplementedError):
        # Not the main thread (an in-process test client): POST /admin/reload still works.
        log.info("sighup_reload_unavailable")
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        # Removing restored the default (terminate); a late SIGHUP must not kill the shutdown.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def _sighup_reload(backend: Reloadable) -> None:
    with contextlib.suppress(BackendError):  # refused while stopping: already logged
        await reload_logged(backend, "sighup")
