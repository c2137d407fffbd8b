"""Authentication at the edge: the OAuth token endpoint, SMART discovery, bearer-token checks,
rate limits and the audit trail of every request.

The token endpoint answers errors the OAuth way (RFC 6749 §5.2 JSON: ``error``,
``error_description``) because OAuth clients parse exactly that; every other endpoint answers
with OperationOutcomes (ADR 0003).
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any
from urllib.parse import unquote

import jwt
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request

from fhir_kat.api.errors import outcome_response
from fhir_kat.errors import Issue
from fhir_kat.security.audit import (
    AuditRecord,
    build_audit_event,
    write_audit_event,
    write_audit_event_in,
)
from fhir_kat.security.clients import Client, check_secret
from fhir_kat.security.discovery import AUTH
from fhir_kat.security.scopes import Scope, covered_by, parse_scopes
from fhir_kat.security.tokens import ASSERTION_TYPE, OAuthError
from fhir_kat.services.access import Access
from fhir_kat.store import Tx

log = logging.getLogger("fhir_kat.auth")
bp = Blueprint("auth", __name__)

#: Endpoints anyone may call (FHIR discovery, SMART discovery, health, the token endpoint).
PUBLIC = {
    "fhir.metadata",
    "auth.token",
    "auth.smart_configuration",
    "auth.smart_configuration_base",
    "health.healthz",
    "web.login",  # browser sign-in (fhir_kat/web/session.py) and the pages' static files
    "web.login_submit",
    "web.static",
    "web.login_provider",  # signing in through an OpenID Provider: its start and callback
    "web.callback",
    # The referral form's SMART launch: the registered iss, then its own state (web/smart.py)
    "smart.launch",
    "smart.callback",
    # CDS Hooks: the EHR's own signed JWT, verified by the blueprint (api/cds_hooks.py)
    "cds_hooks.discovery",
    "cds_hooks.call",
    "cds_hooks.feedback",
}
#: Public endpoints that leave no audit record (discovery and health checks disclose nothing).
UNAUDITED = {
    "fhir.metadata",
    "auth.smart_configuration",
    "auth.smart_configuration_base",
    "health.healthz",
    "static",
    "web.login",
    "web.static",
    "web.login_provider",  # only sends the browser on; the callback is audited
    "cds_hooks.discovery",
}
REALM = 'Bearer realm="fhir_kat"'


def _state() -> Any:
    return current_app.extensions["fhir_kat"]


def token_url() -> str:
    base: str = current_app.config["KAT_PUBLIC_BASE_URL"]
    if base:
        return base.rsplit("/fhir", 1)[0] + "/auth/token"
    return request.host_url.rstrip("/") + "/auth/token"


def audit_record() -> AuditRecord:
    record: AuditRecord | None = g.get("kat_audit")
    if record is None:
        record = AuditRecord(address=request.remote_addr)
        g.kat_audit = record
    return record


def audit_in(tx: Tx, record: AuditRecord) -> None:
    """Write ``record`` (what the request will answer, if this transaction commits) inside
    the request's own write transaction: one commit instead of two. The caller sets
    ``audited_status`` on the request's record once the commit succeeded; a request that
    fails after all is still audited at response time, with its real outcome."""
    write_audit_event_in(tx, build_audit_event(record, _state().clock()))


def current_access() -> Access:
    access: Access = g.kat_access
    return access


# ---------------------------------------------------------------------------- discovery


def _smart_configuration() -> Response:
    return jsonify(AUTH.smart_configuration(token_url()))


@bp.get("/.well-known/smart-configuration")
def smart_configuration() -> Response:
    return _smart_configuration()


@bp.get("/fhir/.well-known/smart-configuration")
def smart_configuration_base() -> Response:
    return _smart_configuration()


# ---------------------------------------------------------------------------- token endpoint


def _oauth_error(exc: OAuthError) -> Response:
    response = jsonify({"error": exc.error, "error_description": exc.description})
    response.status_code = exc.status
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = 'Basic realm="fhir_kat"'
    return response


@bp.post("/auth/token")
def token() -> Response:
    record = audit_record()
    record.security = True
    record.interaction = "operation"
    limiter = _state().auth_failures
    presented = _presented_client_id()
    wait = limiter.wait(request.remote_addr, presented)
    if wait:
        record.detail = "token refused: too many failed attempts"
        record.presented_client_id = presented
        return _too_many_failures(wait)
    try:
        client, scopes = _authenticate_client()
    except OAuthError as exc:
        record.detail = f"token refused: {exc.error}"
        record.presented_client_id = presented
        if exc.status == 401:  # wrong credentials (a malformed request is not a guess)
            limiter.failed(request.remote_addr, presented)
        return _oauth_error(exc)
    record.client_id, record.role = client.client_id, client.role
    access_token, expires_in = _state().tokens.issue(client, scopes)
    record.detail = "token issued"
    response = jsonify(
        {
            "access_token": access_token,
            "token_type": "bearer",
            "expires_in": expires_in,
            "scope": " ".join(s.text for s in scopes),
        }
    )
    response.headers["Pragma"] = "no-cache"
    return response


def _too_many_failures(wait: float) -> Response:
    response = jsonify(
        {
            "error": "temporarily_unavailable",
            "error_description": "too many failed sign-ins from here; retry later",
        }
    )
    response.status_code = 429
    response.headers["Retry-After"] = str(int(wait))
    return response


def _basic_credentials(header: str) -> tuple[str, str] | None:
    """(client id, secret) of an HTTP Basic ``Authorization`` value; None when malformed."""
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, _, secret = decoded.partition(":")
    return unquote(client_id), unquote(secret)


def _assertion_issuer(assertion: str) -> str | None:
    """The unverified ``iss`` of a client assertion (who it claims to be); None: not a JWT."""
    try:
        return str(jwt.decode(assertion, options={"verify_signature": False}).get("iss", ""))
    except jwt.PyJWTError:
        return None


def _presented_client_id() -> str:
    """The client id a token request names (Basic, form or assertion ``iss``), unverified."""
    form = request.form
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("basic "):
        return (_basic_credentials(header) or ("", ""))[0]
    if form.get("client_id"):
        return str(form["client_id"])
    if form.get("client_assertion"):
        return _assertion_issuer(form["client_assertion"]) or ""
    return ""


def _authenticate_client() -> tuple[Client, tuple[Scope, ...]]:
    form = request.form
    if form.get("grant_type") != "client_credentials":
        raise OAuthError("unsupported_grant_type", "grant_type must be client_credentials")
    registry = _state().clients
    methods = []
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("basic "):
        methods.append("basic")
    if form.get("client_secret"):
        methods.append("post")
    if form.get("client_assertion"):
        methods.append("jwt")
    if len(methods) != 1:
        raise OAuthError("invalid_request", "use exactly one client authentication method")
    method = methods[0]
    if method == "jwt":
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise OAuthError("invalid_request", "client_assertion_type must be jwt-bearer")
        assertion = form["client_assertion"]
        client_id = form.get("client_id") or _assertion_issuer(assertion)
        if client_id is None:
            raise OAuthError("invalid_client", "client_assertion is not a JWT", 401)
        # An unknown client id is checked against a key nobody holds: the same work and the
        # same answer as a forged assertion for a registered one (client ids stay unknowable).
        client = _state().tokens.verify_assertion(
            assertion, registry.get(str(client_id)), token_url()
        )
    else:
        if method == "basic":
            credentials = _basic_credentials(header)
            if credentials is None:
                raise OAuthError("invalid_client", "malformed Basic credentials", 401)
            client_id, secret = credentials
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        client = registry.get(client_id)
        if not check_secret(client, secret) or client is None:
            raise OAuthError("invalid_client", "unknown client or wrong secret", 401)
    return client, _grant_scopes(client, form.get("scope"))


#: Scopes of a user-facing launch that mean nothing to client credentials; a backend-services
#: request that carries them (fhirclient adds ``launch/patient`` by default) is granted the
#: rest, as OAuth lets a server grant less than asked (RFC 6749 §3.3), instead of refused.
NOT_FOR_BACKEND = frozenset(
    {"launch", "launch/patient", "launch/encounter", "openid", "fhirUser", "profile"}
    | {"offline_access", "online_access"}
)


def _grant_scopes(client: Client, requested: str | None) -> tuple[Scope, ...]:
    wanted = [s for s in (requested or "").split() if s not in NOT_FOR_BACKEND]
    if not wanted:
        return client.scopes
    scopes, bad = parse_scopes(wanted)
    if bad:
        raise OAuthError("invalid_scope", f"not a SMART system scope: {' '.join(bad)}")
    too_wide = [s.text for s in scopes if not covered_by(s, client.scopes)]
    if too_wide:
        raise OAuthError("invalid_scope", f"not allowed for this client: {' '.join(too_wide)}")
    return tuple(scopes)


# ---------------------------------------------------------------------------- every request


def install(app: Flask) -> None:
    @app.before_request
    def _authenticate() -> Response | None:
        record = audit_record()
        if request.endpoint in PUBLIC:
            return None
        header = request.headers.get("Authorization", "")
        if not header.lower().startswith("bearer "):
            record.detail = "denied: no bearer token"
            return _unauthorized("a bearer token is required", REALM)
        state = _state()
        try:
            principal = state.tokens.verify(header[7:].strip())
        except jwt.ExpiredSignatureError:
            record.detail = "denied: expired token"
            return _unauthorized("the access token has expired", f'{REALM}, error="invalid_token"')
        except jwt.PyJWTError:
            record.detail = "denied: invalid token"
            return _unauthorized("the access token is not valid", f'{REALM}, error="invalid_token"')
        record.client_id, record.role, record.purpose = (
            principal.client_id,
            principal.role,
            principal.purpose,
        )
        record.person, record.token_id = principal.person, principal.token_id
        wait = state.rate_limiter.check(principal.actor)
        if wait:
            record.detail = "denied: rate limit"
            return outcome_response(
                429,
                [Issue("throttled", "too many requests; retry later")],
                {"Retry-After": str(int(wait))},
            )
        g.kat_access = Access(principal, state.consent, state.clock)
        return None

    @app.after_request
    def _audit(response: Response) -> Response:
        if request.endpoint in UNAUDITED:
            return response
        record = audit_record()
        if record.audited_status == response.status_code:
            return response  # recorded with the data, in the same commit (``audit_in``)
        record.status = response.status_code
        if request.query_string and record.interaction == "search-type":
            record.query = request.full_path
        state = _state()
        try:
            write_audit_event(state.store, build_audit_event(record, state.clock()))
        except Exception:  # an audit failure must be visible, not crash the response
            log.exception("audit write failed")
            if request.method == "GET" and response.status_code < 400:
                # No disclosure without a trace; a write already happened and is reported.
                return outcome_response(
                    503, [Issue("transient", "the audit trail is unavailable; retry later")]
                )
        return response


def _unauthorized(text: str, challenge: str) -> Response:
    return outcome_response(401, [Issue("login", text)], {"WWW-Authenticate": challenge})
