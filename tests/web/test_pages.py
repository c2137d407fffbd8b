"""The /app pages without a browser: browser sessions (cookie, CSRF, origin, expiry, revocation),
what each page renders, and that sign-in leaves an audit trail and no secrets in the log."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from datetime import timedelta

import pytest
from flask import Flask
from flask.testing import FlaskClient

from fhir_kat.web import session as browser
from tests.conftest import token_for


def signed_in(app: Flask, client_id: str, secret: str) -> tuple[FlaskClient, str]:
    """A test client holding a browser session, and the page's CSRF token."""
    web = app.test_client()
    r = web.post(
        "/app/login", data={"client_id": client_id, "client_secret": secret, "next": "/app/"}
    )
    assert r.status_code == 303, r.data[:300]
    page = web.get("/app/").get_data(as_text=True)
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
    assert match
    return web, match.group(1)


def test_pages_need_a_session_and_sign_in_sets_a_strict_cookie(app: Flask) -> None:
    web = app.test_client()
    r = web.get("/app/dashboard")
    assert r.status_code == 303 and r.headers["Location"] == "/app/login?next=/app/dashboard"
    page = web.get("/app/login?next=/app/dashboard").get_data(as_text=True)
    assert '<label for="client_id">' in page and '<label for="client_secret">' in page
    with web.get("/app/static/kat.js") as static:  # static files are public
        assert static.status_code == 200

    r = web.post("/app/login", data={"client_id": "staff", "client_secret": "wrong"})
    assert r.status_code == 401 and "Unknown client or wrong secret." in r.get_data(as_text=True)
    assert "Set-Cookie" not in r.headers

    r = web.post(
        "/app/login",
        data={"client_id": "staff", "client_secret": "staff-secret", "next": "/app/dashboard"},
    )
    assert r.status_code == 303 and r.headers["Location"] == "/app/dashboard"
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith(f"{browser.COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    page = web.get("/app/dashboard")
    assert page.status_code == 200
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert "Signed in as <strong>staff</strong>" in page.get_data(as_text=True)


@pytest.mark.parametrize(
    "next_url", ["https://evil.example/x", "//evil.example/app/", "/fhir/Patient", "/app//x"]
)
def test_sign_in_never_redirects_off_the_pages(app: Flask, next_url: str) -> None:
    r = app.test_client().post(
        "/app/login", data={"client_id": "staff", "client_secret": "staff-secret", "next": next_url}
    )
    assert r.headers["Location"] == "/app/"


def test_the_session_calls_the_apis_as_its_client_with_csrf_for_writes(app: Flask) -> None:
    web, csrf = signed_in(app, "staff", "staff-secret")
    assert web.get("/fhir/Patient").status_code == 200  # the cookie alone, no bearer token
    patient = json.dumps({"resourceType": "Patient", "gender": "female"})
    ct = "application/fhir+json"
    r = web.post("/fhir/Patient", data=patient, content_type=ct)
    assert r.status_code == 403
    assert r.get_json()["issue"][0]["diagnostics"].startswith("cross-site request refused")
    r = web.post("/fhir/Patient", data=patient, content_type=ct, headers={"X-CSRF-Token": "x"})
    assert r.status_code == 403
    cross = {"X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"}
    assert web.post("/fhir/Patient", data=patient, content_type=ct, headers=cross).status_code == (
        403
    )
    other = {"X-CSRF-Token": csrf, "Origin": "https://evil.example"}
    assert web.post("/fhir/Patient", data=patient, content_type=ct, headers=other).status_code == (
        403
    )
    ok = {"X-CSRF-Token": csrf, "Sec-Fetch-Site": "same-origin", "Origin": "null"}
    assert web.post("/fhir/Patient", data=patient, content_type=ct, headers=ok).status_code == 201

    # The same role limits as the client's own tokens: a referrer reads only the Patients of
    # its own referrals (here none, ADR 0027), no Appointments, and no program team page.
    ref, _ = signed_in(app, "referrer", "referrer-secret")
    assert ref.get("/fhir/Patient").get_json()["total"] == 0
    assert ref.get("/fhir/Appointment").status_code == 403
    assert ref.get("/app/questionnaires/phq-9").status_code == 403


def test_a_session_ticket_is_no_bearer_token_and_a_bearer_token_no_session(app: Flask) -> None:
    web, _ = signed_in(app, "staff", "staff-secret")
    ticket = web.get_cookie(browser.COOKIE)
    assert ticket is not None
    bearer = app.test_client().get(
        "/fhir/Patient", headers={"Authorization": f"Bearer {ticket.value}"}
    )
    assert bearer.status_code == 401
    forged = app.test_client()
    forged.set_cookie(browser.COOKIE, token_for(app, "staff"))
    r = forged.get("/app/dashboard")
    assert r.status_code == 303  # back to sign-in, and the useless cookie is dropped
    assert f"{browser.COOKIE}=;" in r.headers["Set-Cookie"]
    forged.set_cookie(browser.COOKIE, token_for(app, "staff"))
    assert forged.get("/fhir/Patient").status_code == 401


def test_a_rotated_secret_or_removed_client_ends_its_sessions(app: Flask) -> None:
    state = app.extensions["fhir_kat"]
    web, _ = signed_in(app, "staff", "staff-secret")
    web2, _ = signed_in(app, "ha", "ha-secret")
    clients = state.clients.clients
    clients["staff"] = replace(clients["staff"], secret_hash=clients["admin"].secret_hash)
    assert web.get("/app/dashboard").status_code == 303
    del clients["ha"]
    assert web2.get("/fhir/Observation").status_code == 401


def test_sessions_expire_when_idle_and_slide_while_used(app: Flask) -> None:
    state = app.extensions["fhir_kat"]
    real = state.clock
    web, _ = signed_in(app, "staff", "staff-secret")
    try:
        start = real()
        state.clock = lambda: start + timedelta(seconds=browser.RENEW_AFTER_SECONDS + 1)
        r = web.get("/app/dashboard")
        assert r.status_code == 200 and browser.COOKIE in r.headers["Set-Cookie"]  # renewed
        state.clock = lambda: start + timedelta(seconds=browser.IDLE_SECONDS + 60)
        assert web.get("/app/dashboard").status_code == 200  # the renewed ticket still holds
        state.clock = lambda: start + timedelta(seconds=2 * browser.IDLE_SECONDS + 120)
        assert web.get("/app/dashboard").status_code == 303
    finally:
        state.clock = real


def test_sign_out_needs_the_csrf_token_and_clears_the_cookie(app: Flask) -> None:
    web, csrf = signed_in(app, "staff", "staff-secret")
    assert web.post("/app/logout").status_code == 403
    r = web.post("/app/logout", data={"csrf_token": csrf})
    assert r.status_code == 303 and f"{browser.COOKIE}=;" in r.headers["Set-Cookie"]
    assert web.get("/app/dashboard").status_code == 303


def test_sign_in_is_audited_and_logs_no_secret(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    web = app.test_client()
    web.post("/app/login", data={"client_id": "staff", "client_secret": "not-the-secret-x"})
    signed_in(app, "staff", "staff-secret")
    assert "not-the-secret-x" not in caplog.text and "staff-secret" not in caplog.text
    events = web.get(
        "/fhir/AuditEvent?_count=100",
        headers={"Authorization": f"Bearer {token_for(app, 'admin')}"},
    ).get_json()
    details = [
        e["resource"].get("outcomeDesc", "") + " " + json.dumps(e["resource"].get("entity", []))
        for e in events.get("entry", [])
    ]
    assert any("browser sign-in refused" in d for d in details), details
    assert any("browser sign-in" in d and "refused" not in d for d in details), details


def test_referral_form_follows_the_artifact_schema(app: Flask) -> None:
    web, _ = signed_in(app, "referrer", "referrer-secret")
    page = web.get("/app/referrals/new").get_data(as_text=True)
    # Required by the JSON Schema: marked and aria-required; optional ones are not.
    assert re.search(r'id="f-patient-phn"[^>]*pattern="9\\d\{9\}"[^>]*required', page)
    assert re.search(r'id="f-patient-contact-email"(?![^>]*required)[^>]*>', page)
    # Code lists come with the CodeSystem's displays.
    assert 'value="ptsd"> Post-traumatic stress disorder' in page
    # The referrer's organisation is filled in from its client registration.
    assert 'value="CLINIC-7"' in page
    assert page.count("<fieldset") >= 4 and page.count("<legend>") >= 4


def test_questionnaire_page_renders_the_services_questionnaire(app: Flask) -> None:
    web, _ = signed_in(app, "staff", "staff-secret")
    page = web.get("/app/questionnaires/phq-9?patient=p-1").get_data(as_text=True)
    assert page.count('class="question"') == 10  # nine items and the difficulty question
    assert 'data-url="https://fhir-kat.example.org/fhir/Questionnaire/phq-9"' in page
    assert 'data-code="LA6568-5"' in page and 'value="p-1"' in page
    assert "phq9-total" not in page.split("<form", 1)[1]  # the calculated total is not asked
    r = web.get("/app/questionnaires/unknown")
    assert r.status_code == 404 and "no such questionnaire page" in r.get_data(as_text=True)


@pytest.mark.parametrize("name", ["phq-9", "gad-7", "pcl-5", "b-ipf"])
def test_every_instrument_has_its_form(app: Flask, name: str) -> None:
    web, _ = signed_in(app, "staff", "staff-secret")
    questionnaire = web.get(f"/fhir/Questionnaire/{name}").get_json()
    asked = [
        i for i in questionnaire["item"] if not i.get("readOnly") and i.get("type") != "display"
    ]
    page = web.get(f"/app/questionnaires/{name}").get_data(as_text=True)
    assert page.count('class="question"') == len(asked)
    options = sum(len(i["answerOption"]) for i in asked)
    assert page.count('type="radio"') == options


def test_cookies_are_secure_behind_an_https_proxy(app: Flask) -> None:
    app.config["KAT_PUBLIC_BASE_URL"] = "https://kat.example.org/fhir"
    r = app.test_client().post(
        "/app/login", data={"client_id": "staff", "client_secret": "staff-secret"}
    )
    assert "Secure" in r.headers["Set-Cookie"]


def test_pages_follow_the_roles(app: Flask) -> None:
    staff, _ = signed_in(app, "staff", "staff-secret")
    ha, _ = signed_in(app, "ha", "ha-secret")
    referrer, _ = signed_in(app, "referrer", "referrer-secret")
    assert 'id="flags"' in staff.get("/app/dashboard").get_data(as_text=True)
    page = ha.get("/app/dashboard")
    assert page.status_code == 200 and 'id="flags"' not in page.get_data(as_text=True)
    assert "consented to sharing with your organisation" in page.get_data(as_text=True)
    refused = ha.get("/app/referrals/new")
    assert refused.status_code == 403
    assert "your role (health-authority) may not send referrals" in refused.get_data(as_text=True)
    assert referrer.get("/app/dashboard").status_code == 403
    assert referrer.get("/app/referrals/new").status_code == 200


# ---------------------------------------------------------------------------- workspace pages


def test_every_referral_state_and_safety_signal_has_words_for_people() -> None:
    """A new kat-referral-status code says what happens next; every Flag priority the safety
    rules can give (flag-priority-code) has its words and place in the safety inbox (which
    priority a kat-safety code gets is the safety rules' data: test_safety_rules.py)."""
    from fhir_kat.clinical.safety import PRIORITY_DISPLAY
    from fhir_kat.terminology import BASE, load_terminology
    from fhir_kat.web.wording import ACT_ON, NEXT_STEP, PRIORITY_WORDS

    systems = load_terminology().code_systems
    statuses = set(systems[f"{BASE}/CodeSystem/kat-referral-status"])
    assert set(NEXT_STEP) == statuses
    safety = set(systems[f"{BASE}/CodeSystem/kat-safety"])
    assert set(PRIORITY_WORDS) == set(PRIORITY_DISPLAY)
    assert sorted(int(w["rank"]) for w in PRIORITY_WORDS.values()) == [0, 1, 2, 3]
    assert set(ACT_ON) <= safety


@pytest.mark.parametrize(
    ("client_id", "secret", "allowed"),
    [
        (
            "staff",
            "staff-secret",
            {"/app/referrals", "/app/safety", "/app/worklist", "/app/participants/x"},
        ),
        ("referrer", "referrer-secret", {"/app/referrals"}),
        ("ha", "ha-secret", set()),
    ],
)
def test_the_workspace_pages_follow_the_role(
    app: Flask, client_id: str, secret: str, allowed: set[str]
) -> None:
    web, _ = signed_in(app, client_id, secret)
    for path in ("/app/referrals", "/app/safety", "/app/worklist", "/app/participants/x"):
        r = web.get(path)
        assert r.status_code == (200 if path in allowed else 403), (path, r.status_code)
        page = r.get_data(as_text=True)
        assert "<script" not in page or "static/" in page
    # The pages' own HTML carries no patient data: the scripts ask the API for it.
    page = web.get("/app/referrals").get_data(as_text=True) if "/app/referrals" in allowed else ""
    assert "Patient/" not in page


def test_the_referral_form_asks_no_uri_and_numbers_referrals_from_the_clinic(app: Flask) -> None:
    web, _ = signed_in(app, "referrer", "referrer-secret")
    page = web.get("/app/referrals/new").get_data(as_text=True)
    assert 'type="url"' not in page and "URI" not in page
    assert re.search(
        r'name="referral_identifier.system"[^>]*value="https://fhir-kat.example.org/fhir/sid/'
        r'referral-form/CLINIC-7"',
        page,
    ), "the numbering system is the signed-in clinic's"
    assert 'type="hidden" id="f-referrer-organization-identifier-value"' in page
    assert ">As soon as possible</option>" in page
    staff, _ = signed_in(app, "staff", "staff-secret")
    page = staff.get("/app/referrals/new").get_data(as_text=True)
    assert '<label for="f-referrer-organization-identifier-value">Clinic number' in page
