"""People signing in through a real OpenID Provider, in a real browser.

The provider is panva's oidc-provider (OpenID Certified; tests/oidc/provider.mjs, pinned in
tools/hl7_packages.py) on loopback with synthetic users; the browser is Debian's chromium driven
by Playwright (as in test_browser.py). A nurse signs in and enters a PHQ-9, and the AuditEvents
name her; signing out ends the session on the server (a copied cookie stops working); idle and
absolute expiry follow the service clock; a group change at the provider applies at the next
sign-in; a tampered state, nonce, PKCE challenge or client, and a provider whose discovery names
another issuer, are refused. axe-core checks the sign-in page against WCAG 2.1 A and AA.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import requests
from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from fhir_kat.app import create_app
from fhir_kat.settings import Settings, load_settings
from fhir_kat.web import session as web_session
from tests.conftest import TEST_CLIENTS, client_as, token_for
from tests.oidc.idp import IdentityProvider
from tests.web.test_browser import STEP_MS, browser  # noqa: F401 (the shared browser fixture)
from tools.hl7_packages import ensure

with contextlib.suppress(ImportError):  # test_browser.py fails loudly without playwright
    from playwright.sync_api import Browser, BrowserContext, Page, expect

SECRET = "test-only-secret-of-the-web-pages-at-the-idp"
OTHER_SECRET = "test-only-secret-of-another-app-at-the-idp"
ROLES = {
    "kat-nurses": {"role": "program-staff", "scopes": ["system/*.cruds"]},
    "clinic7-referrers": {
        "role": "referrer",
        "organization": "https://fhir-kat.example.org/fhir/sid/organization|CLINIC-7",
        "scopes": ["system/*.cruds"],
    },
}
WCAG_21_AA = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]


@dataclass
class Site:
    app: Flask
    url: str
    idp: IdentityProvider
    browser: Browser
    contexts: list[Any]
    errors: list[str]

    def context(self, **options: Any) -> BrowserContext:
        context = self.browser.new_context(**options)
        context.set_default_timeout(STEP_MS)
        self.contexts.append(context)
        return context

    def page(self, context: BrowserContext | None = None) -> Page:
        page = (context or self.context()).new_page()
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        return page

    def sign_in(self, page: Page, username: str, path: str = "/app/", at_idp: bool = True) -> None:
        """Open ``path``; the pages send the person to sign-in, then to the provider."""
        page.goto(self.url + path)
        expect(page).to_have_url(re.compile(re.escape(self.url) + "/app/login"))
        page.get_by_role("link", name="Sign in with Clinic 7").click()
        if at_idp:
            page.get_by_label("Username").fill(username)
            page.get_by_label("Password").fill(self.idp.users[username]["password"])
            page.get_by_role("button", name="Sign in at the IdP").click()
        page.wait_for_url(self.url + path.split("?")[0] + "*")

    def state(self) -> Any:
        return self.app.extensions["fhir_kat"]

    def audit(self) -> list[dict[str, Any]]:
        bundle = (
            self.app.test_client()
            .get(
                "/fhir/AuditEvent?_count=500",
                headers={"Authorization": f"Bearer {token_for(self.app, 'admin')}"},
            )
            .get_json()
        )
        return [e["resource"] for e in bundle.get("entry", [])]


@pytest.fixture
def site(browser: Browser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:  # noqa: F811
    # The service's port must be known before the provider registers its redirect URIs, and
    # the provider's issuer before the service is configured: bind first, serve later.
    server: BaseWSGIServer = make_server("127.0.0.1", 0, _unavailable, threaded=True)
    url = f"http://127.0.0.1:{server.server_port}"
    redirect = [f"{url}/app/auth/clinic/callback", f"{url}/app/auth/mixup/callback"]
    clients = [
        {
            "client_id": "fhir-kat-web",
            "client_secret": SECRET,
            "redirect_uris": redirect,
            "grant_types": ["authorization_code"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "client_secret_basic",
        },
        {  # another application at the same provider (for the audience test)
            "client_id": "other-app",
            "client_secret": OTHER_SECRET,
            "redirect_uris": redirect,
            "grant_types": ["authorization_code"],
            "response_types": ["code"],
        },
    ]
    monkeypatch.setenv("KAT_TEST_IDP_SECRET", SECRET)
    with IdentityProvider(clients) as idp:
        common = {
            "client_id": "fhir-kat-web",
            "client_secret_env": "KAT_TEST_IDP_SECRET",
            "scopes": ["openid", "profile", "email", "groups"],
            "roles": ROLES,
        }
        port = urlsplit(idp.issuer).port
        providers = {
            "clinic": {"title": "Clinic 7", "issuer": idp.issuer, **common},
            # The same provider under another name for its host: its discovery document names
            # http://127.0.0.1:…, not this issuer, so it must not be used.
            "mixup": {"title": "Mix-up", "issuer": f"http://localhost:{port}", **common},
        }
        base = load_settings(
            {}, database_url=f"sqlite:///{tmp_path / 'web.sqlite3'}", data_dir=str(tmp_path / "v")
        )
        settings: Settings = replace(base, extra={"clients": TEST_CLIENTS, "oidc": providers})
        app = create_app(settings)
        server.app = app  # type: ignore[attr-defined]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        opened = Site(app, url, idp, browser, [], [])
        try:
            yield opened
        finally:
            for context in opened.contexts:
                context.close()
            server.shutdown()
            thread.join(timeout=10)
            app.extensions["fhir_kat"].export.shutdown()
            app.extensions["fhir_kat"].store.dispose()
    assert not opened.errors, f"script errors on the pages: {opened.errors}"


def _unavailable(_environ: Any, start_response: Callable[..., Any]) -> list[bytes]:
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"starting"]


def cookie_of(context: BrowserContext) -> str:
    return next(c["value"] for c in context.cookies() if c["name"] == web_session.COOKIE)


# ---------------------------------------------------------------------------- signing in


def test_a_nurse_signs_in_at_her_provider_and_her_actions_are_audited_with_her_name(
    site: Site,
) -> None:
    patient = (
        client_as(site.app, "staff")
        .post("/fhir/Patient", json={"resourceType": "Patient"})
        .get_json()["id"]
    )
    page = site.page()
    page.goto(site.url + "/")  # a browser on the root lands on the sign-in page
    expect(page).to_have_url(site.url + "/app/login?next=/app/")
    expect(page.get_by_role("link", name="Sign in with Clinic 7")).to_be_visible()
    expect(page.locator("#client_secret")).to_have_count(0)  # the dev form is off here
    path = f"/app/questionnaires/phq-9?patient={patient}"
    site.sign_in(page, "dana", path)
    expect(page.locator("header")).to_contain_text("Signed in as Dana Rivera (program-staff)")
    answers = [0, 1, 0, 1, 0, 0, 1, 0, 0]
    for i, choice in enumerate(answers, start=1):
        page.locator(f"#q-phq9-{i} input[type=radio]").nth(choice).check()
    page.get_by_role("group", name="If you checked off any problems").get_by_label(
        "Not difficult at all"
    ).check()
    page.get_by_role("button", name="Submit answers").click()
    expect(page.locator("#total-score")).to_have_attribute("data-value", str(sum(answers)))
    qr_id = page.locator("#saved-as").get_attribute("data-id")

    events = site.audit()
    created = [
        e
        for e in events
        if e["action"] == "C" and f"QuestionnaireResponse/{qr_id}" in json.dumps(e["entity"])
    ]
    assert len(created) == 1, [e.get("outcomeDesc") for e in events]
    user, application = created[0]["agent"]
    assert user["who"] == {
        "identifier": {"system": site.idp.issuer, "value": "u-1001"},
        "display": "Dana Rivera",
    }
    assert user["requestor"] is True and user["type"]["coding"][0]["code"] == "AUT"
    assert application["who"]["identifier"]["value"] == "oidc:clinic"
    assert application["requestor"] is False and application["network"]["address"]
    sign_in = [e for e in events if e.get("outcomeDesc") == "browser sign-in"]
    assert [e["agent"][0]["who"]["display"] for e in sign_in] == ["Dana Rivera"]
    # Every request of hers is hers: nothing she did is audited as the bare application.
    hers = [
        e
        for e in events
        if e["agent"][-1]["who"].get("identifier", {}).get("value") == "oidc:clinic"
    ]
    assert hers and all(e["agent"][0]["who"].get("display") == "Dana Rivera" for e in hers)


def test_sign_out_ends_the_session_on_the_server_and_a_copied_cookie_stops_working(
    site: Site,
) -> None:
    context = site.context()
    page = site.page(context)
    site.sign_in(page, "dana", "/app/dashboard")
    cookie = cookie_of(context)
    thief = site.context()
    thief.add_cookies(
        [{"name": web_session.COOKIE, "value": cookie, "url": site.url, "httpOnly": True}]
    )
    stolen = site.page(thief)
    stolen.goto(site.url + "/app/dashboard")
    expect(stolen).to_have_url(site.url + "/app/dashboard")  # a copy works while signed in
    api = {"Cookie": f"{web_session.COOKIE}={cookie}"}
    assert requests.get(site.url + "/fhir/Patient", headers=api, timeout=10).status_code == 200

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(re.escape(site.url) + "/app/login"))
    stolen.goto(site.url + "/app/dashboard")
    expect(stolen).to_have_url(re.compile(re.escape(site.url) + "/app/login"))
    assert requests.get(site.url + "/fhir/Patient", headers=api, timeout=10).status_code == 401
    assert "browser sign-out" in [e.get("outcomeDesc") for e in site.audit()]


def test_idle_and_absolute_expiry_follow_the_service_clock(site: Site) -> None:
    state = site.state()
    real, idle = state.clock, state.settings.session_idle_seconds
    page = site.page()
    site.sign_in(page, "dana", "/app/dashboard")
    start = real()
    try:
        state.clock = lambda: start + timedelta(seconds=idle + 1)
        page.reload()
        expect(page).to_have_url(re.compile(re.escape(site.url) + "/app/login"))

        state.clock = real
        site.sign_in(page, "dana", "/app/dashboard", at_idp=False)  # the IdP remembers her
        start = real()
        absolute = state.settings.session_absolute_seconds
        step = idle - 120
        for n in range(1, absolute // step):  # busy all day: never idle for long
            state.clock = lambda n=n: start + timedelta(seconds=n * step)  # type: ignore[misc]
            page.reload()
            expect(page).to_have_url(site.url + "/app/dashboard")
        state.clock = lambda: start + timedelta(seconds=absolute + 1)
        page.reload()
        expect(page).to_have_url(re.compile(re.escape(site.url) + "/app/login"))
    finally:
        state.clock = real


def test_a_group_change_at_the_provider_applies_at_the_next_sign_in(site: Site) -> None:
    page = site.page()
    site.sign_in(page, "dana", "/app/dashboard")
    expect(page.locator("header")).to_contain_text("(program-staff)")
    site.idp.set_groups("dana", ["clinic7-referrers"])  # moved at the IdP
    page.reload()
    expect(page.locator("header")).to_contain_text("(program-staff)")  # this session stays
    page.get_by_role("button", name="Sign out").click()
    site.sign_in(page, "dana", "/app/referrals/new", at_idp=False)
    expect(page.locator("header")).to_contain_text("Signed in as Dana Rivera (referrer)")
    page.goto(site.url + "/app/dashboard")
    expect(page.locator("h1")).to_have_text("Not allowed")  # a referrer's page rights now

    site.idp.set_groups("dana", ["unrelated-group"])  # and then out of the program's groups
    page.goto(site.url + "/app/")
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("link", name="Sign in with Clinic 7").click()
    expect(page.get_by_role("alert")).to_contain_text("not given a role in this service")
    assert web_session.COOKIE not in [c["name"] for c in page.context.cookies()]


# ---------------------------------------------------------------------------- refusals


def _rewrite(context: BrowserContext, site: Site, change: dict[str, str]) -> None:
    """Change parameters of the authorization request on its way to the provider (an
    attacker in the middle): the service's redirect to the provider is answered as sent, with
    its ``Location`` changed. (A redirect's next hop is not routable in Playwright, so the
    hop that names the provider's URL is the one rewritten; the provider echoes ``state``
    back unchanged, so a changed ``state`` is what a forged callback carries.)"""

    def handler(route: Any) -> None:
        response = route.fetch(max_redirects=0)
        parts = urlsplit(response.headers["location"])
        query = dict(parse_qsl(parts.query))
        query.update(change)
        location = parts._replace(query=urlencode(query)).geturl()
        route.fulfill(response=response, headers={**response.headers, "location": location})

    context.route(re.compile("^" + re.escape(site.url) + "/app/login/clinic"), handler)


@pytest.mark.parametrize(
    ("where", "change", "reason"),
    [
        ("state", {"state": "forged-state"}, "state unknown, used, expired"),
        ("nonce", {"nonce": "nonce-of-another-sign-in"}, "ID token refused (nonce)"),
        ("pkce", {"code_challenge": "A" * 43}, "token request refused (invalid_grant)"),
        # A code issued to another application (another audience) is not this service's.
        ("audience", {"client_id": "other-app"}, "token request refused (invalid_grant)"),
    ],
)
def test_a_tampered_sign_in_is_refused(
    site: Site, where: str, change: dict[str, str], reason: str
) -> None:
    context = site.context()
    _rewrite(context, site, change)
    page = site.page(context)
    page.goto(site.url + "/app/dashboard")
    page.get_by_role("link", name="Sign in with Clinic 7").click()
    page.get_by_label("Username").fill("dana")
    page.get_by_label("Password").fill(site.idp.users["dana"]["password"])
    page.get_by_role("button", name="Sign in at the IdP").click()
    expect(page.get_by_role("alert")).to_contain_text("Please")
    expect(page.locator("h1")).to_have_text("Sign in")
    assert web_session.COOKIE not in [c["name"] for c in context.cookies()]
    details = [e.get("outcomeDesc", "") for e in site.audit()]
    assert any(reason in d for d in details), details


def test_a_provider_whose_discovery_names_another_issuer_is_not_used(site: Site) -> None:
    page = site.page()
    page.goto(site.url + "/app/login")
    page.get_by_role("link", name="Sign in with Mix-up").click()
    expect(page.get_by_role("alert")).to_contain_text("cannot be used for sign-in right now")
    assert page.url.startswith(site.url)  # the browser never went to the provider


# ---------------------------------------------------------------------------- accessibility


def _axe(site: Site, page: Page) -> list[dict[str, Any]]:
    page.add_script_tag(path=str(ensure("axe-core") / "axe.min.js"))
    result: dict[str, Any] = page.evaluate(
        "tags => axe.run(document, {runOnly: {type: 'tag', values: tags}})", WCAG_21_AA
    )
    return [
        {"id": v["id"], "nodes": [n["target"] for n in v["nodes"]]} for v in result["violations"]
    ]


def test_the_sign_in_pages_have_no_wcag_21_aa_violations(site: Site) -> None:
    # axe is injected as a script: the pages' CSP (no inline script) is bypassed for it alone.
    context = site.context(bypass_csp=True)
    page = site.page(context)
    page.goto(site.url + "/app/login?next=/app/dashboard")
    assert _axe(site, page) == []
    page.get_by_role("link", name="Sign in with Mix-up").click()  # the page with an error
    expect(page.get_by_role("alert")).to_be_visible()
    assert _axe(site, page) == []
    state = site.state()
    state.settings = replace(state.settings, client_sign_in="on")  # with the dev form
    page.goto(site.url + "/app/login")
    expect(page.get_by_text("For local development only.")).to_be_visible()
    assert _axe(site, page) == []
    page.get_by_label("Client id").fill("staff")
    page.get_by_label("Secret").fill("wrong")
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text("Unknown client or wrong secret.")
    assert _axe(site, page) == []
    # The page a person sees for a moment after the provider sent them back.
    interstitial = site.page(context)
    # The same-site navigation it starts answers 204 here, so the page stays to be checked.
    interstitial.route(
        re.compile("^" + re.escape(site.url) + "/app/referrals/new"),
        lambda route: route.fulfill(status=204),
    )
    interstitial.goto(site.url + "/app/login?next=/app/referrals/new")
    interstitial.get_by_role("link", name="Sign in with Clinic 7").click()
    interstitial.get_by_label("Username").fill("sam")
    interstitial.get_by_label("Password").fill(site.idp.users["sam"]["password"])
    interstitial.get_by_role("button", name="Sign in at the IdP").click()
    expect(interstitial.locator("h1")).to_have_text("Signed in")
    assert _axe(site, interstitial) == []


def test_a_physician_signs_in_at_the_provider_refers_and_sees_it_in_my_referrals(
    site: Site,
) -> None:
    from tests.web.test_workspace import assert_form_asks_no_uri, fill_referral_form, phn

    page = site.page()
    site.sign_in(page, "sam", "/app/referrals/new")
    expect(page.locator("form.signout")).to_contain_text("Dr Sam Okafor")
    assert_form_asks_no_uri(page)
    fill_referral_form(page, "R-OIDC-1", phn(61))
    page.get_by_role("button", name="Send referral").click()
    page.wait_for_url("**/app/referrals/*?submitted=1")
    # The physician's own referral names its patient (ADR 0027).
    expect(page.locator("#referral-title")).to_have_text(
        f"Referral R-OIDC-1 — Robin Formfilled, PHN {phn(61)}"
    )
    page.get_by_role("link", name="Back to my referrals").click()
    row = page.locator("#referrals tbody tr")
    expect(row).to_have_count(1)
    expect(row.first).to_contain_text("R-OIDC-1")
    expect(row.first).to_contain_text("Robin Formfilled")
    # The AuditEvent of the referral names the physician (BALP).
    creates = [
        e
        for e in site.audit()
        if e.get("action") == "C" and any("Okafor" in str(a.get("who")) for a in e["agent"])
    ]
    assert creates, "the referral's AuditEvent names the physician"
