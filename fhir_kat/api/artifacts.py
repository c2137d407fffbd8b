"""The native artifact API: ``POST /api/v1/<kind>`` stores, ``POST /api/v1/<kind>/$transform``
returns the FHIR transaction Bundle it would store, ``GET /api/v1/schemas/<kind>.json`` serves the
artifact's JSON Schema so program systems can validate before sending."""

from __future__ import annotations

import json
from dataclasses import replace

from flask import Blueprint, Response, current_app, request

from fhir_kat.api.auth import audit_in, audit_record, current_access
from fhir_kat.api.body import read_json
from fhir_kat.api.fhir import json_response
from fhir_kat.artifacts import KINDS, json_schema
from fhir_kat.errors import Forbidden, NotFound, issue
from fhir_kat.security.audit import NOTHING_WRITTEN
from fhir_kat.security.policy import area_allowed
from fhir_kat.services.artifacts import ArtifactService, SubmitResult
from fhir_kat.store import Tx

bp = Blueprint("artifacts", __name__, url_prefix="/api/v1")


def _service() -> ArtifactService:
    svc: ArtifactService = current_app.extensions["fhir_kat"].artifacts
    return svc


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise NotFound(
            issue("not-found", f"unknown artifact kind; use one of: {', '.join(KINDS)}", "kind")
        )
    access = current_access()
    if not area_allowed(access.principal.role, f"artifacts:{kind}"):
        raise Forbidden(
            issue("forbidden", f"role {access.principal.role} may not submit {kind}", "kind")
        )
    return kind


@bp.post("/<kind>")
def submit(kind: str) -> Response:
    kind = _kind(kind)
    record = audit_record()
    record.interaction = "create"
    access = current_access()

    def audit(tx: Tx, result: SubmitResult) -> None:
        audit_in(
            tx,
            replace(
                record,
                entities=_entities(result),
                status=_status(result),
                detail=None if result.changed else NOTHING_WRITTEN,
            ),
        )

    result = _service().submit(kind, _artifact(), access.principal.client_id, access, audit=audit)
    record.entities.extend(_entities(result))
    record.status = record.audited_status = _status(result)
    return json_response(result.bundle.to_json(), record.status)


def _artifact() -> object:
    """The posted artifact. Its strings are checked by the artifact's schema, which refuses
    every character FHIR cannot hold (control characters, other whitespace, surrogates) with
    422 naming the field, so the body reader's coarser 400 is not applied first."""
    return read_json(request, text_checks=False)


def _entities(result: SubmitResult) -> list[str]:
    return [e.fields["response"]["location"].split("/_history")[0] for e in result.bundle.entries]


def _status(result: SubmitResult) -> int:
    return 201 if result.created else 200


@bp.post("/<kind>/$transform")
def transform(kind: str) -> Response:
    kind = _kind(kind)
    audit_record().interaction = "operation"
    access = current_access()
    bundle = _service().transform(kind, _artifact(), access.principal.client_id, access)
    return json_response(json.dumps(bundle, separators=(",", ":"), ensure_ascii=False))


@bp.get("/schemas/<kind>.json")
def schema(kind: str) -> Response:
    if kind not in KINDS:
        raise NotFound(issue("not-found", "unknown artifact kind", "kind"))
    # The schedule rule is the running program's protocol (configuration), not the shipped one.
    body = json_schema(kind, _service().protocol)
    return Response(json.dumps(body, indent=2), content_type="application/schema+json")
