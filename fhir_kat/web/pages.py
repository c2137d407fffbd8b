"""Server-rendered pages under ``/app``: sign-in, the referral form and its live status, the
program dashboard and the instrument questionnaires.

Owns: page routes and what a page needs to render (labels, options, the caller's role). The data
itself is fetched by the page's own script from the service's public APIs (``/api/v1``,
``/fhir``) with the browser session (``session.py``), so a page shows exactly what those APIs let
this client see. Must not: read or write patient data itself, or log request values.
"""

from __future__ import annotations

import logging
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from flask import (
    Blueprint,
    Flask,
    current_app,
    g,
    make_response,
    redirect,
    render_template,
    request,
)
from werkzeug.wrappers import Response

from fhir_kat.api.auth import audit_record, current_access
from fhir_kat.artifacts import json_schema
from fhir_kat.artifacts.schemas import PHN_SYSTEMS
from fhir_kat.errors import FhirError, Forbidden, NotFound, issue
from fhir_kat.security.clients import check_secret
from fhir_kat.security.oidc import OpenIdClient, SignInError
from fhir_kat.security.policy import area_allowed
from fhir_kat.security.sessions import SIGNIN_SECONDS
from fhir_kat.security.tokens import Person
from fhir_kat.terminology import BASE, IDENTIFIERS, load_terminology
from fhir_kat.web import session as browser
from fhir_kat.web.forms import referral_fields
from fhir_kat.web.wording import (
    ACT_ON,
    DEFAULT_ACT_ON,
    NEXT_FOR_STATUS,
    NEXT_STEP,
    priority_words,
)

log = logging.getLogger("fhir_kat.web")
HERE = Path(__file__).resolve().parent
bp = Blueprint(
    "web",
    __name__,
    url_prefix="/app",
    template_folder=str(HERE / "templates"),
    static_folder=str(HERE / "static"),
    static_url_path="/static",
)

#: Endpoints reachable without a session (auth.PUBLIC lists them for the bearer check too).
PUBLIC_ENDPOINTS = frozenset(
    {"web.login", "web.login_submit", "web.static", "web.login_provider", "web.callback"}
)
#: Sign-in routes that check their own origin, state or credentials before any session.
SIGN_IN_ENDPOINTS = frozenset({"web.login_submit", "web.login_provider", "web.callback"})
#: Paths a browser lands on first: it is sent to the pages (and so to sign-in) rather than
#: given an API client's 401 OperationOutcome.
LANDING_PATHS = frozenset({"/", "/app"})
#: Questionnaires a page is offered for (ids of the installed instrument Questionnaires).
QUESTIONNAIRES = ("phq-9", "gad-7", "pcl-5", "b-ipf")
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def _state() -> Any:
    return current_app.extensions["fhir_kat"]


@bp.before_app_request
def _session_first() -> Response | None:
    """Runs before the bearer check (app.py registers this blueprint before ``auth.install``)."""
    if request.endpoint == "web.static" or request.endpoint in SIGN_IN_ENDPOINTS:
        return None  # signing in checks its own origin or state; static files need no session
    if request.path in LANDING_PATHS and request.method == "GET" and _wants_html():
        return redirect("/app/", 303)
    refused = browser.authenticate_from_cookie()
    if refused is not None:
        return refused
    if (
        request.blueprint == "web"
        and request.endpoint not in PUBLIC_ENDPOINTS
        and browser.current_session() is None
        and not request.headers.get("Authorization")
    ):
        audit_record().detail = "denied: no browser session"
        target = quote(_local_next(request.full_path.rstrip("?")), safe="/")
        return redirect(f"/app/login?next={target}", 303)
    return None


@bp.after_app_request
def _after(response: Response) -> Response:
    if request.blueprint == "web":
        response.headers["Content-Security-Policy"] = CSP
    return browser.renew_cookie(response)


@bp.errorhandler(FhirError)
def _page_error(exc: FhirError) -> tuple[str, int]:
    """People get the OperationOutcome's issues as a page, not JSON."""
    access = g.get("kat_access")
    session = browser.current_session()
    page = render_template(
        "error.html",
        status=exc.status,
        messages=[i.diagnostics for i in exc.issues],
        role=access.principal.role if access else "",
        client_id=access.principal.client_id if access else "",
        person_name=access.principal.person.name if access and access.principal.person else "",
        csrf=session.csrf if session else "",
    )
    return page, exc.status


def _require_area(area: str, what: str) -> None:
    role = current_access().principal.role
    if not area_allowed(role, area):
        raise Forbidden(issue("forbidden", f"your role ({role}) may not {what}"))


def _wants_html() -> bool:
    """A browser navigating (it names text/html), not an API client (``*/*`` or JSON)."""
    return any(value == "text/html" for value, _ in request.accept_mimetypes)


def _local_next(value: str | None) -> str:
    """Only a path of these pages: never an open redirect."""
    if not value:
        return "/app/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or not parts.path.startswith("/app/") or "//" in value:
        return "/app/"
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _page(template: str, **context: Any) -> str:
    access = current_access()
    session = browser.current_session()
    person = access.principal.person
    return render_template(
        template,
        role=access.principal.role,
        client_id=access.principal.client_id,
        person_name=person.name if person else "",
        csrf=session.csrf if session else "",
        phn_systems=" ".join(PHN_SYSTEMS),
        canonical_base=BASE,  # this deployment's canonical home (ADR: canonical home)
        **context,
    )


def _providers() -> dict[str, OpenIdClient]:
    providers: dict[str, OpenIdClient] = _state().identity_providers
    return providers


def client_sign_in_enabled() -> bool:
    """The client-secret form is for local development: on by default only while no
    identity provider is configured (``client_sign_in``, settings.py)."""
    mode = _state().settings.client_sign_in
    return mode == "on" or (mode == "auto" and not _providers())


def _login_page(target: str, error: str = "") -> str:
    return render_template(
        "login.html",
        next=target,
        error=error,
        providers=[c.provider for c in _providers().values()],
        client_form=client_sign_in_enabled(),
    )


def _app_base() -> str:
    """This service's public origin: the redirect URIs registered at the providers."""
    base: str = current_app.config.get("KAT_PUBLIC_BASE_URL") or ""
    if base:
        return base.rsplit("/fhir", 1)[0]
    return request.host_url.rstrip("/")


def redirect_uri(provider_id: str) -> str:
    return f"{_app_base()}/app/auth/{provider_id}/callback"


# ---------------------------------------------------------------------------- sign-in


@bp.get("/login")
def login() -> str:
    return _login_page(_local_next(request.args.get("next")))


@bp.post("/login")
def login_submit() -> Response | tuple[str, int] | tuple[str, int, dict[str, str]]:
    record = audit_record()
    record.security = True
    record.interaction = "operation"
    target = _local_next(request.form.get("next"))
    if not client_sign_in_enabled():
        record.detail = "browser sign-in refused: client sign-in is off"
        return _login_page(target, "Sign in through your organisation instead."), 403
    if not browser.same_origin():
        record.detail = "browser sign-in refused: cross-site"
        return _login_page(target, "Sign-in refused."), 403
    client_id = request.form.get("client_id", "")
    limiter = _state().auth_failures
    wait = limiter.wait(request.remote_addr, client_id)
    if wait:
        record.detail = "browser sign-in refused: too many failed attempts"
        record.presented_client_id = client_id
        message = f"Too many failed sign-ins. Try again in {int(wait)} seconds."
        return _login_page(target, message), 429, {"Retry-After": str(int(wait))}
    client = _state().clients.get(client_id)
    if not check_secret(client, request.form.get("client_secret", "")) or client is None:
        limiter.failed(request.remote_addr, client_id)
        record.detail = "browser sign-in refused: unknown client or wrong secret"
        record.presented_client_id = client_id
        return _login_page(target, "Unknown client or wrong secret."), 401
    record.client_id, record.role = client.client_id, client.role
    record.detail = "browser sign-in"
    response = redirect(target, 303)
    browser.set_cookie(response, browser.start_client_session(client))
    return response


@bp.get("/login/<provider_id>")
def login_provider(provider_id: str) -> Response | tuple[str, int]:
    """Begin signing in through ``provider_id``: to its authorization endpoint with a fresh
    state, nonce and PKCE challenge, remembered server-side and bound to this browser."""
    oidc = _providers().get(provider_id)
    if oidc is None:
        raise NotFound(issue("not-found", "no such sign-in provider", "provider"))
    target = _local_next(request.args.get("next"))
    try:
        authorization = oidc.begin(redirect_uri(provider_id))
    except SignInError as exc:
        # Nothing was disclosed and nobody is signed in: a log line for the operator.
        log.warning("sign-in provider unusable", extra={"provider": provider_id, "why": exc.reason})
        return _login_page(target, exc.message), exc.status
    binding = browser.sessions().begin_signin(
        _state().clock(),
        state=authorization.state,
        provider=provider_id,
        nonce=authorization.nonce,
        code_verifier=authorization.code_verifier,
        next_path=target,
    )
    response = redirect(authorization.url, 303)
    browser.set_signin_cookie(response, binding, SIGNIN_SECONDS)
    return response


@bp.get("/auth/<provider_id>/callback")
def callback(provider_id: str) -> Response:
    """The provider's answer: matched to the sign-in this browser began (once), the code
    exchanged with the PKCE verifier, the ID token validated, the person's claims mapped to
    a role; then a new session. Every outcome is audited; a refusal names no token or claim."""
    record = audit_record()
    record.security, record.interaction = True, "operation"
    oidc = _providers().get(provider_id)
    if oidc is None:
        raise NotFound(issue("not-found", "no such sign-in provider", "provider"))
    provider = oidc.provider
    record.client_id = provider.principal_client_id
    state = _state()
    now = state.clock()
    pending = browser.sessions().take_signin(
        request.args.get("state", ""), request.cookies.get(browser.SIGNIN_COOKIE, ""), now
    )
    try:
        if pending is None or pending.provider != provider_id:
            raise SignInError(
                "state unknown, used, expired or begun in another browser",
                "This sign-in link is not valid any more. Please sign in again.",
                400,
            )
        identity = oidc.finish(
            request.args,
            redirect_uri=redirect_uri(provider_id),
            nonce=pending.nonce,
            code_verifier=pending.code_verifier,
            now=int(now.timestamp()),
        )
        record.person = Person(identity.issuer, identity.subject, identity.name)
        grant = provider.grant_for(identity.role_values)
    except SignInError as exc:
        record.detail = f"browser sign-in refused: {exc.reason}"
        target = pending.next_path if pending else "/app/"
        response = make_response(_login_page(target, exc.message), exc.status)
        browser.clear_signin_cookie(response)
        return response
    person = Person(identity.issuer, identity.subject, identity.name)
    cookie, _ = browser.sessions().create(
        now,
        client_id=provider.principal_client_id,
        role=grant.role,
        scopes=tuple(s.text for s in grant.scopes),
        organization=grant.organization,
        purpose=grant.purpose,
        person=person,
        grant_source=tuple(v for v in identity.role_values if v in provider.roles),
    )
    record.role, record.purpose = grant.role, grant.purpose
    record.detail = "browser sign-in"
    # A page, not a redirect: after a cross-site redirect chain (the provider's) the browser
    # would not send the new SameSite=Strict cookie; a same-site navigation from this page does.
    page = render_template(
        "signed_in.html", next=pending.next_path, person_name=person.name, role=grant.role
    )
    response = make_response(page, 200)
    browser.set_cookie(response, cookie)
    browser.clear_signin_cookie(response)
    return response


@bp.post("/logout")
def logout() -> Response:
    audit_record().detail = "browser sign-out"
    session = browser.current_session()
    if session is not None:
        # Ended in the database: every process refuses the cookie from now on, copies too.
        browser.sessions().end(session.key, _state().clock(), "sign-out")
        g.kat_session_ended = True
    response = redirect("/app/login", 303)
    browser.clear_cookie(response)
    return response


# ---------------------------------------------------------------------------- pages


@bp.get("/")
def home() -> str:
    return _page("home.html", questionnaires=QUESTIONNAIRES)


def _instrument_info() -> list[dict[str, Any]]:
    """Each instrument's range, unit, bands, cut-off and what "improved" means: definitions,
    not patient data (mappings/instruments/instruments.yaml)."""
    out = []
    for inst in _state().outcomes.catalogue.instruments.values():
        if inst.post_negative:
            improved = f"screened negative after the program (total below {inst.positive_at:g})"
        else:
            parts = []
            if inst.min_drop is not None:
                points = "percentage points" if inst.unit == "%" else "points"
                parts.append(f"a total {inst.min_drop:g} or more {points} lower")
            if inst.milder_band:
                parts.append("a milder severity band")
            improved = " or ".join(parts) + " at follow-up"
        out.append(
            {
                "key": inst.key,
                "code": inst.panel["code"],
                "system": inst.panel["system"],
                "total_code": inst.total["code"],
                "title": inst.title,
                "min": inst.min,
                "max": inst.max,
                "unit": "%" if inst.unit == "%" else "points",
                "positive_at": inst.positive_at,
                "bands": [{"display": b.display, "min": b.min} for b in inst.bands],
                "improved": improved,
            }
        )
    return out


def _referral_numbering() -> tuple[str, str, str]:
    """The signed-in clinic's referral numbering system and its identifier (system, value):
    derived, never typed. A caller without an organisation (program staff) uses the program's
    web-form numbering under its own client id."""
    principal = current_access().principal
    org_system, _, org_value = (principal.organization or "").rpartition("|")
    owner = org_value or principal.client_id
    return f"{IDENTIFIERS}/referral-form/{quote(owner, safe='')}", org_system, org_value


def referral_form(template: str = "referral.html", **context: Any) -> str:
    """The referral form page (``template`` extends referral.html): its fields from the
    artifact's JSON Schema, the clinic's numbering and identifier derived from the caller;
    ``prefill`` (a SMART launch's chart, web/smart.py) adds values the physician reviews."""
    _require_area("artifacts:referrals", "send referrals")
    numbering, org_system, org_value = _referral_numbering()
    defaults = {
        **context.pop("prefill", {}),
        "referral_identifier.system": numbering,
        "referrer.organization.identifier.system": org_system or f"{IDENTIFIERS}/organization",
        "referrer.organization.identifier.value": org_value,
        "urgency": "routine",
    }
    return _page(
        template,
        sections=referral_fields(json_schema("referrals"), clinic_known=bool(org_value)),
        defaults=defaults,
        **context,
    )


@bp.get("/referrals/new")
def referral_new() -> str:
    return referral_form()


@bp.get("/referrals")
def referrals() -> str:
    """The caller's referrals (a referrer: its clinic's, as the API shows them)."""
    _require_area("artifacts:referrals", "follow referrals")
    return _page(
        "referrals.html",
        wording={"next": NEXT_STEP, "status": NEXT_FOR_STATUS},
    )


@bp.get("/referrals/<task_id>")
def referral_status(task_id: str) -> str:
    return _page(
        "referral_status.html",
        task_id=task_id,
        wording={"next": NEXT_STEP, "status": NEXT_FOR_STATUS},
    )


def _acting_person() -> dict[str, Any]:
    """Who acknowledges or resolves a Flag: the signed-in person (identified by the identity
    provider's issuer and subject), else the staff member types their name and number."""
    person = current_access().principal.person
    if person is None:
        return {"known": False, "system": f"{IDENTIFIERS}/staff"}
    given, _, family = person.name.rpartition(" ")
    return {
        "known": True,
        "name": person.name,
        "family": family or person.name,
        "given": given,
        "system": person.issuer,
        "value": person.subject,
    }


@bp.get("/safety")
def safety_inbox() -> str:
    _require_area("operations:flags", "act on safety flags")
    return _page(
        "safety.html",
        priority=priority_words(),
        actor=_acting_person(),
    )


@bp.get("/worklist")
def worklist() -> str:
    _require_area("operations:flags", "see the program's worklist")
    return _page("worklist.html", intake_steps=_intake_steps())


def _intake_steps() -> dict[str, str]:
    """Intake step code -> its name (kat-intake), for holds that name the step clearing them."""
    return dict(load_terminology().code_systems[f"{BASE}/CodeSystem/kat-intake"])


@bp.get("/participants/<patient_id>")
def participant(patient_id: str) -> str:
    _require_area("operations:flags", "see a participant's record")
    return _page(
        "participant.html",
        patient_id=patient_id,
        instruments=_instrument_info(),
        intake_steps=_intake_steps(),
    )


@bp.get("/dashboard")
def dashboard() -> str:
    _require_area("operations:measure", "see program outcomes")
    return _page(
        "dashboard.html",
        instruments=_instrument_info(),
        extension_base=f"{BASE}/StructureDefinition/",
        today=date.today().isoformat(),
        staff=current_access().principal.role == "program-staff",
        min_cell=_state().settings.min_cell_size,
    )


@bp.get("/questionnaires/<name>")
def questionnaire(name: str) -> str:
    if name not in QUESTIONNAIRES:
        raise NotFound(issue("not-found", "no such questionnaire page", "name"))
    stored = _state().fhir.read("Questionnaire", name, current_access())
    audit_record().entities.append(f"Questionnaire/{name}")
    q = stored.json()
    return _page(
        "questionnaire.html",
        q=q,
        # The instrument's own instructions and stem (display items), then its questions.
        instructions=[i for i in q.get("item", []) if i.get("type") == "display"],
        items=[
            i for i in q.get("item", []) if not i.get("readOnly") and i.get("type") != "display"
        ],
        total_codes=[
            c["code"] for i in q.get("item", []) if i.get("readOnly") for c in i.get("code", [])
        ],
        patient=request.args.get("patient", ""),
        act_on=ACT_ON,
        default_act_on=DEFAULT_ACT_ON,
        priority=priority_words(),
    )


def register(app: Flask) -> None:
    app.register_blueprint(bp)
