"""Browser sessions for the web pages (docs/security.md, "Browser sessions").

A person signs in through their organisation's OpenID Provider (``security/oidc.py``; the
routes are in ``pages.py``) — or, for local development, with a registered client's id and
secret. Either way the server keeps a session row (``security/sessions.py``) and the browser an
HttpOnly, SameSite=Strict cookie holding only a random session id. On every request that
carries the cookie and no ``Authorization`` header, the row is looked up and a fresh
short-lived access token is minted with exactly the session's grant (for a person: the role,
organisation and scopes its provider's mapping gave at sign-in, and the person's name and
provider identifier; for a client: its current registration) and put in front of the ordinary
bearer check — so pages and the APIs they call get exactly the access rules, rate limit and
audit of an API client of that grant, naming the person.

Unsafe methods (anything but GET/HEAD/OPTIONS) authenticated by the cookie also need the
session's CSRF token in ``X-CSRF-Token`` (or the ``csrf_token`` form field) and must not come
from another site. A session ends at sign-out, after the idle timeout, at the absolute timeout,
and when what granted it changes (the client removed or its secret rotated; the provider or its
role mapping changed). Must not: log or echo credentials or session ids.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from flask import current_app, g, request
from werkzeug.wrappers import Response

from fhir_kat.api.errors import outcome_response
from fhir_kat.errors import Issue
from fhir_kat.security.clients import Client
from fhir_kat.security.oidc import CLIENT_PREFIX, SignInError
from fhir_kat.security.scopes import parse_scopes
from fhir_kat.security.sessions import TOUCH_AFTER_SECONDS, BrowserSession, SessionStore
from fhir_kat.security.smart import CLIENT_PREFIX as SMART_PREFIX

COOKIE = "kat_session"
#: Binds an OpenID Connect sign-in under way to the browser that began it (SameSite=Lax: the
#: provider's redirect back is a cross-site top-level navigation, which Strict would strip).
SIGNIN_COOKIE = "kat_signin"
SIGNIN_COOKIE_PATH = "/app/auth/"
CSRF_HEADER = "X-CSRF-Token"
#: Defaults of ``session_idle_seconds`` / ``session_absolute_seconds`` (settings.py).
IDLE_SECONDS = 30 * 60
ABSOLUTE_SECONDS = 8 * 60 * 60
RENEW_AFTER_SECONDS = TOUCH_AFTER_SECONDS
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _state() -> Any:
    return current_app.extensions["fhir_kat"]


def sessions() -> SessionStore:
    store: SessionStore = _state().sessions
    return store


def credential_fingerprint(client: Client) -> str:
    """Changes when the client's secret (or key set) is rotated, ending older sessions."""
    material = client.secret_hash or repr(sorted((client.jwks or {}).items()))
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def start_client_session(client: Client) -> str:
    """A session for a registered client (the local-development sign-in); the cookie value."""
    cookie, _ = sessions().create(
        _state().clock(),
        client_id=client.client_id,
        role=client.role,
        scopes=tuple(s.text for s in client.scopes),
        organization=client.organization,
        purpose=client.purpose,
        credential=credential_fingerprint(client),
    )
    return cookie


def _secure() -> bool:
    """HTTPS here, or at the proxy in front (FHIR_KAT_PUBLIC_BASE_URL)."""
    base = current_app.config.get("KAT_PUBLIC_BASE_URL") or ""
    return request.is_secure or base.startswith("https://")


def set_cookie(response: Response, value: str) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=_state().settings.session_idle_seconds,
        path="/",
        secure=_secure(),
        httponly=True,
        samesite="Strict",
    )


def clear_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", secure=_secure(), httponly=True, samesite="Strict")


def set_signin_cookie(response: Response, value: str, max_age: int) -> None:
    response.set_cookie(
        SIGNIN_COOKIE,
        value,
        max_age=max_age,
        path=SIGNIN_COOKIE_PATH,
        secure=_secure(),
        httponly=True,
        samesite="Lax",
    )


def clear_signin_cookie(response: Response) -> None:
    response.delete_cookie(
        SIGNIN_COOKIE, path=SIGNIN_COOKIE_PATH, secure=_secure(), httponly=True, samesite="Lax"
    )


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


def _access_token(session: BrowserSession) -> str | None:
    """An access token with exactly the session's grant; None when what granted it is gone."""
    state = _state()
    if session.person is None:
        client: Client | None = state.clients.get(session.client_id)
        if client is None or not hmac.compare_digest(
            session.credential or "", credential_fingerprint(client)
        ):
            return None
        token: str = state.tokens.issue(client, client.scopes)[0]
        return token
    if session.client_id.startswith(SMART_PREFIX):
        # A physician launched from an EHR: the grant its registration names (security/smart.py).
        server = state.smart_ehrs.get(session.client_id.removeprefix(SMART_PREFIX))
        if server is None:
            return None  # the EHR is no longer registered
        grant = server.ehr.grant
    else:
        oidc = state.identity_providers.get(session.client_id.removeprefix(CLIENT_PREFIX))
        if oidc is None:
            return None  # the provider is no longer configured
        try:
            grant = oidc.provider.grant_for(session.grant_source)
        except SignInError:
            return None
    if (grant.role, grant.organization, grant.scope_text, grant.purpose) != (
        session.role,
        session.organization,
        " ".join(session.scopes),
        session.purpose,
    ):
        return None  # the mapping changed since sign-in: sign in again to get the new one
    scopes, _ = parse_scopes(list(session.scopes))
    token = state.tokens.issue_grant(
        session.client_id,
        session.role,
        tuple(scopes),
        session.organization,
        session.purpose,
        person=session.person,
    )[0]
    return token


def authenticate_from_cookie() -> Response | None:
    """Before the bearer check: turn a live session cookie into a bearer token for this
    request. Returns a response only to refuse a cross-site or CSRF-less unsafe request."""
    if request.headers.get("Authorization") or COOKIE not in request.cookies:
        return None
    now = _state().clock()
    session = sessions().find(request.cookies[COOKIE], now)
    if session is None:
        g.kat_clear_session = True
        return None
    token = _access_token(session)
    if token is None:
        sessions().end(session.key, now, "grant changed")
        g.kat_clear_session = True
        return None
    if request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not sent and request.mimetype == "application/x-www-form-urlencoded":
            sent = request.form.get("csrf_token", "")  # the sign-out form
        if not same_origin() or not hmac.compare_digest(sent, session.csrf):
            return outcome_response(
                403, [Issue("forbidden", "cross-site request refused: reload the page")]
            )
    # The bearer check below reads the header from the WSGI environ, as for any client.
    request.environ["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    g.kat_browser_session = session
    g.kat_session_now = now  # the use is recorded at the moment it was checked
    return None


def renew_cookie(response: Response) -> Response:
    """Record the use (sliding the idle expiry, never past the absolute one); drop a dead
    cookie."""
    session = current_session()
    if g.get("kat_clear_session"):
        clear_cookie(response)
    elif (
        session is not None
        and not g.get("kat_session_ended")
        and sessions().touch(session, g.kat_session_now)
    ):
        set_cookie(response, request.cookies[COOKIE])
    return response
