"""``GET /api/v1/openapi.json``: the OpenAPI 3.1 description of the native API.

Owns: building the document from the application itself — the paths come from Flask's URL map
(every rule under ``/api/v1`` plus the token endpoint), the artifact request bodies from the
JSON Schemas ``fhir_kat.artifacts`` derives from the marshmallow schemas — and the short
descriptions in ``OPERATIONS``. A route without an entry there is still listed, marked
``undocumented`` (``tests/test_openapi.py`` fails on it), so the document cannot silently drift
from the code. Must not: describe ``/fhir`` (the CapabilityStatement at ``/fhir/metadata`` does).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request

from fhir_kat import __version__
from fhir_kat.api.auth import audit_record
from fhir_kat.artifacts import KINDS, json_schema
from fhir_kat.exchange import outbox
from fhir_kat.workflow.states import machine

bp = Blueprint("openapi", __name__, url_prefix="/api/v1")

OPENAPI_VERSION = "3.1.0"
_CONVERTER = re.compile(r"<(?:(?P<conv>[a-z]+):)?(?P<name>[A-Za-z_]+)>")
_FHIR_JSON = "application/fhir+json"


@dataclass(frozen=True)
class Op:
    summary: str
    description: str = ""
    #: ``(status, description, media type, schema)``
    responses: tuple[tuple[int, str, str, dict[str, Any]], ...] = ()
    body: str | None = None  # "artifact", "token", "json" (with ``body_schema``), None
    body_schema: dict[str, Any] | None = None
    query: tuple[dict[str, Any], ...] = ()
    public: bool = False
    tags: tuple[str, ...] = field(default=("native API",))


_OUTCOME = {"$ref": "#/components/schemas/OperationOutcome"}
_BUNDLE = {"$ref": "#/components/schemas/Bundle"}
_DELIVERY = {"$ref": "#/components/schemas/Delivery"}
_ERRORS: tuple[tuple[int, str, str, dict[str, Any]], ...] = (
    (400, "malformed request (an OperationOutcome names each problem)", _FHIR_JSON, _OUTCOME),
    (401, "no or an invalid bearer token", _FHIR_JSON, _OUTCOME),
    (403, "the client's role may not do this", _FHIR_JSON, _OUTCOME),
    (429, "rate limit: retry after Retry-After seconds", _FHIR_JSON, _OUTCOME),
)


def _q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_PARTNER = _q("partner", {"type": "string"}, "only this partner's deliveries")
_FORCE = _q(
    "force",
    {"type": "string", "enum": ["true", "false"]},
    "also deliveries a later delivery of the same patient superseded at the partner",
)

#: Endpoint name → what it does. Every route under /api/v1 needs an entry.
#: The body of a Flag acknowledgement or resolution (``artifacts.FlagActionSchema``).
_FLAG_ACTION: dict[str, Any] = {
    "type": "object",
    "required": ["by"],
    "additionalProperties": False,
    "properties": {
        "by": {
            "type": "object",
            "description": "the staff member (as a Practitioner: name and identifier)",
            "required": ["family_name", "identifier"],
            "additionalProperties": False,
            "properties": {
                "family_name": {"type": "string", "minLength": 1, "maxLength": 200},
                "given_names": {"type": "array", "items": {"type": "string"}},
                "identifier": {
                    "type": "object",
                    "required": ["system", "value"],
                    "additionalProperties": False,
                    "properties": {
                        "system": {"type": "string", "format": "uri"},
                        "value": {"type": "string", "minLength": 1, "maxLength": 200},
                    },
                },
            },
        },
        "note": {"type": "string", "minLength": 1, "maxLength": 4000},
    },
}


def _flag_op(summary: str, description: str) -> Op:
    return Op(
        summary,
        description,
        (
            (200, "the updated Flag", _FHIR_JSON, {"type": "object"}),
            (404, "no such safety Flag (or not visible to the caller)", _FHIR_JSON, _OUTCOME),
            (409, "the Flag is no longer active", _FHIR_JSON, _OUTCOME),
            (422, "refused: one issue per problem", _FHIR_JSON, _OUTCOME),
            *_ERRORS,
        ),
        body="json",
        body_schema=_FLAG_ACTION,
        tags=("safety",),
    )


OPERATIONS: dict[str, Op] = {
    "artifacts.submit": Op(
        "Submit an artifact",
        "Validates the artifact, maps it to FHIR and stores every resource in one transaction "
        "(with its Provenance); queues deliveries for the configured partners. Re-sending the "
        "same artifact is idempotent (deterministic ids): 200 instead of 201.",
        (
            (201, "stored: the transaction-response Bundle", _FHIR_JSON, _BUNDLE),
            (
                200,
                "already stored, unchanged: the transaction-response Bundle",
                _FHIR_JSON,
                _BUNDLE,
            ),
            (404, "unknown artifact kind", _FHIR_JSON, _OUTCOME),
            (413, "body larger than the configured limit", _FHIR_JSON, _OUTCOME),
            (415, "not JSON", _FHIR_JSON, _OUTCOME),
            (
                422,
                "refused: one issue per problem, expression = the field path",
                _FHIR_JSON,
                _OUTCOME,
            ),
            *_ERRORS,
        ),
        body="artifact",
    ),
    "artifacts.transform": Op(
        "Map an artifact without storing it ($transform)",
        "Returns the FHIR R4 transaction Bundle the artifact would become. Nothing is stored.",
        (
            (200, "the transaction Bundle", _FHIR_JSON, _BUNDLE),
            (404, "unknown artifact kind", _FHIR_JSON, _OUTCOME),
            (422, "refused: one issue per problem", _FHIR_JSON, _OUTCOME),
            *_ERRORS,
        ),
        body="artifact",
    ),
    "feedback.end": Op(
        "End a referral (program end)",
        "Staff move a referral Task to completed, cancelled or failed; businessStatus comes "
        "from mappings/workflow/referral-task.yaml and the state machine decides. On completed, "
        "the feedback document is written when the participant's consent permits sharing with "
        "the referrer; every change is pushed to the referrer's registered endpoint.",
        (
            (200, "the updated Task", _FHIR_JSON, {"type": "object"}),
            (404, "no such referral Task (or not visible to the caller)", _FHIR_JSON, _OUTCOME),
            (409, "not a valid transition from the Task's current status", _FHIR_JSON, _OUTCOME),
            (422, "refused: one issue per problem", _FHIR_JSON, _OUTCOME),
            *_ERRORS,
        ),
        body="json",
        body_schema={
            "type": "object",
            "required": ["outcome"],
            "additionalProperties": False,
            "properties": {
                "outcome": {"enum": list(machine()["program_end"])},
                "reason": {"type": "string", "minLength": 1, "maxLength": 1000},
                "date": {
                    "type": "string",
                    "description": "when the program ended (FHIR date or dateTime; default now): "
                    "Task.executionPeriod.end, the outcome measure's program end",
                },
            },
        },
        tags=("referrals",),
    ),
    "flags.acknowledge": _flag_op(
        "Acknowledge a safety Flag",
        "A staff member has seen the Flag and is acting on it: recorded on the Flag (extension "
        "flag-acknowledgement: by, at, note); it stays active. The open ones: "
        "GET /fhir/Flag?status=active&category=safety (docs/safety.md).",
    ),
    "flags.resolve": _flag_op(
        "Resolve a safety Flag",
        "The signal has been dealt with: status inactive, period.end now, and who resolved "
        "it, when and why on the Flag (extension flag-resolution: by, at, note). A resolved "
        "Flag is not reopened: a new signal raises a new Flag.",
    ),
    "artifacts.schema": Op(
        "The JSON Schema (2020-12) of an artifact kind",
        "Program systems can validate before sending. Rules across fields (dose ranges, a "
        "consent's permitted party) are checked on receipt.",
        (
            (200, "the JSON Schema", "application/schema+json", {"type": "object"}),
            (404, "unknown artifact kind", _FHIR_JSON, _OUTCOME),
            *_ERRORS,
        ),
        tags=("schemas",),
    ),
    "deliveries.list_deliveries": Op(
        "List deliveries (admin)",
        "The outbox, newest first.",
        (
            (
                200,
                "deliveries",
                "application/json",
                {
                    "type": "object",
                    "properties": {"deliveries": {"type": "array", "items": _DELIVERY}},
                },
            ),
            *_ERRORS,
        ),
        query=(
            _q("status", {"type": "string", "enum": list(outbox.STATUSES)}, "filter by status"),
            _q(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                "page size",
            ),
            _q("offset", {"type": "integer", "minimum": 0, "default": 0}, "rows to skip"),
            _PARTNER,
        ),
        tags=("deliveries",),
    ),
    "deliveries.delivery_stats": Op(
        "Outbox metrics (admin)",
        "Counts by state and the age of the oldest pending delivery, for monitoring.",
        (
            (
                200,
                "metrics",
                "application/json",
                {
                    "type": "object",
                    "properties": {
                        "pending": {"type": "integer"},
                        "inFlight": {"type": "integer"},
                        "dead": {"type": "integer"},
                        "blockedConsent": {"type": "integer"},
                        "oldestPendingAgeSeconds": {"type": "number"},
                    },
                },
            ),
            *_ERRORS,
        ),
        query=(_PARTNER,),
        tags=("deliveries",),
    ),
    "deliveries.get_delivery": Op(
        "One delivery (admin)",
        "",
        (
            (200, "the delivery", "application/json", _DELIVERY),
            (404, "no such delivery", _FHIR_JSON, _OUTCOME),
            *_ERRORS,
        ),
        tags=("deliveries",),
    ),
    "deliveries.retry": Op(
        "Requeue a dead, consent-blocked or cancelled delivery, from attempt 0 (admin)",
        "",
        (
            (200, "the delivery, pending again", "application/json", _DELIVERY),
            (404, "no such delivery", _FHIR_JSON, _OUTCOME),
            (
                409,
                "the delivery is not in a state that can be retried, or a later delivery of "
                "the same patient superseded it (force=true sends it anyway)",
                _FHIR_JSON,
                _OUTCOME,
            ),
            *_ERRORS,
        ),
        query=(_FORCE,),
        tags=("deliveries",),
    ),
    "deliveries.cancel": Op(
        "Never send this delivery (admin)",
        "",
        (
            (200, "the cancelled delivery", "application/json", _DELIVERY),
            (404, "no such delivery", _FHIR_JSON, _OUTCOME),
            (409, "in flight or already final", _FHIR_JSON, _OUTCOME),
            *_ERRORS,
        ),
        tags=("deliveries",),
    ),
    "deliveries.retry_dead": Op(
        "Requeue every dead delivery (admin)",
        "A dead delivery for which a later delivery of the same partner and patient was "
        "delivered stays dead (sent now, its older content would replace the newer at the "
        "partner) and is listed in superseded, unless force=true.",
        (
            (
                200,
                "how many were requeued, and which were left dead",
                _FHIR_JSON,
                {
                    "type": "object",
                    "properties": {
                        "requeued": {"type": "integer"},
                        "superseded": {"type": "array", "items": {"type": "integer"}},
                    },
                },
            ),
            *_ERRORS,
        ),
        query=(_PARTNER, _FORCE),
        tags=("deliveries",),
    ),
    "openapi.openapi_json": Op(
        "This document",
        "OpenAPI 3.1, generated from the running application's routes and artifact schemas.",
        ((200, "the OpenAPI document", "application/json", {"type": "object"}), *_ERRORS),
        tags=("schemas",),
    ),
    "auth.token": Op(
        "Get an access token (OAuth 2.0 client credentials; SMART Backend Services)",
        "Authenticate with exactly one of: HTTP Basic (client_secret_basic), client_id + "
        "client_secret in the form (client_secret_post), or a signed JWT client_assertion "
        "(private_key_jwt, RS384/ES384, at most 5 minutes). Errors follow RFC 6749 §5.2 "
        "(JSON with error and error_description), not OperationOutcome. See docs/security.md.",
        (
            (
                200,
                "the token",
                "application/json",
                {
                    "type": "object",
                    "required": ["access_token", "token_type", "expires_in", "scope"],
                    "properties": {
                        "access_token": {"type": "string"},
                        "token_type": {"type": "string", "enum": ["bearer"]},
                        "expires_in": {"type": "integer", "maximum": 300},
                        "scope": {"type": "string"},
                    },
                },
            ),
            (
                400,
                "invalid_request, unsupported_grant_type or invalid_scope",
                "application/json",
                {"$ref": "#/components/schemas/OAuthError"},
            ),
            (
                401,
                "invalid_client",
                "application/json",
                {"$ref": "#/components/schemas/OAuthError"},
            ),
        ),
        body="token",
        public=True,
        tags=("auth",),
    ),
}


def _path_and_params(rule: str) -> tuple[str, list[dict[str, Any]], str | None]:
    """Flask ``/a/<int:x>/b`` → OpenAPI ``/a/{x}/b`` and its path parameters; ``<kind>`` is
    expanded by the caller (one path per kind, each with its own request schema)."""
    params: list[dict[str, Any]] = []
    kind_slot = None

    def sub(match: re.Match[str]) -> str:
        nonlocal kind_slot
        name = match.group("name")
        if name == "kind":
            kind_slot = "{kind}"
            return "{kind}"
        schema: dict[str, Any] = {"type": "integer" if match.group("conv") == "int" else "string"}
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
        return "{" + name + "}"

    return _CONVERTER.sub(sub, rule), params, kind_slot


def build_openapi(app: Flask, server_url: str = "") -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = dict(_COMPONENTS)
    for name in KINDS:
        schema = json_schema(name, app.extensions["fhir_kat"].artifacts.protocol)
        schema.pop("$schema", None)  # OpenAPI 3.1's dialect is JSON Schema 2020-12 already
        schemas[_schema_name(name)] = schema
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if not (rule.rule.startswith("/api/v1/") or rule.endpoint == "auth.token"):
            continue
        path, params, kind_slot = _path_and_params(rule.rule)
        op = OPERATIONS.get(rule.endpoint)
        kinds: tuple[str | None, ...] = KINDS if kind_slot else (None,)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            for kind in kinds:
                concrete = path.replace("{kind}", kind) if kind else path
                operation = _operation(rule.endpoint, method, op, params, kind)
                paths.setdefault(concrete, {})[method.lower()] = operation
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "fhir_kat native API",
            "version": __version__,
            "description": "Program systems post artifacts here; fhir_kat turns them into FHIR "
            "R4 resources (served at /fhir; see its CapabilityStatement at /fhir/metadata). "
            "Every error except the token endpoint's is an OperationOutcome "
            "(application/fhir+json) with one issue per problem. Integrator guide: "
            "docs/integrators.md.",
        },
        "servers": [{"url": server_url or "/"}],
        "security": [{"bearer": []}],
        "tags": [
            {"name": "native API", "description": "artifacts in, FHIR out"},
            {"name": "schemas", "description": "machine-readable contracts"},
            {"name": "deliveries", "description": "the outbox to partners (admin role)"},
            {"name": "auth", "description": "SMART Backend Services token endpoint"},
            {"name": "safety", "description": "safety Flags: acknowledge and resolve"},
        ],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "An access token from POST /auth/token (at most 300 s).",
                }
            },
        },
    }


def _schema_name(kind: str) -> str:
    return "artifact-" + kind


def _operation(
    endpoint: str, method: str, op: Op | None, params: list[dict[str, Any]], kind: str | None
) -> dict[str, Any]:
    suffix = f"_{kind.replace('-', '_')}" if kind else ""
    if op is None:
        return {
            "operationId": f"{endpoint}{suffix}",
            "summary": "undocumented",
            "responses": {"default": {"description": "undocumented"}},
        }
    out: dict[str, Any] = {
        "operationId": f"{endpoint}{suffix}".replace(".", "_"),
        "summary": f"{op.summary} ({kind})" if kind else op.summary,
        "tags": list(op.tags),
    }
    if op.description:
        out["description"] = op.description
    if params or op.query:
        out["parameters"] = [*params, *op.query]
    if op.public:
        out["security"] = []
    if op.body == "artifact" and kind:
        media: dict[str, Any] = {"schema": {"$ref": f"#/components/schemas/{_schema_name(kind)}"}}
        example = _example(kind)
        if example is not None:  # the examples ship with the repository, not the wheel
            media["example"] = example
        out["requestBody"] = {"required": True, "content": {"application/json": media}}
    elif op.body == "json" and op.body_schema is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": op.body_schema}},
        }
    elif op.body == "token":
        out["requestBody"] = {
            "required": True,
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {"$ref": "#/components/schemas/TokenRequest"}
                }
            },
        }
    responses: dict[str, Any] = {}
    for status, text, media_type, schema in op.responses:
        responses[str(status)] = {
            "description": text,
            "content": {media_type: {"schema": schema}},
        }
    out["responses"] = responses
    return out


def _example(kind: str) -> Any:
    """The shipped example of a kind (docs/examples/<kind>.json), when the package has it."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "docs" / "examples" / f"{kind}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


_COMPONENTS: dict[str, Any] = {
    "OperationOutcome": {
        "type": "object",
        "description": "FHIR R4 OperationOutcome: one issue per problem; expression names the "
        "field (artifact field paths on /api/v1, FHIRPath on /fhir).",
        "required": ["resourceType", "issue"],
        "properties": {
            "resourceType": {"const": "OperationOutcome"},
            "issue": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["severity", "code"],
                    "properties": {
                        "severity": {"enum": ["fatal", "error", "warning", "information"]},
                        "code": {"type": "string"},
                        "diagnostics": {"type": "string"},
                        "expression": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
        },
    },
    "Bundle": {
        "type": "object",
        "description": "A FHIR R4 Bundle (transaction or transaction-response).",
        "required": ["resourceType", "type"],
        "properties": {
            "resourceType": {"const": "Bundle"},
            "type": {"type": "string"},
            "entry": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Delivery": {
        "type": "object",
        "required": ["id", "partner", "kind", "status", "attempts"],
        "properties": {
            "id": {"type": "integer"},
            "partner": {"type": "string"},
            "kind": {"type": "string"},
            "patientKey": {"type": ["string", "null"]},
            "status": {"type": "string", "enum": list(outbox.STATUSES)},
            "attempts": {"type": "integer"},
            "nextAttemptAt": {"type": ["string", "null"], "format": "date-time"},
            "createdAt": {"type": "string", "format": "date-time"},
            "updatedAt": {"type": "string", "format": "date-time"},
            "deliveredAt": {"type": "string", "format": "date-time"},
            "claimedBy": {"type": "string"},
            "lastError": {"type": "string"},
            "partnerResponse": {},
        },
    },
    "TokenRequest": {
        "type": "object",
        "required": ["grant_type"],
        "properties": {
            "grant_type": {"const": "client_credentials"},
            "scope": {"type": "string", "examples": ["system/*.rs"]},
            "client_assertion_type": {
                "const": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            },
            "client_assertion": {"type": "string", "description": "a signed JWT (≤ 5 min)"},
            "client_id": {"type": "string"},
            "client_secret": {"type": "string", "description": "client_secret_post only"},
        },
    },
    "OAuthError": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
    },
}


@bp.get("/openapi.json")
def openapi_json() -> Response:
    audit_record().interaction = "operation"
    base: str = current_app.config.get("KAT_PUBLIC_BASE_URL", "")
    server = base.rsplit("/fhir", 1)[0] if base else request.host_url.rstrip("/")
    document = build_openapi(current_app, server)
    return Response(json.dumps(document, indent=2), content_type="application/json")
