"""The referral form as a SMART App Launch 2.x app, driven by a real HTTP client against a live
test EHR on loopback (tests/smart/ehr.py: SEKMET holding the chart behind a gate that checks
tokens by introspection; oidc-provider issuing SMART launch context) and the service on
loopback: EHR and standalone launches, the prefill, the referral sent through the ordinary
route as the physician (audited by name), and every refusal — an unregistered ``iss``, a
tampered or replayed ``state``, a callback in another browser, a wrong PKCE verifier (the EHR's
authorization server refuses it), a declined consent, an expired launch, the EHR's FHIR server
down. The EHR's token never appears in a page, a cookie or a log line.

The same flow in chromium, with axe-core: tests/web/test_smart_browser.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.jwk import RSAKey
from sqlalchemy import update

from fhir_kat.security.sessions import browser_signins, smart_launches
from fhir_kat.security.smart import load_ehrs
from fhir_kat.settings import SettingsError
from fhir_kat.web import session as web_session
from tests.exchange.conftest import sekmet_bin  # noqa: F401  (the SEKMET install fixture)
from tests.smart.ehr import OTHER_PATIENT, PATIENT
from tests.smart.site import SmartSite, smart_site


@pytest.fixture
def site(
    tmp_path: Path,
    sekmet_bin: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
) -> Iterator[SmartSite]:
    """The service on both databases (sessions, sign-ins and sealed launches are rows)."""
    with smart_site(tmp_path, sekmet_bin, monkeypatch, database_url=database_url) as opened:
        yield opened


@dataclass
class Browser:
    """A requests session that remembers every answer the service gave it."""

    site: SmartSite
    http: requests.Session = field(default_factory=requests.Session)
    seen: list[requests.Response] = field(default_factory=list)

    def get(self, url: str, **kw: Any) -> requests.Response:
        r = self.http.get(url, allow_redirects=False, timeout=30, **kw)
        if url.startswith(self.site.url):
            self.seen.append(r)
        return r

    def post(self, url: str, **kw: Any) -> requests.Response:
        r = self.http.post(url, allow_redirects=False, timeout=30, **kw)
        if url.startswith(self.site.url):
            self.seen.append(r)
        return r

    def follow(self, r: requests.Response, until: str) -> requests.Response:
        """Follow redirects (at most 10) until one leads to ``until``; that URL's answer."""
        for _ in range(10):
            location = r.headers.get("Location", "")
            if not location:
                return r
            if location.startswith("/"):
                parts = urlsplit(r.url)
                location = f"{parts.scheme}://{parts.netloc}{location}"
            if location.startswith(until):
                return self.get(location)
            r = self.get(location)
        raise AssertionError("too many redirects")


def to_ehr(b: Browser, *, launch: str | None = "new", iss: str | None = None) -> requests.Response:
    """Open the launch URL as the EHR would; the answer that sends the browser to the EHR."""
    site = b.site
    iss = iss or site.ehr.fhir_base
    url = f"{site.url}/smart/launch?iss={quote(iss, safe='')}"
    if launch == "new":
        launch = site.ehr.new_launch(PATIENT)
    if launch is not None:
        url += f"&launch={quote(launch, safe='')}"
    return b.get(url)


def sign_in_at_ehr(
    b: Browser, r: requests.Response, *, action: str = "allow", patient: str | None = None
) -> str:
    """At the EHR: the sign-in page, the physician's credentials (and the patient, for a
    standalone launch); answers the callback URL the EHR redirects to (not yet followed)."""
    assert r.status_code == 303, r.text
    r = b.get(r.headers["Location"])
    interaction = r.headers["Location"]
    if interaction.startswith(b.site.url):
        return interaction  # signed in at the EHR already: straight back
    page = b.get(b.site.ehr.issuer + interaction)
    assert "Sign in at the EHR" in page.text
    form = {"username": "okafor", "password": "okafor-password", "action": action}
    if patient is not None:
        form["patient"] = patient
    r = b.post(b.site.ehr.issuer + interaction, data=form)
    for _ in range(10):
        location = r.headers["Location"]
        if location.startswith(b.site.url):
            return location
        r = b.get(location if location.startswith("http") else b.site.ehr.issuer + location)
    raise AssertionError("the EHR never redirected back")


def launch_form(b: Browser, **kw: Any) -> requests.Response:
    callback = sign_in_at_ehr(b, to_ehr(b, **{k: v for k, v in kw.items() if k == "launch"}))
    landed = b.get(callback)
    assert landed.status_code == 200, landed.text
    assert 'url=/smart/referral"' in landed.text
    return b.get(f"{b.site.url}/smart/referral")


def value_of(page: str, path: str) -> str:
    match = re.search(rf'name="{re.escape(path)}"[^>]*value="([^"]*)"', page)
    return unescape(match.group(1)) if match else ""


def csrf_of(page: str) -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]+)"', page)
    assert match
    return match.group(1)


def referral_from(page: str, number: str) -> dict[str, Any]:
    """What the form's script sends: the prefilled values, the conditions left ticked, and
    what the physician adds."""
    conditions = [
        {"system": unescape(s), "code": c, "display": unescape(d)}
        for c, s, d in re.findall(
            r'name="conditions" value="([^"]+)" data-system="([^"]+)" data-display="([^"]*)"',
            page,
        )
    ]
    return {
        "source_id": f"smart-{number}",
        "authored_on": "2026-12-08T09:30:00-08:00",
        "referral_identifier": {
            "system": value_of(page, "referral_identifier.system"),
            "value": number,
        },
        "patient": {
            "phn": value_of(page, "patient.phn"),
            "family_name": value_of(page, "patient.family_name"),
            "given_names": value_of(page, "patient.given_names").split(),
            "birth_date": value_of(page, "patient.birth_date"),
            "sex": "female",
            "contact": {"phone": value_of(page, "patient.contact.phone")},
        },
        "referrer": {
            "family_name": value_of(page, "referrer.family_name"),
            "given_names": value_of(page, "referrer.given_names").split(),
            "licence_number": value_of(page, "referrer.licence_number"),
            "organization": {
                "name": "Example Family Practice",
                "identifier": {
                    "system": value_of(page, "referrer.organization.identifier.system"),
                    "value": value_of(page, "referrer.organization.identifier.value"),
                },
            },
        },
        "reason": "PTSD after two SSRIs",
        "diagnoses": [{"code": "treatment-resistant-depression"}],
        "prior_treatment_failure": True,
        "conditions": conditions,
        "urgency": "routine",
    }


def send(b: Browser, page: str, number: str) -> requests.Response:
    return b.post(
        f"{b.site.url}/api/v1/referrals",
        json=referral_from(page, number),
        headers={web_session.CSRF_HEADER: csrf_of(page), "Sec-Fetch-Site": "same-origin"},
    )


def assert_token_never_shown(b: Browser, log: str) -> None:
    tokens = b.site.ehr.tokens_used
    assert tokens, "the service never used the EHR's token"
    for r in b.seen:
        exposed = r.text + " ".join(f"{k}: {v}" for k, v in r.headers.items())
        for token in tokens:
            assert token not in exposed, f"EHR token in the answer to {r.url}"
    for cookie in b.http.cookies:
        for token in tokens:
            assert token not in str(cookie.value)
    for token in tokens:
        assert token not in log


# ---------------------------------------------------------------------------- launches


def test_ehr_launch_prefills_the_form_and_the_referral_is_sent_as_the_physician(
    site: SmartSite, capfd: pytest.CaptureFixture[str]
) -> None:
    b = Browser(site)
    r = to_ehr(b)
    authorize = parse_qs(urlsplit(r.headers["Location"]).query)
    # SMART App Launch 2.x: code flow, PKCE S256, aud = iss, the EHR's launch, scope launch.
    assert authorize["response_type"] == ["code"]
    assert authorize["code_challenge_method"] == ["S256"]
    assert authorize["aud"] == [site.ehr.fhir_base]
    assert "launch" in authorize and "state" in authorize
    scopes = authorize["scope"][0].split()
    assert {"launch", "openid", "fhirUser", "patient/Condition.rs"} <= set(scopes)
    assert "launch/patient" not in scopes
    landed = b.get(sign_in_at_ehr(b, r))
    assert landed.status_code == 200
    assert b.http.cookies.get(web_session.COOKIE)
    page = b.get(f"{site.url}/smart/referral")
    assert page.status_code == 200, page.text
    html = page.text
    # Prefilled from the chart: the patient, the physician, a condition, the latest PHQ-9.
    assert value_of(html, "patient.family_name") == "Testcase"
    assert value_of(html, "patient.given_names") == "Avery"
    assert value_of(html, "patient.phn") == "9999999998"
    assert value_of(html, "patient.birth_date") == "1984-03-02"
    assert value_of(html, "referrer.family_name") == "Okafor"
    assert value_of(html, "referrer.licence_number") == "99001"
    assert 'value="47505003"' in html and "Posttraumatic stress disorder" in html
    assert "21897009" not in html  # a resolved condition is not offered as active
    assert "PHQ-9: 17 (2026-11-20)" in html and "GAD-7: 11 (2026-11-20)" in html
    assert "Sertraline 100 mg tablet" in html
    assert "Signed in as <strong>Dr Sam Okafor</strong> (referrer)" in html

    sent = send(b, html, "EMR-R-1")
    assert sent.status_code in (200, 201), sent.text
    task_id = next(
        e["response"]["location"].split("/")[1]
        for e in sent.json()["entry"]
        if e["response"]["location"].startswith("Task/")
    )
    task = site.api("GET", f"/fhir/Task/{task_id}").get_json()
    # Triaged by the program's rules: an eligible referral is received (intake can start).
    assert task["status"] == "received"
    assert task["requester"]
    # The EMR's coded condition went with the referral (the referral's Condition mapping).
    found = site.api("GET", "/fhir/Condition?code=http://snomed.info/sct|47505003").get_json()
    assert found["total"] == 1
    # The AuditEvent of the write names the physician (BALP: person + the app).
    created = [
        e
        for e in site.audit()
        if any(f"Task/{task_id}" in str(en.get("what")) for en in e.get("entity", []))
    ]
    assert created
    names = {a.get("who", {}).get("display") for e in created for a in e.get("agent", [])}
    assert "Dr Sam Okafor" in names
    # Sent: the launch and its token are gone (revoked at the EHR too); the form says so.
    assert all(not site.ehr._active(t) for t in site.ehr.tokens_used)
    with site.state().store.read(transaction=False) as tx:
        assert tx.conn.execute(smart_launches.select()).first() is None
    assert b.get(f"{site.url}/smart/referral").status_code == 410
    # No second copy of the chart anywhere: SEKMET's medication never reached the store.
    meds = site.api("GET", "/fhir/MedicationRequest").get_json()
    assert meds.get("total", 0) == 0
    assert_token_never_shown(b, capfd.readouterr().err)


def test_standalone_launch_takes_the_patient_picked_at_the_ehr(site: SmartSite) -> None:
    b = Browser(site)
    r = to_ehr(b, launch=None)
    scopes = parse_qs(urlsplit(r.headers["Location"]).query)["scope"][0].split()
    assert "launch/patient" in scopes and "launch" not in scopes
    b.get(sign_in_at_ehr(b, r, patient=OTHER_PATIENT))
    page = b.get(f"{site.url}/smart/referral")
    assert page.status_code == 200
    assert value_of(page.text, "patient.family_name") == "Sample"
    assert 'value="370143000"' in page.text
    assert "No PHQ-9, GAD-7 or PCL-5 totals in the chart." in page.text


def test_an_unregistered_iss_gets_a_refusal_page_and_no_redirect(site: SmartSite) -> None:
    b = Browser(site)
    for iss in ("https://evil.example.org/fhir", site.ehr.fhir_base + "/other", ""):
        r = to_ehr(b, iss=iss or " ", launch="abc")
        assert r.status_code == 400
        assert "This EMR is not registered" in r.text
        assert "Location" not in r.headers
    assert not site.ehr.fhir_requests  # nothing was asked of anyone


def test_a_tampered_state_and_a_replayed_callback_are_refused(site: SmartSite) -> None:
    b = Browser(site)
    callback = sign_in_at_ehr(b, to_ehr(b))
    tampered = re.sub(r"state=[^&]+", "state=forged", callback)
    r = b.get(tampered)
    assert r.status_code == 400 and "not valid any more" in r.text
    assert not b.http.cookies.get(web_session.COOKIE)
    # The real state was not used by the forgery? It was bound once: a fresh launch works,
    # and the original callback, once used, is refused the second time.
    b2 = Browser(site)
    callback = sign_in_at_ehr(b2, to_ehr(b2))
    assert b2.get(callback).status_code == 200
    again = b2.get(callback)
    assert again.status_code == 400


def test_a_launch_answered_after_ten_minutes_is_refused(site: SmartSite) -> None:
    b = Browser(site)
    callback = sign_in_at_ehr(b, to_ehr(b))
    site.clock.offset = timedelta(minutes=10, seconds=1)
    r = b.get(callback)
    assert r.status_code == 400 and "took too long" in r.text
    assert not b.http.cookies.get(web_session.COOKIE)


def test_a_launch_ends_the_session_the_browser_had(site: SmartSite) -> None:
    b = Browser(site)
    first = launch_form(b)
    assert first.status_code == 200
    old_cookie = b.http.cookies.get(web_session.COOKIE)
    assert launch_form(b).status_code == 200
    assert b.http.cookies.get(web_session.COOKIE) != old_cookie
    assert site.state().sessions.find(old_cookie, site.clock()) is None


def test_a_callback_in_another_browser_is_refused(site: SmartSite) -> None:
    b = Browser(site)
    callback = sign_in_at_ehr(b, to_ehr(b))
    other = Browser(site)  # no binding cookie: a login CSRF
    r = other.get(callback)
    assert r.status_code == 400
    assert not other.http.cookies.get(web_session.COOKIE)


def test_the_ehr_refuses_a_wrong_pkce_verifier(site: SmartSite) -> None:
    b = Browser(site)
    callback = sign_in_at_ehr(b, to_ehr(b))
    with site.state().store.write() as tx:  # the verifier this launch will send, changed
        tx.conn.execute(update(browser_signins).values(code_verifier="x" * 64))
    r = b.get(callback)
    assert r.status_code == 401
    assert "could not be completed" in r.text
    assert not b.http.cookies.get(web_session.COOKIE)
    assert not site.ehr.tokens_used


def test_consent_declined_at_the_ehr(site: SmartSite) -> None:
    b = Browser(site)
    callback = sign_in_at_ehr(b, to_ehr(b), action="deny")
    assert "error=access_denied" in callback
    r = b.get(callback)
    assert r.status_code == 403
    assert "declined" in r.text and "Nothing was read" in r.text
    assert not b.http.cookies.get(web_session.COOKIE)


def test_an_unknown_launch_is_refused_by_the_ehr(site: SmartSite) -> None:
    b = Browser(site)
    r = to_ehr(b, launch="no-such-launch")
    r = b.get(r.headers["Location"])  # the EHR answers the redirect URI with an error
    callback = r.headers["Location"]
    assert "error=invalid_request" in callback
    page = b.get(callback)
    assert page.status_code == 401 and "<h1>" in page.text


def test_the_ehr_fhir_server_down_gets_a_clear_page(
    site: SmartSite, capfd: pytest.CaptureFixture[str]
) -> None:
    b = Browser(site)
    b.get(sign_in_at_ehr(b, to_ehr(b)))
    site.ehr.fhir_down = True
    r = b.get(f"{site.url}/smart/referral")
    assert r.status_code == 502
    assert "cannot be read right now" in r.text
    site.ehr.fhir_down = False
    assert b.get(f"{site.url}/smart/referral").status_code == 200  # the launch is still live
    err = capfd.readouterr().err
    assert "Testcase" not in err and PATIENT not in err  # no PHI in the logs


def test_an_expired_launch_and_sign_out_forget_the_ehr_token(site: SmartSite) -> None:
    b = Browser(site)
    b.get(sign_in_at_ehr(b, to_ehr(b)))
    assert b.get(f"{site.url}/smart/referral").status_code == 200
    with site.state().store.write() as tx:  # the EHR token's lifetime is over
        tx.conn.execute(
            update(smart_launches).values(
                expires_at=datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=1)
            )
        )
    expired = b.get(f"{site.url}/smart/referral")
    assert expired.status_code == 410 and "This launch has ended" in expired.text
    with site.state().store.read(transaction=False) as tx:
        assert tx.conn.execute(smart_launches.select()).first() is None
    earlier = set(site.ehr.tokens_used)
    b2 = Browser(site)
    page = launch_form(b2)
    assert page.status_code == 200
    out = b2.post(
        f"{site.url}/app/logout",
        data={"csrf_token": csrf_of(page.text)},
        headers={"Sec-Fetch-Site": "same-origin"},
    )
    assert out.status_code == 303
    with site.state().store.read(transaction=False) as tx:
        assert tx.conn.execute(smart_launches.select()).first() is None
    second = site.ehr.tokens_used - earlier
    assert second and all(not site.ehr._active(t) for t in second)  # revoked at the EHR
    assert b2.get(f"{site.url}/smart/referral").status_code == 401


def test_the_sealed_launch_opens_only_with_the_sessions_cookie(site: SmartSite) -> None:
    b = Browser(site)
    b.get(sign_in_at_ehr(b, to_ehr(b)))
    cookie = b.http.cookies.get(web_session.COOKIE)
    with site.state().store.read(transaction=False) as tx:
        row = tx.conn.execute(smart_launches.select()).one()
    tokens = site.ehr.tokens_used or set()
    assert PATIENT not in row.sealed and all(t not in row.sealed for t in tokens)
    sessions = site.state().sessions
    assert sessions.open_launch(cookie, site.clock()) is not None
    assert sessions.open_launch(cookie[:-2] + "AA", site.clock()) is None


# ---------------------------------------------------------------------------- registrations


def test_registrations_are_checked_with_every_problem_at_once(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load_ehrs(
            {
                "ehrs": {
                    "Bad Name": {"iss": "http://emr.example.org/fhir", "client_secret": "x"},
                    "ok": {
                        "iss": "https://emr.example.org/fhir",
                        "client_id": "a",
                        "client_secret_env": "NOPE",
                        "scopes": ["launch"],
                        "organization": "CLINIC-7",
                    },
                }
            },
            {},
        )
    text = str(caught.value)
    for expected in (
        "[smart.ehrs.Bad Name]: the name must be",
        "iss must be an https URL",
        "client_id is required",
        "put the secret in client_secret_env or client_secret_file",
        "environment variable NOPE is not set",
        "scopes must include openid",
        "organization ('system|value'",
        "referrer_scopes",
    ):
        assert expected in text, expected
    ok = load_ehrs(
        {
            "ehrs": {
                "emr": {
                    "iss": "https://emr.example.org/fhir/",
                    "client_id": "a",
                    "client_secret_env": "S",
                    "organization": "https://x.example.org/org|C7",
                    "referrer_scopes": ["system/*.cruds"],
                }
            }
        },
        {"S": "s3cr3t-value-of-the-emr"},
    )["emr"]
    assert ok.iss == "https://emr.example.org/fhir" and ok.grant.role == "referrer"
    assert "s3cr3t-value-of-the-emr" not in repr(ok)


def test_private_key_jwt_client_authentication(
    tmp_path: Path,
    sekmet_bin: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_file = tmp_path / "smart-rs384.pem"
    key_file.write_bytes(pem)
    public = RSAKey.import_key(pem).as_dict(private=False)
    jwks = {"keys": [{**public, "kid": "kat-rs384", "alg": "RS384", "use": "sig"}]}
    with smart_site(tmp_path, sekmet_bin, monkeypatch, key_file=key_file, jwks=jwks) as site:
        b = Browser(site)
        page = launch_form(b)
        assert page.status_code == 200, page.text
        assert value_of(page.text, "patient.family_name") == "Testcase"
