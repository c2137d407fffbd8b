"""CDS Hooks 2.0 endpoints: ``GET /cds-services`` (discovery), ``POST /cds-services/<id>``
(a hook call: cards) and ``POST /cds-services/<id>/feedback`` (what the physician did with a
card). Parse → verify the EHR's JWT (``security.cds_clients``) → ``services.cds_hooks`` →
JSON. Hook calls and feedback are audited (the EHR as the client, the feedback's card ids and
outcomes in the record); discovery discloses nothing and needs no token.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from fhir_kat.api.auth import audit_record
from fhir_kat.api.body import read_json
from fhir_kat.errors import NotFound, TooManyRequests, Unauthorized, issue
from fhir_kat.security.cds_clients import CdsAuthError, CdsClient, CdsRequestVerifier
from fhir_kat.security.ratelimit import FailureLimiter, RateLimiter
from fhir_kat.services.cds_hooks import (
    SERVICES,
    CdsHooksService,
    check_feedback,
    feedback_summary,
)

bp = Blueprint("cds_hooks", __name__, url_prefix="/cds-services")


def _service() -> CdsHooksService:
    service: CdsHooksService = current_app.extensions["fhir_kat"].services.cds_hooks
    return service


def _root() -> str:
    """The service's public root (``…/fhir`` without ``/fhir``), as the EHR calls it."""
    base: str = current_app.config["KAT_PUBLIC_BASE_URL"]
    if base:
        return base.rsplit("/fhir", 1)[0]
    return request.host_url.rstrip("/")


def _known(service_id: str) -> None:
    if service_id not in SERVICES:
        raise NotFound(issue("not-found", "no CDS service with this id (GET /cds-services)"))


def _authenticate(service_id: str) -> CdsClient:
    """The EHR that signed this request; the JWT's ``aud`` is the service's URL (CDS Hooks 2.0
    — the feedback endpoint is that service's too). Held up with 429 and Retry-After, as the
    token endpoint does: before the JWT is checked, a source whose failed attempts spent the
    sign-in limiter's budget (the same limiter and budget: one per source, whichever door it
    guesses at); after, an EHR beyond ``[cds_hooks] rate_limit_per_minute``."""
    record = audit_record()
    state = current_app.extensions["fhir_kat"]
    verifier: CdsRequestVerifier = state.cds_verifier
    failures: FailureLimiter = state.auth_failures
    authorization = request.headers.get("Authorization", "")
    presented = f"cds:{verifier.presented_issuer(authorization)}"
    wait = failures.wait(request.remote_addr, presented)
    if wait:
        record.security = True
        record.detail = "denied: too many failed attempts"
        raise _throttled(wait, "too many failed attempts")
    try:
        client = verifier.verify(authorization, f"{_root()}/cds-services/{service_id}")
    except CdsAuthError as exc:
        failures.failed(request.remote_addr, presented)
        record.security = True
        record.detail = f"denied: {exc}"
        raise Unauthorized(issue("login", str(exc))) from None
    record.client_id, record.role, record.purpose = f"cds:{client.name}", "cds-client", "TREAT"
    limiter: RateLimiter = state.cds_rate_limiter
    wait = limiter.check(client.name)
    if wait:
        record.detail = "denied: rate limit"
        raise _throttled(wait, "too many requests")
    return client


def _throttled(wait: float, what: str) -> TooManyRequests:
    return TooManyRequests(
        issue("throttled", f"{what}; retry after the seconds Retry-After gives"),
        headers={"Retry-After": str(int(wait))},
    )


@bp.get("")
def discovery() -> Response:
    return jsonify(_service().discovery())


@bp.post("/<service_id>")
def call(service_id: str) -> Response:
    _known(service_id)
    client = _authenticate(service_id)
    record = audit_record()
    body: Any = read_json(request)
    answer = _service().call(service_id, body, client, f"{_root()}/app/referrals/new")
    record.detail = f"cds-hooks {service_id}: {len(answer['cards'])} card(s)"
    return jsonify(answer)


@bp.post("/<service_id>/feedback")
def feedback(service_id: str) -> Response:
    _known(service_id)
    _authenticate(service_id)
    items = check_feedback(read_json(request))
    audit_record().detail = feedback_summary(service_id, items)
    return Response(status=200)
