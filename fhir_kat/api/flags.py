"""Safety Flags staff act on: ``POST /api/v1/flags/<id>/$acknowledge`` (seen, someone is on
it; the Flag stays active) and ``POST /api/v1/flags/<id>/$resolve`` (status ``inactive``,
``period.end``), each with ``{"by": {family_name, given_names, identifier}, "note": "…"}``,
recorded on the Flag (extensions flag-acknowledgement / flag-resolution: by, at, note). The
same can be done with a FHIR ``PUT`` of the Flag; the open ones are
``GET /fhir/Flag?status=active&category=safety``. ``services.safety`` decides."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from fhir_kat.api.auth import audit_record, current_access
from fhir_kat.api.body import read_json
from fhir_kat.api.fhir import resource_response
from fhir_kat.artifacts import load_flag_action
from fhir_kat.errors import Forbidden, issue
from fhir_kat.security.policy import area_allowed
from fhir_kat.services.fhir_rest import require_access
from fhir_kat.services.safety import SafetyService

bp = Blueprint("flags", __name__, url_prefix="/api/v1/flags")


def _act(flag_id: str, *, resolve: bool) -> Response:
    record = audit_record()
    record.interaction = "update"
    record.entities.append(f"Flag/{flag_id}")
    access = current_access()
    if not area_allowed(access.principal.role, "operations:flags"):
        raise Forbidden(
            issue("forbidden", f"role {access.principal.role} may not act on safety Flags")
        )
    require_access(access, "Flag", "update")
    body = load_flag_action(read_json(request))
    service: SafetyService = current_app.extensions["fhir_kat"].services.safety
    act = service.resolve if resolve else service.acknowledge
    stored = act(flag_id, body["by"], body.get("note"), access)
    if stored.patient_id:
        record.patients.add(stored.patient_id)
    return resource_response(stored)


@bp.post("/<flag_id>/$acknowledge")
def acknowledge(flag_id: str) -> Response:
    return _act(flag_id, resolve=False)


@bp.post("/<flag_id>/$resolve")
def resolve(flag_id: str) -> Response:
    return _act(flag_id, resolve=True)
