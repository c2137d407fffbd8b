"""``GET /fhir/Composition/<id>/$document``: the feedback document of a completed referral as a
``document`` Bundle (``services.feedback`` decides who may read it)."""

from __future__ import annotations

import json

from flask import Blueprint, Response, current_app

from fhir_kat.api.auth import audit_record, current_access
from fhir_kat.api.fhir import json_response
from fhir_kat.services.feedback import ReferrerFeedback

bp = Blueprint("feedback", __name__, url_prefix="/fhir")


@bp.get("/Composition/<composition_id>/$document")
def document(composition_id: str) -> Response:
    record = audit_record()
    record.interaction = "operation"
    record.entities.append(f"Composition/{composition_id}")
    service: ReferrerFeedback = current_app.extensions["fhir_kat"].extras["feedback"]
    bundle = service.document(composition_id, current_access())
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "Patient":
            record.patients.add(entry["resource"]["id"])
    return json_response(json.dumps(bundle, separators=(",", ":")))
