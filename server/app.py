"""Builds the Litestar application: routes, error shapes, middleware and component lifecycles."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

from litestar import Litestar, Response, Router, get
from litestar.di import Provide
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from medserve.accel.backend import BackendSettings, WorkerBackend
from medserve.accel.backend import build_backend as build_worker_backend
from medserve.kv_cache.planner import check_fits_in_memory
from medserve.server.access_log import AccessLogMiddleware
from medserve.server.admin_api import reload_models, reload_on_sighup
from medserve.server.api_docs import add_body_schemas, documented
from medserve.server.audit.case_ids import CaseIdHasher, load_or_create_key
from medserve.server.audit.middleware import AuditMiddleware
from medserve.server.audit.writer import AuditLog
from medserve.server.auth.authenticator import Authenticator
from medserve.server.auth.limits import RateLimiter, RateLimitMiddleware
from medserve.server.auth.middleware import AuthMiddleware
from medserve.server.auth.principal import Limits
from medserve.server.auth.scopes import AUTHENTICATED, METRICS, PUBLIC, route_scope
from medserve.server.errors import EXCEPTION_HANDLERS, error_response
from medserve.server.metrics import (
    PROMETHEUS_CONTENT_TYPE,
    Metrics,
    MetricsJSON,
    MetricsMiddleware,
    engine_snapshot,
)
from medserve.server.openai_api import openai_router
from medserve.server.settings import Settings
from medserve.server.state import ServerState


@get("/health", include_in_schema=False, opt=route_scope(PUBLIC))
async def health() -> dict[str, str]:
    """Liveness: the HTTP server answers.  Says nothing about the models."""
    return {"status": "ok"}


@get("/ready", include_in_schema=False, opt=route_scope(PUBLIC))
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
            "versions": {m.name: m.version for m in backend.models()} if backend else {},
            "in_flight": backend.in_flight() if backend else {},
        },
        status_code=200,
    )


def metrics_routes(
    metrics: Metrics, max_num_seqs: int, cases_indexed: Callable[[], int | None]
) -> list[Any]:
    """/metrics (Prometheus text) and /metrics.json (each worker's own stats)."""

    @get(
        "/metrics",
        opt=route_scope(METRICS),
        media_type=PROMETHEUS_CONTENT_TYPE,
        operation_class=documented(media_type="text/plain"),
    )
    async def prometheus(runtime: ServerState) -> Response[bytes]:
        """Prometheus text format: requests, latencies, tokens, queue, KV cache, case index."""
        snapshot = await engine_snapshot(runtime.backend, max_num_seqs, cases_indexed())
        return Response(metrics.render(snapshot), media_type=PROMETHEUS_CONTENT_TYPE)

    @get("/metrics.json", opt=route_scope(METRICS), operation_class=documented(None, MetricsJSON))
    async def metrics_json(runtime: ServerState) -> dict[str, Any]:
        """Per model: requests in flight and in the engine, KV-cache usage (0-1), restarts."""
        return {"models": await runtime.backend.stats() if runtime.backend else {}}

    return [prometheus, metrics_json]


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
            drain_timeout_s=settings.server.drain_timeout_s,
        ),
    )


def security_middleware(settings: Settings, components: list[Any]) -> list[Any]:
    """Outermost first: log every request (refusals too) -> authenticate and check the route's
    scope -> per-key limits -> audit record for patient-data routes."""
    auth = settings.auth
    authenticator = Authenticator(
        auth.keys_file,
        settings.server.api_keys,
        Limits(auth.default_rpm, auth.default_tpm, auth.default_max_streams),
    )
    limiter = RateLimiter()
    middleware: list[Any] = [
        AccessLogMiddleware,
        lambda app: AuthMiddleware(app, authenticator),
        lambda app: RateLimitMiddleware(app, limiter),
    ]
    if settings.audit.enabled:
        audit_log = AuditLog(
            settings.audit.dir,
            fsync=settings.audit.fsync,
            max_file_bytes=settings.audit.max_file_bytes,
        )
        hasher = CaseIdHasher(load_or_create_key(settings.audit.dir / "case-id.key"))
        components.insert(0, audit_log)  # started first, stopped last
        middleware.append(lambda app: AuditMiddleware(app, audit_log, hasher))
    return middleware


def _no_case_index() -> int | None:
    return None


def _case_count(cases: Any) -> int | None:
    """Cases in the index, once it is loaded (its filter columns hold one row per case)."""
    return cases.service.attrs.count if cases.ready() else None


def _document_bodies(app: Litestar) -> None:
    if app.openapi_config is not None:
        add_body_schemas(app.openapi_schema)


def create_app(settings: Settings) -> Litestar:
    backend = build_backend(settings) if settings.engine.enabled else None
    runtime = ServerState(
        backend=backend,
        default_model=settings.engine.model,
        default_max_tokens=settings.engine.default_max_tokens,
        request_timeout_s=settings.server.request_timeout_s,
    )
    metrics = Metrics()
    route_handlers: list[Any] = [health, ready, openai_router, reload_models]
    components: list[Any] = []
    cases_indexed: Callable[[], int | None] = _no_case_index
    cases: Any = None
    if backend is not None:
        components.append(backend)
        runtime.readiness["models"] = backend.ready
    if settings.cases.enabled:
        from medserve.server.cases import build_cases

        cases = build_cases(settings.cases)
        components.append(cases)
        route_handlers.extend(cases.route_handlers)
        runtime.readiness["case index"] = cases.ready
        cases_indexed = partial(_case_count, cases)
    if backend is not None:
        # Clinical helpers need the model; their similar-cases route also the case index.
        from medserve.server.clinical import clinical_router

        route_handlers.append(clinical_router(cases))
    if settings.knowledge.enabled:
        from medserve.server.knowledge import build_knowledge

        knowledge = build_knowledge(settings.knowledge)
        components.append(knowledge)
        route_handlers.extend(knowledge.route_handlers)
        runtime.readiness["knowledge base"] = knowledge.ready
    route_handlers.extend(metrics_routes(metrics, settings.engine.max_num_seqs, cases_indexed))

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        # Start in order, stop in reverse; a component that failed to start stops nothing else.
        async with AsyncExitStack() as stack:
            if backend is not None:
                # Before the workers start (see reload_on_sighup); closed after they stop.
                await stack.enter_async_context(reload_on_sighup(backend))
            for component in components:
                await component.start()
                stack.push_async_callback(component.stop)
            yield

    openapi = (
        OpenAPIConfig(
            title="medserve",
            version="0.1.0",
            path="/schema",
            render_plugins=[JsonRenderPlugin()],
            # Any valid key may read the API description; no scope is needed.
            openapi_router=Router(
                "/schema",
                route_handlers=[],
                opt=route_scope(AUTHENTICATED),
                include_in_schema=False,
            ),
        )
        if settings.server.docs
        else None
    )
    return Litestar(
        route_handlers=route_handlers,
        dependencies={
            "runtime": Provide(lambda: runtime, use_cache=True, sync_to_thread=False),
            "metrics": Provide(lambda: metrics, use_cache=True, sync_to_thread=False),
        },
        exception_handlers=EXCEPTION_HANDLERS,
        # Metrics outermost: refusals (401, 403, 429) are counted too.
        middleware=[
            lambda app: MetricsMiddleware(app, metrics),
            *security_middleware(settings, components),
        ],
        on_startup=[_document_bodies],
        after_exception=[metrics.count_unrouted],
        lifespan=[lifespan],
        openapi_config=openapi,
        request_max_body_size=settings.server.max_body_bytes,
        # Logging is configured by server/logging_setup.py; Litestar's default config would
        # replace the root handler with its own plain-text format.
        logging_config=None,
        debug=False,
    )
