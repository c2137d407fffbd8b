"""Bulk Data ``$export`` endpoints: kick-off (system, Patient, Group), status polling, cancel
and file download. All need a token; files are served only to the client that asked."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request, send_file

from fhir_kat.api.auth import audit_record, current_access
from fhir_kat.api.fhir import fhir_base, json_response
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
    job_id = _service().kick_off(
        level=level,
        group_id=group_id,
        pairs=list(request.args.items(multi=True)),
        access=access,
        request_url=request.url,
        file_base=f"{fhir_base()}/$export-file",
    )
    response = Response(status=202)
    response.headers["Content-Location"] = f"{fhir_base()}/$export-status/{job_id}"
    return response


@bp.get("/$export")
def export_system() -> Response:
    return _kick_off("system")


@bp.get("/Patient/$export")
def export_patients() -> Response:
    return _kick_off("patient")


@bp.get("/Group/<group_id>/$export")
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
