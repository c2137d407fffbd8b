"""Server-rendered pages under ``/app``: sign-in, the referral form and its live status, the
program dashboard and the instrument questionnaires.

Owns: page routes and what a page needs to render (labels, options, the caller's role). The data
itself is fetched by the page's own script from the service's public APIs (``/api/v1``,
``/fhir``) with the browser session (``session.py``), so a page shows exactly what those APIs let
this client see. Must not: read or write patient data itself, or log request values.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from flask import (
    Blueprint,
    Flask,
    current_app,
    g,
    redirect,
    render_template,
    request,
)
from werkzeug.wrappers import Response

from fhir_kat.api.auth import audit_record, current_access
from fhir_kat.artifacts import json_schema
from fhir_kat.errors import FhirError, Forbidden, NotFound, issue
from fhir_kat.security.clients import check_secret
from fhir_kat.security.policy import area_allowed
from fhir_kat.terminology import BASE
from fhir_kat.web import session as browser
from fhir_kat.web.forms import referral_fields

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
PUBLIC_ENDPOINTS = frozenset({"web.login", "web.login_submit", "web.static"})
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
    if request.endpoint in ("web.login_submit", "web.static"):
        return None  # signing in checks its own origin; static files need no session
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
        csrf=session.csrf if session else "",
    )
    return page, exc.status


def _require_area(area: str, what: str) -> None:
    role = current_access().principal.role
    if not area_allowed(role, area):
        raise Forbidden(issue("forbidden", f"your role ({role}) may not {what}"))


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
    return render_template(
        template,
        role=access.principal.role,
        client_id=access.principal.client_id,
        csrf=session.csrf if session else "",
        **context,
    )


# ---------------------------------------------------------------------------- sign-in


@bp.get("/login")
def login() -> str:
    return render_template("login.html", next=_local_next(request.args.get("next")), error="")


@bp.post("/login")
def login_submit() -> Response | tuple[str, int] | tuple[str, int, dict[str, str]]:
    record = audit_record()
    record.security = True
    record.interaction = "operation"
    target = _local_next(request.form.get("next"))
    if not browser.same_origin():
        record.detail = "browser sign-in refused: cross-site"
        return render_template("login.html", next=target, error="Sign-in refused."), 403
    client_id = request.form.get("client_id", "")
    limiter = _state().auth_failures
    wait = limiter.wait(request.remote_addr, client_id)
    if wait:
        record.detail = "browser sign-in refused: too many failed attempts"
        record.presented_client_id = client_id
        message = f"Too many failed sign-ins. Try again in {int(wait)} seconds."
        page = render_template("login.html", next=target, error=message)
        return page, 429, {"Retry-After": str(int(wait))}
    client = _state().clients.get(client_id)
    if not check_secret(client, request.form.get("client_secret", "")) or client is None:
        limiter.failed(request.remote_addr, client_id)
        record.detail = "browser sign-in refused: unknown client or wrong secret"
        record.presented_client_id = client_id
        message = "Unknown client or wrong secret."
        return render_template("login.html", next=target, error=message), 401
    record.client_id, record.role = client.client_id, client.role
    record.detail = "browser sign-in"
    response = redirect(target, 303)
    browser.set_cookie(response, browser.ticket_for(client))
    return response


@bp.post("/logout")
def logout() -> Response:
    audit_record().detail = "browser sign-out"
    response = redirect("/app/login", 303)
    browser.clear_cookie(response)
    return response


# ---------------------------------------------------------------------------- pages


@bp.get("/")
def home() -> str:
    return _page("home.html", questionnaires=QUESTIONNAIRES)


@bp.get("/referrals/new")
def referral_new() -> str:
    _require_area("artifacts:referrals", "send referrals")
    organization = current_access().principal.organization or ""
    org_system, _, org_value = organization.rpartition("|")
    client_id = current_access().principal.client_id
    return _page(
        "referral.html",
        sections=referral_fields(json_schema("referrals")),
        defaults={
            "referral_identifier.system": f"{BASE}/sid/referral-form/{client_id}",
            "referrer.organization.identifier.system": org_system,
            "referrer.organization.identifier.value": org_value,
            "urgency": "routine",
        },
    )


@bp.get("/referrals/<task_id>")
def referral_status(task_id: str) -> str:
    return _page("referral_status.html", task_id=task_id)


@bp.get("/dashboard")
def dashboard() -> str:
    _require_area("operations:measure", "see program outcomes")
    instruments = [
        {
            "code": inst.panel["code"],
            "system": inst.panel["system"],
            "title": inst.title,
            "max": inst.max,
        }
        for inst in _state().outcomes.catalogue.instruments.values()
    ]
    return _page(
        "dashboard.html",
        instruments=instruments,
        today=date.today().isoformat(),
        staff=current_access().principal.role == "program-staff",
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
        items=[i for i in q.get("item", []) if not i.get("readOnly")],
        total_codes=[
            c["code"] for i in q.get("item", []) if i.get("readOnly") for c in i.get("code", [])
        ],
        patient=request.args.get("patient", ""),
    )


def register(app: Flask) -> None:
    app.register_blueprint(bp)
