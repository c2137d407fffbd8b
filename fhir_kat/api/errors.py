"""The one error handler: every error leaves as an ``application/fhir+json`` OperationOutcome.

Unexpected exceptions become a 500 whose OperationOutcome carries only a correlation id; the
traceback goes to the log under that id (and the log never gets request bodies).
"""

from __future__ import annotations

import json
import logging
import uuid

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from fhir_kat.api.body import FHIR_JSON
from fhir_kat.errors import FhirError, Hidden, Issue, operation_outcome

log = logging.getLogger("fhir_kat.errors")

_HTTP_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    429: "throttled",
}


def outcome_response(
    status: int, issues: list[Issue], headers: dict[str, str] | None = None
) -> Response:
    body = json.dumps(operation_outcome(issues), separators=(",", ":"))
    response = Response(body, status=status, content_type=FHIR_JSON)
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(FhirError)
    def _fhir_error(exc: FhirError) -> Response:
        if isinstance(exc, Hidden):
            # The answer is a plain 404; only the audit trail says it was a refusal.
            from fhir_kat.api.auth import audit_record

            audit_record().detail = exc.audit_detail
        return outcome_response(exc.status, list(exc.issues), exc.headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        text = {
            404: "no such endpoint",
            405: "method not allowed on this endpoint",
            413: "request body too large",
        }.get(status, exc.name)
        headers = {}
        if status == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return outcome_response(
            status, [Issue(_HTTP_CODES.get(status, "exception"), text)], headers
        )

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        correlation = str(uuid.uuid4())
        log.exception("unhandled error", extra={"correlation_id": correlation})
        return outcome_response(
            500,
            [Issue("exception", f"internal error; correlation id {correlation}")],
            {"X-Correlation-Id": correlation},
        )
