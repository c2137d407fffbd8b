"""SDC operations. ``QuestionnaireResponse/$extract`` (type and instance level): what a response
yields, returned and not stored, as SDC defines the operation — an instrument's Observations, or
for the referral form (``Questionnaire/kat-referral``) the referral's transaction Bundle, the
one ``POST /api/v1/referrals`` would store. ``Questionnaire/kat-referral/$populate``: the form
prefilled from the launch context the caller passes (``context`` parts ``patient``, ``user``,
``conditions``)."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, current_app, request

from fhir_kat.api.auth import audit_record, current_access
from fhir_kat.api.body import read_json
from fhir_kat.api.fhir import json_response, service
from fhir_kat.errors import BadRequest, issue
from fhir_kat.mapping.sdc_referral import is_referral_response, populate
from fhir_kat.services.artifacts import ArtifactService
from fhir_kat.services.fhir_rest import require_access
from fhir_kat.services.instruments import InstrumentService

bp = Blueprint("instruments", __name__, url_prefix="/fhir")


def _extract(qr: Any) -> Response:
    state = current_app.extensions["fhir_kat"]
    svc: InstrumentService = state.instruments
    if not isinstance(qr, dict) or qr.get("resourceType") != "QuestionnaireResponse":
        raise BadRequest(issue("invalid", "expected a QuestionnaireResponse", "resource"))
    if is_referral_response(qr):
        artifacts: ArtifactService = state.artifacts
        access = current_access()  # the dry run as this caller: its own refusals, its view
        bundle = artifacts.transform("referrals", qr, access.principal.client_id, access)
        return json_response(json.dumps(bundle, separators=(",", ":"), ensure_ascii=False))
    return json_response(json.dumps(svc.extract_bundle(qr), separators=(",", ":")))


@bp.post("/Questionnaire/kat-referral/$populate")
def populate_referral() -> Response:
    """SDC ``$populate`` (Parameters in, Parameters with ``response`` out). The EHR's data
    comes in the request (``context`` with ``content``): the service fetches nothing and
    keeps nothing of it."""
    audit_record().interaction = "operation"
    require_access(current_access(), "Questionnaire", "read")
    body: Any = read_json(request)
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise BadRequest(issue("invalid", "expected Parameters (SDC $populate)", "resource"))
    context: dict[str, Any] = {}
    subject = None
    for p in body.get("parameter", []):
        if not isinstance(p, dict):
            continue
        if p.get("name") == "subject":
            subject = (p.get("valueReference") or {}).get("reference")
        if p.get("name") == "context":
            parts = {q.get("name"): q for q in p.get("part", []) if isinstance(q, dict)}
            name = (parts.get("name") or {}).get("valueString")
            content = (parts.get("content") or {}).get("resource")
            if isinstance(name, str) and isinstance(content, dict):
                context[name] = content
    response = populate(context, subject if isinstance(subject, str) else None)
    out = {"resourceType": "Parameters", "parameter": [{"name": "response", "resource": response}]}
    return json_response(json.dumps(out, separators=(",", ":"), ensure_ascii=False))


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
