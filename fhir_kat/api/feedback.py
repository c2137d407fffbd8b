"""Program end and its feedback: ``POST /api/v1/referrals/<task id>/$end`` (staff end a
referral: ``{"outcome": "completed" | "cancelled" | "failed", "reason": "…"}``) and
``GET /fhir/Composition/<id>/$document`` (the feedback document as a ``document`` Bundle;
``services.feedback`` decides who may read it)."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, current_app, request

from fhir_kat.api.auth import audit_record, current_access
from fhir_kat.api.body import read_json
from fhir_kat.api.fhir import json_response
from fhir_kat.errors import BadRequest, Forbidden, issue
from fhir_kat.security.policy import area_allowed
from fhir_kat.services.feedback import ReferrerFeedback
from fhir_kat.services.referrals import end_referral

bp = Blueprint("feedback", __name__)


@bp.post("/api/v1/referrals/<task_id>/$end")
def end(task_id: str) -> Response:
    record = audit_record()
    record.interaction = "update"
    record.entities.append(f"Task/{task_id}")
    access = current_access()
    if not area_allowed(access.principal.role, "operations:referral-end"):
        raise Forbidden(issue("forbidden", f"role {access.principal.role} may not end referrals"))
    body: Any = read_json(request)
    if not isinstance(body, dict):
        raise BadRequest(issue("structure", "the body must be a JSON object"))
    unknown = sorted(set(body) - {"outcome", "reason", "date"})
    if unknown:
        raise BadRequest([issue("structure", f"unknown field {u}", u) for u in unknown])
    state = current_app.extensions["fhir_kat"]
    result = end_referral(
        state.fhir,
        task_id,
        body.get("outcome"),
        body.get("reason"),
        access,
        date=body.get("date"),
        now=state.clock(),
    )
    if result.stored.patient_id:
        record.patients.add(result.stored.patient_id)
    return json_response(result.stored.content)


@bp.get("/fhir/Composition/<composition_id>/$document")
def document(composition_id: str) -> Response:
    record = audit_record()
    record.interaction = "operation"
    record.entities.append(f"Composition/{composition_id}")
    service: ReferrerFeedback = current_app.extensions["fhir_kat"].services.feedback
    bundle = service.document(composition_id, current_access())
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "Patient":
            record.patients.add(entry["resource"]["id"])
    return json_response(json.dumps(bundle, separators=(",", ":")))
