"""Bulk Data ``$export`` endpoints: kick-off (system, Patient, Group), status polling, cancel
and file download. All need a token; files are served only to the client that asked."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, request, send_file

from fhir_kat.api.auth import audit_record, current_access
from fhir_kat.api.body import read_json
from fhir_kat.api.fhir import fhir_base, json_response, prefer
from fhir_kat.errors import BadRequest, Forbidden, issue
from fhir_kat.security.policy import area_allowed
from fhir_kat.services.export import ExportService
from fhir_kat.store.store import dumps

bp = Blueprint("export", __name__, url_prefix="/fhir")


def _service() -> ExportService:
    svc: ExportService = current_app.extensions["fhir_kat"].export
    return svc


def _kick_off(level: str, group_id: str | None = None) -> Response:
    record = audit_record()
    record.interaction = "operation"
    record.detail = f"$export kick-off ({level})"
    access = current_access()
    if not area_allowed(access.principal.role, "operations:export"):
        raise Forbidden(issue("forbidden", f"role {access.principal.role} may not $export"))
    if "respond-async" not in request.headers.get("Prefer", ""):
        raise BadRequest(issue("required", "$export needs Prefer: respond-async", "Prefer"))
    if group_id:
        record.entities.append(f"Group/{group_id}")
    pairs = list(request.args.items(multi=True))
    if request.method == "POST":
        pairs += _parameters(read_json(request))
    job_id = _service().kick_off(
        level=level,
        group_id=group_id,
        pairs=pairs,
        access=access,
        request_url=request.url,
        file_base=f"{fhir_base()}/$export-file",
        lenient=prefer("handling") == "lenient",
    )
    response = Response(status=202)
    response.headers["Content-Location"] = f"{fhir_base()}/$export-status/{job_id}"
    return response


#: Bulk Data 2.0 kick-off parameters a POST may carry, by the value[x] each takes.
PARAMETERS = {
    "_outputFormat": "valueString",
    "_since": "valueInstant",
    "_type": "valueString",
    "_typeFilter": "valueString",
}


def _parameters(body: Any) -> list[tuple[str, str]]:
    """A POST kick-off's Parameters resource as query pairs (Bulk Data 2.0, "Kick-off
    request"): each repetition of ``_type``/``_typeFilter`` one pair; anything else refused."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise BadRequest(issue("invalid", "POST $export with a Parameters resource", "Parameters"))
    pairs: list[tuple[str, str]] = []
    problems = []
    for i, parameter in enumerate(body.get("parameter") or []):
        where = f"Parameters.parameter[{i}]"
        name = parameter.get("name") if isinstance(parameter, dict) else None
        if name not in PARAMETERS:
            problems.append(issue("not-supported", f"unsupported $export parameter {name}", where))
            continue
        value = parameter.get(PARAMETERS[str(name)])
        if not isinstance(value, str):
            problems.append(
                issue("value", f"{name} takes {PARAMETERS[str(name)]}", f"{where}.value")
            )
            continue
        pairs.append((str(name), value))
    if problems:
        raise BadRequest(problems)
    return pairs


@bp.route("/$export", methods=["GET", "POST"])
def export_system() -> Response:
    return _kick_off("system")


@bp.route("/Patient/$export", methods=["GET", "POST"])
def export_patients() -> Response:
    return _kick_off("patient")


@bp.route("/Group/<group_id>/$export", methods=["GET", "POST"])
def export_group(group_id: str) -> Response:
    return _kick_off("group", group_id)


@bp.get("/$export-status/<job_id>")
def export_status(job_id: str) -> Response:
    audit_record().interaction = "operation"
    state = _service().status(job_id, current_access())
    if state.manifest is None:
        response = Response(status=202)
        response.headers["X-Progress"] = state.progress or state.status
        response.headers["Retry-After"] = "2"
        return response
    return Response(dumps(state.manifest), status=200, content_type="application/json")


@bp.delete("/$export-status/<job_id>")
def export_cancel(job_id: str) -> Response:
    audit_record().interaction = "operation"
    _service().cancel(job_id, current_access())
    return json_response(
        dumps(
            {
                "resourceType": "OperationOutcome",
                "issue": [
                    {"severity": "information", "code": "informational", "diagnostics": "cancelled"}
                ],
            }
        ),
        202,
    )


@bp.get("/$export-file/<job_id>/<name>")
def export_file(job_id: str, name: str) -> Response:
    record = audit_record()
    record.interaction = "operation"
    record.detail = f"$export file {name}"
    path = _service().file(job_id, name, current_access())
    record.patients.update(_service().file_patients(path))  # whose data leaves with the file
    return send_file(path, mimetype="application/fhir+ndjson", conditional=False, etag=False)
