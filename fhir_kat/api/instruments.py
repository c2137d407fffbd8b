"""``QuestionnaireResponse/$extract`` (type and instance level): the Observations a response
yields, returned and not stored, as SDC defines the operation."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, current_app, request

from fhir_kat.api.auth import audit_record, current_access
from fhir_kat.api.body import read_json
from fhir_kat.api.fhir import json_response, service
from fhir_kat.errors import BadRequest, issue
from fhir_kat.services.fhir_rest import require_access
from fhir_kat.services.instruments import InstrumentService

bp = Blueprint("instruments", __name__, url_prefix="/fhir")


def _extract(qr: Any) -> Response:
    svc: InstrumentService = current_app.extensions["fhir_kat"].instruments
    if not isinstance(qr, dict) or qr.get("resourceType") != "QuestionnaireResponse":
        raise BadRequest(issue("invalid", "expected a QuestionnaireResponse", "resource"))
    return json_response(json.dumps(svc.extract_bundle(qr), separators=(",", ":")))


@bp.post("/QuestionnaireResponse/$extract")
def extract_type() -> Response:
    audit_record().interaction = "operation"
    require_access(current_access(), "QuestionnaireResponse", "read")
    body: Any = read_json(request)
    if isinstance(body, dict) and body.get("resourceType") == "Parameters":
        body = next(
            (
                p.get("resource")
                for p in body.get("parameter", [])
                if p.get("name") == "questionnaire-response"
            ),
            None,
        )
    return _extract(body)


@bp.post("/QuestionnaireResponse/<rid>/$extract")
def extract_instance(rid: str) -> Response:
    audit_record().interaction = "operation"
    stored = service().read("QuestionnaireResponse", rid, current_access())
    audit_record().entities.append(f"QuestionnaireResponse/{rid}")
    return _extract(stored.json())
