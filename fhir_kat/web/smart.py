"""The referral form as a SMART App Launch 2.x app (``/smart``; docs/integrators.md, "SMART
app"; ADR 0026).

``GET /smart/launch?iss=…&launch=…`` (EHR launch) or ``?iss=…`` (standalone: the patient is
picked at the EHR) → the EHR's authorization server (``security/smart.py``: PKCE S256, ``aud``
= ``iss``, state bound to this browser server-side) → ``GET /smart/callback`` → the physician
is signed in as a person in our own server-side session (``security/sessions.py``, as an
OpenID Connect sign-in is: role referrer, the organisation of the EHR's registration, audited
by name), and the launch's context — the EHR's access token among it — is kept sealed beside
that session → ``GET /smart/referral`` reads the chart with that token
(``services/smart_launch.py``) and renders the ordinary referral form prefilled; the page posts
to ``POST /api/v1/referrals`` like every referral. When that POST succeeds (or at sign-out, or
when the session or the token ends) the launch, and its token, are forgotten.

Must not: put the EHR's token in a page, a cookie, a URL or a log; log anything of the chart;
or follow an ``iss`` no registration names.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Flask, current_app, make_response, redirect, render_template, request
from werkzeug.wrappers import Response

from fhir_kat.api.auth import audit_record
from fhir_kat.security.oidc import SignInError
from fhir_kat.security.sessions import SIGNIN_SECONDS
from fhir_kat.security.smart import CLIENT_PREFIX, EhrAuthorizationServer, user_path
from fhir_kat.security.tokens import Person
from fhir_kat.services.smart_launch import ChartUnavailable, LaunchChart
from fhir_kat.web import session as browser
from fhir_kat.web.pages import CSP, HERE, referral_form

log = logging.getLogger("fhir_kat.web.smart")
bp = Blueprint("smart", __name__, url_prefix="/smart", template_folder=str(HERE / "templates"))

#: Binds a launch under way to the browser that began it (SameSite=Lax: the EHR's redirect
#: back is a cross-site top-level navigation).
LAUNCH_COOKIE = "kat_smart"
LAUNCH_COOKIE_PATH = "/smart/"
#: The form a launch opens.
FORM_PATH = "/smart/referral"
#: Endpoints without a session: they check their own registration, state and origin.
PUBLIC_ENDPOINTS = frozenset({"smart.launch", "smart.callback"})
_MAX_PARAM = 2000


def _state() -> Any:
    return current_app.extensions["fhir_kat"]


def _servers() -> dict[str, EhrAuthorizationServer]:
    servers: dict[str, EhrAuthorizationServer] = _state().smart_ehrs
    return servers


def redirect_uri() -> str:
    """``/smart/callback`` at this service's public origin: the redirect URI registered at
    every EHR."""
    base: str = current_app.config.get("KAT_PUBLIC_BASE_URL") or ""
    origin = base.rsplit("/fhir", 1)[0] if base else request.host_url.rstrip("/")
    return f"{origin}/smart/callback"


def _refused(title: str, message: str, status: int, retry: bool = True) -> Response:
    page = render_template(
        "smart_refused.html",
        title=title,
        message=message,
        retry=retry,
        role="",
        client_id="",
        person_name="",
        csrf="",
    )
    response = make_response(page, status)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.before_app_request
def _form_needs_a_launch() -> Response | None:
    """The form without a session (a bookmark, an expired session): a page saying to launch
    again from the EMR, before the bearer check would answer an API client's 401. Signing out
    of a launched session revokes the EHR's token first (the row goes with the session)."""
    if request.endpoint == "web.logout":
        _revoke_launch()
    if request.endpoint == "smart.referral" and browser.current_session() is None:
        audit_record().detail = "denied: no browser session"
        return _refused(
            "The referral form needs a launch from your EMR",
            "Your session has ended or the form was not opened from your EMR.",
            401,
        )
    return None


@bp.after_app_request
def _after(response: Response) -> Response:
    if request.blueprint == "smart":
        response.headers["Content-Security-Policy"] = CSP
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"
    elif (
        request.endpoint == "artifacts.submit"
        and request.view_args == {"kind": "referrals"}
        and 200 <= response.status_code < 300
    ):
        # The referral is sent: the launch's token and context are of no more use.
        _revoke_launch()
    return response


def _revoke_launch() -> None:
    """Forget the current session's launch, asking the EHR to revoke its token first."""
    session = browser.current_session()
    if session is None or not session.client_id.startswith(CLIENT_PREFIX):
        return
    context = browser.sessions().open_launch(
        request.cookies.get(browser.COOKIE, ""), _state().clock()
    )
    server = _servers().get(str((context or {}).get("ehr", "")))
    if context is not None and server is not None and not server.revoke(context["access_token"]):
        log.info("SMART EHR token not revoked (expires there)", extra={"ehr": server.ehr.id})
    browser.sessions().drop_launch(session.key)


@bp.get("/launch")
def launch() -> Response:
    """An EHR launch (``iss`` + ``launch``) or a standalone one (``iss`` alone)."""
    record = audit_record()
    record.security, record.interaction = True, "operation"
    iss = request.args.get("iss", "").rstrip("/")
    launch_id = request.args.get("launch")
    server = next((s for s in _servers().values() if iss and s.ehr.iss == iss), None)
    if server is None or len(iss) > _MAX_PARAM or len(launch_id or "") > _MAX_PARAM:
        record.detail = "smart launch refused: iss not registered"
        return _refused(
            "This EMR is not registered",
            "The referral form can be opened only from an EMR registered with the program "
            "(the launch named a FHIR server this service does not know). Ask the program to "
            "register your EMR.",
            400,
            retry=False,
        )
    record.client_id = server.ehr.principal_client_id
    if launch_id is not None and not launch_id:
        launch_id = None
    try:
        authorization = server.begin_launch(redirect_uri(), launch_id)
    except SignInError as exc:
        record.detail = f"smart launch refused: {exc.reason}"
        log.warning("SMART EHR unusable", extra={"ehr": server.ehr.id, "why": exc.reason})
        return _refused("Your EMR cannot launch the form right now", exc.message, exc.status)
    binding = browser.sessions().begin_signin(
        _state().clock(),
        state=authorization.state,
        provider=server.ehr.principal_client_id,
        nonce=authorization.nonce,
        code_verifier=authorization.code_verifier,
        next_path=FORM_PATH,
    )
    record.detail = "smart launch begun"
    response = redirect(authorization.url, 303)
    response.set_cookie(
        LAUNCH_COOKIE,
        binding,
        max_age=SIGNIN_SECONDS,
        path=LAUNCH_COOKIE_PATH,
        secure=_secure(),
        httponly=True,
        samesite="Lax",
    )
    return response


def _secure() -> bool:
    base = current_app.config.get("KAT_PUBLIC_BASE_URL") or ""
    return request.is_secure or str(base).startswith("https://")


@bp.get("/callback")
def callback() -> Response:
    """The EHR's answer: matched once to the launch this browser began, the code exchanged
    with the PKCE verifier, the ID token checked, the launch context taken; then a session of
    the physician and the launch sealed beside it."""
    record = audit_record()
    record.security, record.interaction = True, "operation"
    state = _state()
    now: datetime = state.clock()
    pending = browser.sessions().take_signin(
        request.args.get("state", ""), request.cookies.get(LAUNCH_COOKIE, ""), now
    )
    server = None
    if pending is not None and pending.provider.startswith(CLIENT_PREFIX):
        server = _servers().get(pending.provider.removeprefix(CLIENT_PREFIX))
    if pending is None or server is None:
        record.detail = "smart launch refused: state unknown, used, expired or another browser's"
        return _clear(
            _refused(
                "This launch is not valid any more",
                "The answer from your EMR does not belong to a launch begun in this browser, "
                "or it was used or took too long.",
                400,
            )
        )
    ehr = server.ehr
    record.client_id = ehr.principal_client_id
    try:
        launched = server.finish_launch(
            request.args,
            redirect_uri=redirect_uri(),
            nonce=pending.nonce,
            code_verifier=pending.code_verifier,
            now=int(now.timestamp()),
        )
    except SignInError as exc:
        record.detail = f"smart launch refused: {exc.reason}"
        return _clear(_refused("The referral form could not open", exc.message, exc.status))
    person = Person(launched.issuer, launched.subject, launched.name or launched.subject)
    record.person = person
    grant = ehr.grant
    earlier = browser.current_session()
    if earlier is not None:
        # A launch never continues an older session (another person's, perhaps): it ends.
        browser.sessions().end(earlier.key, now, "replaced by a launch")
    cookie, _ = browser.sessions().create(
        now,
        client_id=ehr.principal_client_id,
        role=grant.role,
        scopes=tuple(s.text for s in grant.scopes),
        organization=grant.organization,
        purpose=grant.purpose,
        person=person,
        grant_source=("smart-launch",),
    )
    browser.sessions().keep_launch(
        cookie,
        {
            "ehr": ehr.id,
            "patient": launched.patient,
            "fhir_user": launched.fhir_user,
            "access_token": launched.access_token,
        },
        datetime.fromtimestamp(launched.expires_at, UTC),
        now,
    )
    record.role, record.purpose = grant.role, grant.purpose
    record.detail = "smart launch: physician signed in"
    # A page, not a redirect: after the EHR's cross-site redirects the browser would not send
    # the new SameSite=Strict session cookie; a same-site navigation from this page does.
    page = render_template(
        "smart_launched.html",
        next=FORM_PATH,
        person_name=person.name,
        ehr_title=ehr.title,
        role="",
        client_id="",
        csrf="",
    )
    response = make_response(page, 200)
    browser.set_cookie(response, cookie)
    return _clear(response)


def _clear(response: Response) -> Response:
    response.delete_cookie(
        LAUNCH_COOKIE, path=LAUNCH_COOKIE_PATH, secure=_secure(), httponly=True, samesite="Lax"
    )
    return response


@bp.get("/referral")
def referral() -> Response | str:
    """The referral form, prefilled from the launch's chart, read now with the launch's token."""
    session = browser.current_session()
    state = _state()
    cookie = request.cookies.get(browser.COOKIE, "")
    context = (
        browser.sessions().open_launch(cookie, state.clock())
        if session is not None and session.client_id.startswith(CLIENT_PREFIX)
        else None
    )
    server = _servers().get(str((context or {}).get("ehr", "")))
    if context is None or server is None:
        audit_record().detail = "smart form refused: no live launch"
        return _refused(
            "This launch has ended",
            "The referral was sent, you signed out, or the access your EMR gave has expired.",
            410,
        )
    chart: LaunchChart = state.smart_chart
    try:
        prefill = chart.prefill(
            server.ehr.iss,
            context["access_token"],
            context["patient"],
            user_path(context["fhir_user"], server.ehr.iss),
        )
    except ChartUnavailable:
        audit_record().detail = "smart form: the EHR's FHIR server did not answer"
        log.warning("SMART EHR FHIR server unavailable", extra={"ehr": server.ehr.id})
        return _refused(
            "Your EMR's records cannot be read right now",
            f"{server.ehr.title}'s FHIR server did not answer. Try again in a minute.",
            502,
        )
    audit_record().detail = "smart form: prefilled from the EHR"
    names = [
        prefill.fields.get("patient.given_names", ""),
        prefill.fields.get("patient.family_name", ""),
    ]
    return referral_form(
        "smart_referral.html",
        prefill=prefill.fields,
        conditions=prefill.conditions,
        scores=prefill.scores,
        medications=prefill.medications,
        complete=prefill.complete,
        patient_label=" ".join(n for n in names if n),
        ehr_title=server.ehr.title,
    )


def register(app: Flask) -> None:
    app.register_blueprint(bp)
