"""Builds the Litestar application: routes, error shapes, middleware and component lifecycles."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from litestar import Litestar, Response, get
from litestar.di import Provide
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from medserve.accel.backend import BackendSettings, WorkerBackend
from medserve.accel.backend import build_backend as build_worker_backend
from medserve.kv_cache.planner import check_fits_in_memory
from medserve.server.access_log import AccessLogMiddleware
from medserve.server.errors import EXCEPTION_HANDLERS, error_response
from medserve.server.openai_api import openai_router
from medserve.server.settings import Settings
from medserve.server.state import ServerState


@get("/health", include_in_schema=False)
async def health() -> dict[str, str]:
    """Liveness: the HTTP server answers.  Says nothing about the models."""
    return {"status": "ok"}


@get("/ready", include_in_schema=False)
async def ready(runtime: ServerState) -> Response[Any]:
    """Readiness: every component (models, case index) is loaded and running."""
    problems = [name for name, ok in runtime.components_ready().items() if not ok]
    if problems:
        return error_response(
            503, f"not ready: {', '.join(problems)} loading or stopped", code="not_ready"
        )
    backend = runtime.backend
    return Response(
        {
            "status": "ready",
            "models": [m.name for m in backend.models()] if backend else [],
            "in_flight": backend.in_flight() if backend else {},
        },
        status_code=200,
    )


@get("/metrics", include_in_schema=False)
async def metrics(runtime: ServerState) -> dict[str, Any]:
    """Per-model load: requests in flight, requests inside the engine, KV-cache usage (0-1)."""
    return {"models": await runtime.backend.stats() if runtime.backend else {}}


def build_backend(settings: Settings) -> WorkerBackend:
    engine = settings.engine
    names = [engine.model, *[n for n in engine.served_models if n != engine.model]]
    model_dirs = {name: engine.models_dir / name for name in names}
    check_fits_in_memory(model_dirs, engine.kv_cache_gb)
    return build_worker_backend(
        model_dirs,
        BackendSettings(
            max_num_seqs=engine.max_num_seqs,
            max_queue=engine.max_queue,
            max_context_tokens=engine.max_context_tokens,
            kv_cache_gb=engine.kv_cache_gb,
            startup_timeout_s=engine.startup_timeout_s,
            engine_options=engine.engine_options(),
        ),
    )


def create_app(settings: Settings) -> Litestar:
    backend = build_backend(settings) if settings.engine.enabled else None
    runtime = ServerState(
        backend=backend,
        default_model=settings.engine.model,
        default_max_tokens=settings.engine.default_max_tokens,
        request_timeout_s=settings.server.request_timeout_s,
    )
    route_handlers: list[Any] = [health, ready, metrics, openai_router]
    components: list[Any] = []
    if backend is not None:
        components.append(backend)
        runtime.readiness["models"] = backend.ready
    if settings.cases.enabled:
        from medserve.server.cases import build_cases

        cases = build_cases(settings.cases)
        components.append(cases)
        route_handlers.extend(cases.route_handlers)
        runtime.readiness["case index"] = cases.ready

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        # Start in order, stop in reverse; a component that failed to start stops nothing else.
        async with AsyncExitStack() as stack:
            for component in components:
                await component.start()
                stack.push_async_callback(component.stop)
            yield

    openapi = (
        OpenAPIConfig(
            title="medserve", version="0.1.0", path="/schema", render_plugins=[JsonRenderPlugin()]
        )
        if settings.server.docs
        else None
    )
    return Litestar(
        route_handlers=route_handlers,
        dependencies={"runtime": Provide(lambda: runtime, use_cache=True, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[lambda app: AccessLogMiddleware(app, settings.server.api_keys)],
        lifespan=[lifespan],
        openapi_config=openapi,
        request_max_body_size=settings.server.max_body_bytes,
        # Logging is configured by server/logging_setup.py; Litestar's default config would
        # replace the root handler with its own plain-text format.
        logging_config=None,
        debug=False,
    )
