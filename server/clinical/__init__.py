"""Clinical helpers for HIS/EMR integrations: symptom extraction, patient-friendly discharge
summaries and a summary of similar indexed cases, each a JSON document constrained to a schema.

The app needs only ``clinical_router``.  Layout: schemas.py (request/response bodies and the
JSON Schemas of the model's output), prompts.py (what the model is asked), api.py (HTTP).
"""

from __future__ import annotations

from medserve.server.clinical.api import clinical_router

__all__ = ["clinical_router"]
