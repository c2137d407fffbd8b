"""The ``/fhir`` blueprint: FHIR R4 RESTful API (JSON only)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, current_app, g, request

from fhir_kat.api.auth import audit_in, audit_record, current_access, token_url
from fhir_kat.api.body import FHIR_JSON, read_json
from fhir_kat.errors import BadRequest, NotAcceptable, issue
from fhir_kat.security.audit import NOTHING_WRITTEN, AuditRecord
from fhir_kat.security.discovery import AUTH
from fhir_kat.services.bundles import RawBundle
from fhir_kat.services.capability import capability_statement
from fhir_kat.services.fhir_rest import FhirService, WriteResult
from fhir_kat.services.subscriptions import reset_caller, set_caller
from fhir_kat.store import Tx
from fhir_kat.store.store import StoredResource, dumps, format_instant

bp = Blueprint("fhir", __name__, url_prefix="/fhir")


def service() -> FhirService:
    svc: FhirService = current_app.extensions["fhir_kat"].fhir
    return svc


def fhir_base() -> str:
    configured: str = current_app.config["KAT_PUBLIC_BASE_URL"]
    return configured or request.host_url.rstrip("/") + "/fhir"


def prefer(name: str) -> str | None:
    """The value of preference ``name`` in the ``Prefer`` headers (RFC 7240: preferences are
    comma-separated, each may carry ``;``-separated parameters), e.g.
    ``Prefer: respond-async, handling=lenient``."""
    for header in request.headers.getlist("Prefer"):
        for preference in header.split(","):
            key, _, value = preference.split(";", 1)[0].strip().partition("=")
            if key.strip() == name:
                return value.strip().strip('"')
    return None


@bp.before_request
def _negotiate() -> None:
    fmt = request.args.get("_format")
    if fmt and "json" not in fmt:
        raise NotAcceptable(issue("not-supported", "only JSON is supported", "_format"))
    if "Accept" in request.headers and not request.accept_mimetypes.best_match(
        ["application/fhir+json", "application/json"]
    ):
        raise NotAcceptable(issue("not-supported", "only application/fhir+json is available"))


@bp.before_request
def _bind_caller() -> None:
    # Subscription writes record (and check) their owner inside the write transaction.
    access = g.get("kat_access")
    g.kat_caller_token = set_caller(access.principal if access is not None else None)


@bp.teardown_request
def _unbind_caller(_exc: BaseException | None) -> None:
    token = g.pop("kat_caller_token", None)
    if token is not None:
        reset_caller(token)


def json_response(body: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    response = Response(body, status=status, content_type=FHIR_JSON)
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def resource_response(stored: StoredResource, status: int = 200) -> Response:
    return json_response(stored.content, status, _version_headers(stored))


def _version_headers(stored: StoredResource) -> dict[str, str]:
    return {
        "ETag": stored.etag,
        "Last-Modified": stored.last_updated.strftime("%a, %d %b %Y %H:%M:%S GMT"),
    }


def bundle_response(bundle: RawBundle) -> Response:
    return json_response(bundle.to_json())


def write_response(result: WriteResult) -> Response:
    stored = result.stored
    headers = _version_headers(stored)
    headers["Location"] = f"{fhir_base()}/{stored.type}/{stored.id}/_history/{stored.version_id}"
    status = _write_status(result)
    preference = prefer("return")
    if preference == "minimal" or not result.disclose:
        return Response(status=status, headers=headers)
    if preference == "OperationOutcome":
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "information",
                    "code": "informational",
                    "diagnostics": "created" if result.created else "ok",
                }
            ],
        }
        return json_response(dumps(outcome), status, headers)
    return json_response(stored.content, status, headers)


def _strict() -> bool:
    return prefer("handling") == "strict"


@bp.get("/metadata")
def metadata() -> Response:
    # One description of the authorization server feeds this and the SMART configuration.
    security = AUTH.capability_security(token_url())
    return json_response(dumps(capability_statement(fhir_base(), security)))


def _audit(interaction: str, *entities: str, patient: str | None = None) -> None:
    record = audit_record()
    record.interaction = interaction
    record.entities.extend(entities)
    if patient:
        record.patients.add(patient)


def _audited_bundle(bundle: RawBundle) -> Response:
    record = audit_record()
    record.entities.extend(bundle.disclosed)
    record.patients |= bundle.patients
    return bundle_response(bundle)


def _audited_write(result: WriteResult, interaction: str, audit: _AuditWithWrite) -> Response:
    """``interaction`` is what the client asked for: a conditional create that matched is a
    create that wrote nothing, never an update."""
    record = audit_record()
    _note_write(record, result, interaction)
    # Committed with the data: the response-time audit is skipped for this status.
    record.audited_status = audit.committed
    return write_response(result)


def _note_write(record: AuditRecord, result: WriteResult, interaction: str) -> None:
    stored = result.stored
    record.interaction = interaction
    record.entities.append(f"{stored.type}/{stored.id}")
    if stored.patient_id:
        record.patients.add(stored.patient_id)
    if not result.changed:
        record.detail = NOTHING_WRITTEN


class _AuditWithWrite:
    """The request's AuditEvent written inside its write's own transaction (``audit_in``): one
    commit for the resource and its audit record. ``committed`` is the status it recorded once
    the write returned (the commit succeeded); if the commit fails, both are gone and the
    request is audited at response time with its real outcome."""

    def __init__(self, interaction: Callable[[WriteResult], str]) -> None:
        self.interaction = interaction
        self.record = audit_record()
        self.committed: int | None = None
        self._status: int | None = None

    def __call__(self, tx: Tx, result: WriteResult) -> None:
        done = replace(
            self.record, entities=list(self.record.entities), patients=set(self.record.patients)
        )
        _note_write(done, result, self.interaction(result))
        done.status = self._status = _write_status(result)
        audit_in(tx, done)

    def returned(self) -> _AuditWithWrite:
        self.committed = self._status
        return self


def _write_status(result: WriteResult) -> int:
    return 201 if result.created else 200


@bp.post("")
@bp.post("/")
def system_bundle() -> Response:
    bundle = read_json(request)
    btype = bundle.get("type") if isinstance(bundle, dict) else None
    _audit("batch" if btype == "batch" else "transaction")
    record = audit_record()
    audited: list[bool] = []

    def audit(tx: Tx, response: RawBundle) -> None:
        audit_in(
            tx,
            replace(
                record,
                entities=[*record.entities, *response.disclosed],
                patients=record.patients | response.patients,
                status=200,
            ),
        )
        audited.append(True)

    result = service().process_bundle(bundle, fhir_base(), current_access(), audit=audit)
    if audited:  # committed with the transaction's data
        record.audited_status = 200
    return _audited_bundle(result)


@bp.get("/<rtype>")
def search(rtype: str) -> Response:
    _audit("search-type")
    pairs = list(request.args.items(multi=True))
    return _audited_bundle(
        service().search(rtype, pairs, fhir_base(), strict=_strict(), access=current_access())
    )


@bp.post("/<rtype>/_search")
def search_post(rtype: str) -> Response:
    _audit("search-type")
    pairs = list(request.args.items(multi=True)) + list(request.form.items(multi=True))
    return _audited_bundle(
        service().search(rtype, pairs, fhir_base(), strict=_strict(), access=current_access())
    )


@bp.post("/<rtype>")
def create(rtype: str) -> Response:
    _audit("create")
    body: Any = read_json(request)
    audit = _AuditWithWrite(lambda _: "create")
    result = service().create(
        rtype,
        body,
        if_none_exist=_create_criteria(),
        access=current_access(),
        audit=audit,
    )
    return _audited_write(result, "create", audit.returned())


def _create_criteria() -> str | None:
    """A create's conditions: ``If-None-Exist``, or — a compatibility convenience for clients
    that send their search on the create itself, as fhirpy's ``get_or_create`` does
    (``POST /Patient?identifier=…``) — the query string, read the same way. A query is never
    ignored: both at once is ambiguous (400)."""
    header = request.headers.get("If-None-Exist")
    query = [(k, v) for k, v in request.args.items(multi=True) if k != "_format"]
    if not query:
        return header
    if header is not None:
        raise BadRequest(
            issue(
                "invalid",
                "conditions both in If-None-Exist and in the query string: send one",
                "If-None-Exist",
            )
        )
    return urlencode(query)


@bp.get("/<rtype>/<rid>")
def read(rtype: str, rid: str) -> Response:
    _audit("read", f"{rtype}/{rid}")
    stored = service().read(rtype, rid, current_access())
    _audit("read", patient=stored.patient_id)
    return resource_response(stored)


@bp.put("/<rtype>/<rid>")
def update(rtype: str, rid: str) -> Response:
    _audit("update", f"{rtype}/{rid}")
    body: Any = read_json(request)
    audit = _AuditWithWrite(_put_interaction)
    result = service().update(
        rtype,
        rid,
        body,
        if_match=request.headers.get("If-Match"),
        access=current_access(),
        audit=audit,
    )
    return _audited_write(result, _put_interaction(result), audit.returned())


@bp.put("/<rtype>")
def conditional_update(rtype: str) -> Response:
    _audit("update")
    criteria = urlencode([(k, v) for k, v in request.args.items(multi=True) if k != "_format"])
    if not criteria:
        raise BadRequest(
            issue("required", "PUT needs Type/id, or Type?criteria for a conditional update")
        )
    body: Any = read_json(request)
    audit = _AuditWithWrite(_put_interaction)
    result = service().conditional_update(
        rtype,
        criteria,
        body,
        if_match=request.headers.get("If-Match"),
        access=current_access(),
        audit=audit,
    )
    return _audited_write(result, _put_interaction(result), audit.returned())


def _put_interaction(result: WriteResult) -> str:
    return "create" if result.created else "update"


@bp.delete("/<rtype>/<rid>")
def delete(rtype: str, rid: str) -> Response:
    _audit("delete", f"{rtype}/{rid}")
    stored = service().delete(rtype, rid, current_access())
    headers = {"ETag": stored.etag} if stored else {}
    return Response(status=204, headers=headers)


@bp.get("/<rtype>/<rid>/_history")
def history(rtype: str, rid: str) -> Response:
    _audit("history-instance", f"{rtype}/{rid}")
    count = request.args.get("_count", type=int)
    return _audited_bundle(
        service().history(rtype, rid, fhir_base(), count, access=current_access())
    )


@bp.get("/<rtype>/<rid>/_history/<vid>")
def vread(rtype: str, rid: str, vid: str) -> Response:
    _audit("vread", f"{rtype}/{rid}")
    stored = service().vread(rtype, rid, vid, current_access())
    _audit("vread", patient=stored.patient_id)
    return resource_response(stored)


__all__ = ["bp", "bundle_response", "fhir_base", "format_instant", "json_response", "prefer"]
