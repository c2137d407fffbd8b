"""``GET /healthz`` for load balancers: 200 when the database answers, 503 otherwise."""

from __future__ import annotations

from flask import Blueprint, Response, current_app
from sqlalchemy.exc import SQLAlchemyError

from fhir_kat.api.errors import outcome_response
from fhir_kat.errors import Issue

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response | tuple[dict[str, str], int]:
    try:
        current_app.extensions["fhir_kat"].store.ping()
    except SQLAlchemyError:
        return outcome_response(503, [Issue("transient", "database unavailable")])
    return {"status": "ok"}, 200
