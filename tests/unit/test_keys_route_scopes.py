"""Every route declares the scope it needs, and a route that declares none is refused (fail
closed) -- served by uvicorn on 127.0.0.1, through the same middleware the server uses."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from litestar import Litestar, get
from medserve.server.app import create_app
from medserve.server.auth.authenticator import Authenticator
from medserve.server.auth.middleware import AuthMiddleware
from medserve.server.auth.principal import Limits
from medserve.server.auth.scopes import CHAT, required_scopes, route_scope
from medserve.server.settings import (
    AuditSettings,
    AuthSettings,
    CasesSettings,
    EngineSettings,
    ServerSettings,
    Settings,
)

from tests.server_process import free_port


def test_every_route_of_the_app_declares_a_scope(tmp_path: Path) -> None:
    settings = Settings(
        server=ServerSettings(docs=True),
        engine=EngineSettings(enabled=False),
        cases=CasesSettings(data_dir=tmp_path / "cases"),
        auth=AuthSettings(keys_file=tmp_path / "keys.json"),
        audit=AuditSettings(dir=tmp_path / "audit"),
    )
    app = create_app(settings)
    paths = set()
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            if set(handler.http_methods) == {"OPTIONS"}:
                continue  # Litestar's implicit OPTIONS handler: refused like any unscoped one
            paths.add(route.path)
            assert required_scopes(handler) is not None, f"{route.path} declares no scope"
    # the check saw the routes that matter
    assert {"/health", "/v1/cases/{case_id:str}", "/v1/chat/completions"} <= paths
    assert any(p.startswith("/schema") for p in paths)


@get("/scoped", opt=route_scope(CHAT))
async def scoped() -> dict[str, str]:
    return {"ok": "yes"}


@get("/forgotten")
async def forgotten() -> dict[str, str]:
    return {"ok": "should never be served"}


@pytest.fixture
def open_install(tmp_path: Path) -> Iterator[str]:
    """An install without keys (everyone is let in) -- except on a route without a scope."""
    authenticator = Authenticator(tmp_path / "keys.json", (), Limits())
    app = Litestar(
        route_handlers=[scoped, forgotten],
        middleware=[lambda app: AuthMiddleware(app, authenticator)],
        logging_config=None,
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_route_without_a_scope_fails_closed(open_install: str) -> None:
    assert httpx.get(open_install + "/scoped").status_code == 200
    response = httpx.get(open_install + "/forgotten")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "route_without_scope"
    assert httpx.options(open_install + "/scoped").status_code == 403
