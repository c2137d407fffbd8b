"""Operators' view of the outbox (admin only): list, inspect, retry, cancel, metrics."""

from __future__ import annotations

import json

from flask import Blueprint, Response, current_app, request

from fhir_kat.api.auth import audit_record, current_access
from fhir_kat.api.fhir import json_response
from fhir_kat.errors import BadRequest, Forbidden, issue
from fhir_kat.exchange import outbox
from fhir_kat.security.policy import area_allowed
from fhir_kat.store import Store

bp = Blueprint("deliveries", __name__, url_prefix="/api/v1/deliveries")


def _store() -> Store:
    access = current_access()
    if not area_allowed(access.principal.role, "deliveries"):
        raise Forbidden(issue("forbidden", "deliveries are for admins", "deliveries"))
    audit_record().interaction = "operation"
    store: Store = current_app.extensions["fhir_kat"].store
    return store


def _json(data: object, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, content_type="application/json")


@bp.get("")
def list_deliveries() -> Response:
    store = _store()
    status = request.args.get("status")
    if status is not None and status not in outbox.STATUSES:
        raise BadRequest(
            issue("value", f"status must be one of {', '.join(outbox.STATUSES)}", "status")
        )
    limit = request.args.get("limit", default=50, type=int)
    offset = request.args.get("offset", default=0, type=int)
    rows = outbox.list_deliveries(
        store, status, max(1, min(limit, 500)), max(0, offset), partner=request.args.get("partner")
    )
    return _json({"deliveries": [r.to_json() for r in rows]})


@bp.get("/stats")
def delivery_stats() -> Response:
    return _json(outbox.stats(_store(), partner=request.args.get("partner")).to_json())


@bp.get("/<int:delivery_id>")
def get_delivery(delivery_id: int) -> Response:
    return _json(outbox.get_delivery(_store(), delivery_id).to_json())


@bp.post("/<int:delivery_id>/retry")
def retry(delivery_id: int) -> Response:
    return _json(outbox.requeue(_store(), delivery_id, force=_force()).to_json())


@bp.post("/<int:delivery_id>/cancel")
def cancel(delivery_id: int) -> Response:
    return _json(outbox.cancel(_store(), delivery_id).to_json())


@bp.post("/retry-dead")
def retry_dead() -> Response:
    result = outbox.retry_dead(_store(), partner=request.args.get("partner"), force=_force())
    return json_response(json.dumps({"requeued": result.requeued, "superseded": result.superseded}))


def _force() -> bool:
    """``?force=true``: also retry what a later delivery of the same patient superseded."""
    value = request.args.get("force", "false")
    if value not in ("true", "false"):
        raise BadRequest("force must be true or false", expression="force")
    return value == "true"
