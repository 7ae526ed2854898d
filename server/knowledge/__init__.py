"""Knowledge base with cited answers: documents in SQLite, passages in hnswlib (the case
index's VectorIndex), e5 embeddings, and /v1/answers grounded in the retrieved passages.

Layout: chunking.py (passages with offsets), store.py (SQLite), service.py (ingest, search,
recovery), answering.py (prompt, citations), api.py + schemas.py (HTTP), component.py
(lifecycle).  The app needs only ``build_knowledge``.
"""

from __future__ import annotations

from medserve.server.knowledge.api import knowledge_router
from medserve.server.knowledge.component import KnowledgeComponent
from medserve.server.settings import KnowledgeSettings

__all__ = ["KnowledgeComponent", "build_knowledge"]


def build_knowledge(settings: KnowledgeSettings) -> KnowledgeComponent:
    component = KnowledgeComponent(settings)
    component.route_handlers = [knowledge_router(component)]
    return component
