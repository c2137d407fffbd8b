"""Browser sessions on top of the client registry (docs/security.md, "Browser sessions").

A person signs in with a registered client's id and secret (the same credentials a program system
uses at ``/auth/token``); the server answers with an HttpOnly, SameSite=Strict cookie holding a
*session ticket*: an ES256 JWT signed with the token-signing key whose audience
(``<issuer>#browser-session``) no bearer check accepts. On every request that carries the cookie
and no ``Authorization`` header, the ticket is checked and a fresh short-lived access token is
minted for that client and put in front of the ordinary bearer check — so pages and the APIs they
call get exactly the role, scopes, consent filtering, rate limit and audit of that client.

Unsafe methods (anything but GET/HEAD/OPTIONS) authenticated by the cookie also need the ticket's
CSRF token in ``X-CSRF-Token`` (or the ``csrf_token`` form field) and, when the browser sends
one, an ``Origin`` of this host. Tickets expire after ``IDLE_SECONDS`` without use and
``ABSOLUTE_SECONDS`` after sign-in; a removed client or a changed secret ends its sessions.
Must not: log or echo credentials.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

import jwt
from flask import current_app, g, request
from werkzeug.wrappers import Response

from fhir_kat.api.errors import outcome_response
from fhir_kat.errors import Issue
from fhir_kat.security.clients import Client

COOKIE = "kat_session"
CSRF_HEADER = "X-CSRF-Token"
IDLE_SECONDS = 30 * 60
ABSOLUTE_SECONDS = 8 * 60 * 60
RENEW_AFTER_SECONDS = 5 * 60
ALGORITHM = "ES256"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class BrowserSession:
    client_id: str
    csrf: str
    issued_at: int
    auth_time: int


def _state() -> Any:
    return current_app.extensions["fhir_kat"]


def _audience() -> str:
    return f"{_state().tokens.issuer}#browser-session"


def _now() -> int:
    return int(_state().clock().timestamp())


def credential_fingerprint(client: Client) -> str:
    """Changes when the client's secret (or key set) is rotated, ending older sessions."""
    material = client.secret_hash or repr(sorted((client.jwks or {}).items()))
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def ticket_for(client: Client, *, csrf: str | None = None, auth_time: int | None = None) -> str:
    now = _now()
    auth_time = auth_time or now
    claims = {
        "iss": _state().tokens.issuer,
        "aud": _audience(),
        "sub": client.client_id,
        "iat": now,
        "exp": min(now + IDLE_SECONDS, auth_time + ABSOLUTE_SECONDS),
        "auth_time": auth_time,
        "csrf": csrf or secrets.token_urlsafe(32),
        "cfp": credential_fingerprint(client),
    }
    return jwt.encode(claims, _state().tokens.key, algorithm=ALGORITHM)


def read_ticket(ticket: str) -> tuple[BrowserSession, Client] | None:
    """The session and its client, or None for anything expired, forged or revoked."""
    state = _state()
    try:
        claims = jwt.decode(
            ticket,
            state.tokens.public_key,
            algorithms=[ALGORITHM],
            audience=_audience(),
            issuer=state.tokens.issuer,
            # Times are checked below against the service's clock, like everything else.
            options={
                "require": ["exp", "iat", "sub", "auth_time", "csrf", "cfp"],
                "verify_exp": False,
                "verify_iat": False,
            },
        )
    except jwt.PyJWTError:
        return None
    now = _now()
    if int(claims["exp"]) <= now or int(claims["auth_time"]) + ABSOLUTE_SECONDS < now:
        return None
    client: Client | None = state.clients.get(str(claims["sub"]))
    if client is None or not hmac.compare_digest(
        str(claims["cfp"]), credential_fingerprint(client)
    ):
        return None
    session = BrowserSession(
        client.client_id, str(claims["csrf"]), int(claims["iat"]), int(claims["auth_time"])
    )
    return session, client


def _secure() -> bool:
    """HTTPS here, or at the proxy in front (FHIR_KAT_PUBLIC_BASE_URL)."""
    base = current_app.config.get("KAT_PUBLIC_BASE_URL") or ""
    return request.is_secure or base.startswith("https://")


def set_cookie(response: Response, ticket: str) -> None:
    response.set_cookie(
        COOKIE,
        ticket,
        max_age=IDLE_SECONDS,
        path="/",
        secure=_secure(),
        httponly=True,
        samesite="Strict",
    )


def clear_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", secure=_secure(), httponly=True, samesite="Strict")


def same_origin() -> bool:
    """Did the browser say this request came from one of our own pages? ``Sec-Fetch-Site``
    decides where it is sent; otherwise a real ``Origin`` must be ours (pages send
    ``Referrer-Policy: no-referrer``, under which browsers may send ``Origin: null``)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser: no cookie-borne request is forged without one
    return origin.rstrip("/") == request.host_url.rstrip("/")


def current_session() -> BrowserSession | None:
    session: BrowserSession | None = g.get("kat_browser_session")
    return session


def authenticate_from_cookie() -> Response | None:
    """Before the bearer check: turn a valid session cookie into a bearer token for this
    request. Returns a response only to refuse a cross-site or CSRF-less unsafe request."""
    if request.headers.get("Authorization") or COOKIE not in request.cookies:
        return None
    found = read_ticket(request.cookies[COOKIE])
    if found is None:
        g.kat_clear_session = True
        return None
    session, client = found
    if request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not sent and request.mimetype == "application/x-www-form-urlencoded":
            sent = request.form.get("csrf_token", "")  # the sign-out form
        if not same_origin() or not hmac.compare_digest(sent, session.csrf):
            return outcome_response(
                403, [Issue("forbidden", "cross-site request refused: reload the page")]
            )
    token, _ = _state().tokens.issue(client, client.scopes)
    # The bearer check below reads the header from the WSGI environ, as for any client.
    request.environ["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    g.kat_browser_session = session
    return None


def renew_cookie(response: Response) -> Response:
    """Slide the idle expiry (never past the absolute one); drop a dead cookie."""
    session = current_session()
    if g.get("kat_clear_session"):
        clear_cookie(response)
    elif session is not None and _now() - session.issued_at >= RENEW_AFTER_SECONDS:
        client = _state().clients.get(session.client_id)
        if client is not None:
            set_cookie(response, ticket_for(client, csrf=session.csrf, auth_time=session.auth_time))
    return response
