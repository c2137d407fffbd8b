"""``POST /fhir/$process-message``: FHIR messaging for referrals (synchronous mode only).

Parses HTTP and serialises the response message; ``services.messaging`` does the rest."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, current_app, request

from fhir_kat.api.auth import audit_record, current_access
from fhir_kat.api.body import read_json
from fhir_kat.api.fhir import fhir_base, json_response
from fhir_kat.errors import BadRequest, issue
from fhir_kat.services.messaging import MessagingService

bp = Blueprint("messaging", __name__, url_prefix="/fhir")


@bp.post("/$process-message")
def process_message() -> Response:
    record = audit_record()
    record.interaction = "operation"
    if request.args.get("async", "false") == "true":
        raise BadRequest(issue("not-supported", "only synchronous messaging is supported", "async"))
    body: Any = read_json(request)
    service: MessagingService = current_app.extensions["fhir_kat"].services.messaging
    result = service.process(body, fhir_base(), current_access())
    for entry in result.response["entry"][1:]:
        resource = entry.get("resource", {})
        if resource.get("resourceType") == "Task":
            record.entities.append(f"Task/{resource['id']}")
            subject = resource.get("for", {}).get("reference", "")
            if subject.startswith("Patient/"):
                record.patients.add(subject.split("/", 1)[1])
    return json_response(json.dumps(result.response, separators=(",", ":")))
