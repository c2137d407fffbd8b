"""``$evaluate-measure`` on the program-outcome Measure (GET with query parameters, or POST with
a Parameters resource)."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, current_app, request

from fhir_kat.api.auth import audit_record, current_access
from fhir_kat.api.body import read_json
from fhir_kat.api.fhir import json_response
from fhir_kat.errors import BadRequest, Forbidden, issue
from fhir_kat.profiles import declare
from fhir_kat.security.policy import area_allowed
from fhir_kat.services.outcomes import OutcomeService

bp = Blueprint("measure", __name__, url_prefix="/fhir")


def _params() -> dict[str, str]:
    if request.method == "GET":
        return {k: v for k, v in request.args.items()}
    body: Any = read_json(request)
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise BadRequest(issue("invalid", "POST a Parameters resource", "Parameters"))
    out = {}
    for p in body.get("parameter", []):
        value = next((v for k, v in p.items() if k.startswith("value")), None)
        if isinstance(value, str):
            out[p.get("name", "")] = value
    return out


@bp.route("/Measure/<measure_id>/$evaluate-measure", methods=["GET", "POST"])
def evaluate_measure(measure_id: str) -> Response:
    record = audit_record()
    record.interaction = "operation"
    record.entities.append(f"Measure/{measure_id}")
    access = current_access()
    if not area_allowed(access.principal.role, "operations:measure"):
        raise Forbidden(
            issue("forbidden", f"role {access.principal.role} may not evaluate measures")
        )
    params = _params()
    unknown = set(params) - {"periodStart", "periodEnd", "subject", "reportType", "_format"}
    if unknown:
        raise BadRequest(
            [issue("not-supported", f"unknown parameter {u}", u) for u in sorted(unknown)]
        )
    if params.get("reportType", "summary") != "summary":
        raise BadRequest(issue("not-supported", "only reportType=summary", "reportType"))
    service: OutcomeService = current_app.extensions["fhir_kat"].outcomes
    report = service.evaluate_measure(
        measure_id,
        params.get("periodStart"),
        params.get("periodEnd"),
        params.get("subject"),
        access,
    )
    declare(report)  # the summary report's profile (kat-outcome-measurereport)
    return json_response(json.dumps(report, separators=(",", ":")))
