"""Signing people in through an OpenID Provider, without a browser: the callback handling
(state, PKCE, nonce) and the ID token's validation against a provider simulated with
``responses`` (so that every way a token can be wrong is produced on purpose), the role
mapping, server-side sessions (sign-out, idle and absolute expiry on the service clock, a
changed mapping), what a person may do (exactly its role's rules) and how its actions are
audited (IHE BALP: the person as requestor, the web pages as the application).

The real provider (oidc-provider in Node.js) and a real browser: tests/web/test_oidc_browser.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet, OctKey, RSAKey

from fhir_kat.app import create_app
from fhir_kat.security.oidc import RoleGrant
from fhir_kat.security.scopes import parse_scopes
from fhir_kat.settings import Settings
from fhir_kat.web import session as browser
from tests.conftest import CLINIC_ORG, TEST_CLIENTS, client_as, token_for

ISSUER = "https://idp.clinic7.example.org/realms/staff"
CLIENT_ID = "fhir-kat-web"
SECRET = "test-only-secret-of-the-web-pages-registration"
KEY = RSAKey.generate_key(2048, parameters={"kid": "key-1", "alg": "RS256", "use": "sig"})
STRANGER = RSAKey.generate_key(2048, parameters={"kid": "key-1", "alg": "RS256", "use": "sig"})
PROVIDERS = {
    "clinic": {
        "title": "Clinic 7",
        "issuer": ISSUER,
        "client_id": CLIENT_ID,
        "client_secret_env": "KAT_TEST_CLINIC_OIDC_SECRET",
        "scopes": ["openid", "profile", "groups"],
        "roles": {
            "kat-nurses": {"role": "program-staff", "scopes": ["system/*.cruds"]},
            "clinic7-referrers": {
                "role": "referrer",
                "organization": CLINIC_ORG,
                "scopes": ["system/*.cruds"],
            },
        },
    }
}


class FakeProvider:
    """The provider's endpoints as ``responses`` callbacks; each test bends one answer."""

    def __init__(self, rsps: responses.RequestsMock) -> None:
        self.authorized: dict[str, str] = {}
        self.token_requests: list[dict[str, str]] = []
        self.token_auth: list[str] = []
        self.claims: dict[str, Any] = {}  # overrides of the ID token's claims
        self.header: dict[str, Any] = {}  # overrides of its JOSE header
        self.key: Any = KEY
        self.sign: Any = None  # (header, claims) -> a hand-built token instead of a signed one
        self.userinfo: dict[str, Any] = {"sub": "u-1001", "name": "Dana Rivera"}
        self.groups: list[str] = ["kat-nurses"]
        self.metadata: dict[str, Any] = {
            "issuer": ISSUER,
            "authorization_endpoint": f"{ISSUER}/protocol/openid-connect/auth",
            "token_endpoint": f"{ISSUER}/protocol/openid-connect/token",
            "userinfo_endpoint": f"{ISSUER}/protocol/openid-connect/userinfo",
            "jwks_uri": f"{ISSUER}/protocol/openid-connect/certs",
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "authorization_response_iss_parameter_supported": True,
        }
        rsps.add_callback(
            responses.GET,
            f"{ISSUER}/.well-known/openid-configuration",
            callback=lambda _r: (200, {}, json.dumps(self.metadata)),
        )
        rsps.add_callback(
            responses.GET,
            self.metadata["jwks_uri"],
            callback=lambda _r: (200, {}, json.dumps(KeySet([KEY]).as_dict(private=False))),
        )
        rsps.add_callback(responses.POST, self.metadata["token_endpoint"], callback=self._token)
        rsps.add_callback(
            responses.GET,
            self.metadata["userinfo_endpoint"],
            callback=lambda _r: (200, {}, json.dumps({**self.userinfo, "groups": self.groups})),
        )

    def _token(self, request: Any) -> tuple[int, dict[str, str], str]:
        body = dict(parse_qsl(request.body))
        self.token_requests.append(body)
        self.token_auth.append(request.headers.get("Authorization", ""))
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": "u-1001",
            "aud": CLIENT_ID,
            "exp": now + 300,
            "iat": now,
            "nonce": self.authorized.get("nonce", ""),
            **self.claims,
        }
        claims = {k: v for k, v in claims.items() if v is not None}
        header = {"alg": "RS256", "kid": "key-1", **self.header}
        if self.sign is not None:
            id_token = self.sign(header, claims)
        else:
            id_token = jose_jwt.encode(header, claims, self.key)
        answer = {"access_token": "at-1", "token_type": "Bearer", "id_token": id_token}
        return 200, {"Content-Type": "application/json"}, json.dumps(answer)


@pytest.fixture
def idp() -> Iterator[FakeProvider]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield FakeProvider(rsps)


@pytest.fixture
def settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("KAT_TEST_CLINIC_OIDC_SECRET", SECRET)
    return replace(settings, extra={"clients": TEST_CLIENTS, "oidc": PROVIDERS})


def begin(web: FlaskClient, idp: FakeProvider, next_path: str = "/app/dashboard") -> dict[str, str]:
    r = web.get(f"/app/login/clinic?next={next_path}")
    assert r.status_code == 303, r.data[:300]
    location = r.headers["Location"]
    assert location.startswith(idp.metadata["authorization_endpoint"] + "?")
    query = dict(parse_qsl(urlsplit(location).query))
    idp.authorized = query
    return query


def finish(web: FlaskClient, query: dict[str, str], **params: str) -> Any:
    answer = {"code": "code-1", "state": query["state"], "iss": ISSUER, **params}
    answer = {k: v for k, v in answer.items() if v}
    return web.get("/app/auth/clinic/callback?" + urlencode(answer))


def sign_in(app: Flask, idp: FakeProvider) -> tuple[FlaskClient, str]:
    web = app.test_client()
    r = finish(web, begin(web, idp))
    assert r.status_code == 200, r.get_data(as_text=True)[:500]
    page = web.get("/app/").get_data(as_text=True)
    csrf = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
    assert csrf
    return web, csrf.group(1)


def refused(r: Any, status: int = 401) -> str:
    text: str = r.get_data(as_text=True)
    assert r.status_code == status, text[:500]
    assert browser.COOKIE not in r.headers.get("Set-Cookie", "").split("=")[0]
    return text


def audit_details(app: Flask) -> list[dict[str, Any]]:
    bundle = (
        app.test_client()
        .get(
            "/fhir/AuditEvent?_count=200",
            headers={"Authorization": f"Bearer {token_for(app, 'admin')}"},
        )
        .get_json()
    )
    return [e["resource"] for e in bundle.get("entry", [])]


# ---------------------------------------------------------------------------- the happy path


def test_authorization_request_uses_pkce_s256_a_nonce_and_state(
    app: Flask, idp: FakeProvider
) -> None:
    web = app.test_client()
    query = begin(web, idp)
    assert query["response_type"] == "code" and query["client_id"] == CLIENT_ID
    assert query["redirect_uri"] == "http://localhost/app/auth/clinic/callback"
    assert query["scope"] == "openid profile groups"
    assert query["code_challenge_method"] == "S256"
    assert len(query["state"]) >= 43 and len(query["nonce"]) >= 43
    assert query["state"] != query["nonce"]
    cookie = web.get_cookie(browser.SIGNIN_COOKIE, path=browser.SIGNIN_COOKIE_PATH)
    assert cookie is not None and cookie.http_only and cookie.same_site == "Lax"
    # A second sign-in in the same browser starts afresh: new state, nonce and challenge
    # (and the first can no longer be finished: the browser holds the newer one's binding).
    first, query = query, begin(web, idp)
    assert {query[k] for k in ("state", "nonce", "code_challenge")}.isdisjoint(
        {first[k] for k in ("state", "nonce", "code_challenge")}
    )

    r = finish(web, query)
    assert r.status_code == 200, r.get_data(as_text=True)[:500]
    sent = idp.token_requests[-1]
    assert sent["grant_type"] == "authorization_code" and sent["code"] == "code-1"
    assert sent["redirect_uri"] == query["redirect_uri"]
    challenge = base64.urlsafe_b64encode(hashlib.sha256(sent["code_verifier"].encode()).digest())
    assert challenge.decode().rstrip("=") == query["code_challenge"]  # RFC 7636 S256
    basic = base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode()
    assert idp.token_auth[-1] == f"Basic {basic}"  # client_secret_basic
    page = r.get_data(as_text=True)
    assert 'http-equiv="refresh" content="0; url=/app/dashboard"' in page
    assert "Dana Rivera" in page
    cookie = web.get_cookie(browser.COOKIE)
    assert cookie is not None and cookie.http_only and cookie.same_site == "Strict"
    dashboard = web.get("/app/dashboard")
    assert dashboard.status_code == 200
    assert "Signed in as <strong>Dana Rivera</strong> (program-staff)" in dashboard.get_data(
        as_text=True
    )


def test_a_person_acts_with_exactly_its_roles_rules_and_is_named_in_the_audit(
    app: Flask, idp: FakeProvider
) -> None:
    web, csrf = sign_in(app, idp)
    r = web.post(
        "/fhir/Patient",
        json={"resourceType": "Patient", "gender": "female"},
        headers={"X-CSRF-Token": csrf, "Sec-Fetch-Site": "same-origin"},
    )
    assert r.status_code == 201, r.get_data(as_text=True)
    patient = r.get_json()["id"]
    assert web.get(f"/fhir/Patient/{patient}").status_code == 200
    assert client_as(app, "staff").get("/fhir/Patient").status_code == 200  # not a person

    events = audit_details(app)
    reads = [e for e in events if e["action"] == "R" and f"Patient/{patient}" in json.dumps(e)]
    assert reads, events
    user, app_agent = reads[0]["agent"]
    assert user["who"]["identifier"] == {"system": ISSUER, "value": "u-1001"}
    assert user["who"]["display"] == "Dana Rivera" and user["name"] == "Dana Rivera"
    assert user["requestor"] is True
    assert user["type"]["coding"][0]["code"] == "IRCP"
    assert user["role"] == [{"text": "program-staff"}]
    assert user["policy"][0].startswith("urn:ietf:params:oauth:jti:")
    assert "network" not in user  # BALP: users are not network devices
    assert app_agent["requestor"] is False
    assert app_agent["who"]["identifier"] == {
        "system": "urn:fhir-kat:client-id",
        "value": "oidc:clinic",
    }
    assert app_agent["type"]["coding"][0]["code"] == "110150"
    creates = [e for e in events if e["action"] == "C" and "Patient/" in json.dumps(e)]
    assert creates and creates[0]["agent"][0]["type"]["coding"][0]["code"] == "AUT"
    sign_ins = [e for e in events if e.get("outcomeDesc") == "browser sign-in"]
    assert sign_ins and sign_ins[0]["agent"][0]["who"]["identifier"]["value"] == "u-1001"
    # Searchable by the person's name (R4 AuditEvent agent-name).
    admin = {
        "Authorization": f"Bearer {token_for(app, 'admin')}",
        "Prefer": "handling=strict",
    }
    named = app.test_client().get("/fhir/AuditEvent?agent-name=Dana", headers=admin).get_json()
    assert len(named["entry"]) >= 3
    assert all(e["resource"]["agent"][0]["name"] == "Dana Rivera" for e in named["entry"])
    assert len(named["entry"]) < len(events)


def test_a_referrer_person_gets_no_more_than_a_referrer_client(
    app: Flask, idp: FakeProvider
) -> None:
    idp.groups = ["clinic7-referrers"]
    web, _ = sign_in(app, idp)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token_for(app, 'referrer')}"
    for path in (
        "/fhir/Observation",
        "/fhir/Appointment",
        "/app/questionnaires/phq-9",
        "/app/dashboard",
    ):
        assert web.get(path).status_code == client.get(path).status_code == 403, path
    # Patients: only those of the clinic's own referrals (ADR 0027), as for its client.
    assert web.get("/fhir/Patient").get_json() | {"id": ""} == client.get(
        "/fhir/Patient"
    ).get_json() | {"id": ""}
    assert web.get("/app/referrals/new").status_code == 200
    assert 'value="CLINIC-7"' in web.get("/app/referrals/new").get_data(as_text=True)


def test_a_person_creates_no_subscription(app: Flask, idp: FakeProvider) -> None:
    idp.groups = ["clinic7-referrers"]  # referrers' clients may create Subscriptions
    web, csrf = sign_in(app, idp)
    r = web.post(
        "/fhir/Subscription",
        json={
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "test",
            "criteria": "Observation?code=http://loinc.org|44261-6",
            "channel": {"type": "rest-hook", "endpoint": "https://emr.example.org/hook"},
        },
        headers={"X-CSRF-Token": csrf, "Sec-Fetch-Site": "same-origin"},
    )
    assert r.status_code == 403, r.get_data(as_text=True)
    assert "registered client, not a person" in r.get_data(as_text=True)


# ---------------------------------------------------------------------------- refusals


def test_state_must_be_this_browsers_unused_and_recent(app: Flask, idp: FakeProvider) -> None:
    web = app.test_client()
    query = begin(web, idp)
    # A made-up state, or a real one replayed from another browser (login CSRF), is refused.
    refused(finish(web, {**query, "state": "made-up"}), 400)
    other = app.test_client()
    text = refused(finish(other, query), 400)
    assert "not valid any more" in text
    # Used up by that attempt: even the right browser cannot finish it now.
    refused(finish(web, query), 400)
    # A fresh one works once; replaying the same callback is refused.
    query = begin(web, idp)
    assert finish(web, query).status_code == 200
    refused(finish(web, query), 400)
    # One older than ten minutes (service clock) is refused.
    state = app.extensions["fhir_kat"]
    query = begin(web, idp)
    real = state.clock
    start = real()
    state.clock = lambda: start + timedelta(minutes=11)
    try:
        refused(finish(web, query), 400)
    finally:
        state.clock = real
    assert len(idp.token_requests) == 1  # no refused callback reached the token endpoint
    details = [e.get("outcomeDesc", "") for e in audit_details(app)]
    assert (
        details.count(
            "browser sign-in refused: state unknown, used, expired or begun in another browser"
        )
        == 5
    )


def test_a_callback_on_another_providers_path_is_refused(app: Flask, idp: FakeProvider) -> None:
    web = app.test_client()
    query = begin(web, idp)
    r = web.get("/app/auth/other/callback?" + urlencode({"code": "c", "state": query["state"]}))
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("claims", "header", "reason"),
    [
        ({"iss": "https://idp.evil.example.org"}, {}, "ID token refused (iss)"),
        ({"aud": "another-app"}, {}, "ID token refused (aud)"),
        (
            {"aud": [CLIENT_ID, "another-app"], "azp": CLIENT_ID},
            {},
            "ID token refused (aud names other parties)",
        ),
        ({"azp": "another-app"}, {}, "ID token refused (azp)"),
        ({"nonce": "replayed-nonce"}, {}, "ID token refused (nonce)"),
        ({"nonce": None}, {}, "ID token refused (nonce)"),
        ({"exp": int(time.time()) - 120}, {}, "ID token refused (exp)"),
        ({"iat": int(time.time()) - 3600}, {}, "ID token refused (iat not recent)"),
        ({"sub": None}, {}, "ID token refused (sub)"),
        ({"at_hash": "AAAAAAAAAAAAAAAAAAAAAA"}, {}, "ID token refused (at_hash)"),
        ({}, {"kid": "key-2"}, "ID token refused"),
    ],
)
def test_an_id_token_that_is_wrong_in_any_way_is_refused(
    app: Flask, idp: FakeProvider, claims: dict[str, Any], header: dict[str, Any], reason: str
) -> None:
    idp.claims, idp.header = claims, header
    web = app.test_client()
    text = refused(finish(web, begin(web, idp)))
    assert "could not be completed" in text
    assert web.get("/app/dashboard").status_code == 303  # no session
    details = [e.get("outcomeDesc", "") for e in audit_details(app)]
    assert any(d.startswith(f"browser sign-in refused: {reason}") for d in details), details


def test_signatures_by_another_key_hmac_or_none_are_refused(app: Flask, idp: FakeProvider) -> None:
    for key, header in (
        (STRANGER, {}),  # the right kid, the wrong key: a forged token
        (OctKey.import_key(SECRET.encode()), {"alg": "HS256"}),  # MAC with the client secret
    ):
        idp.key, idp.header = key, header
        web = app.test_client()
        refused(finish(web, begin(web, idp)))

    def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
        # alg "none", built by hand (no library signs with "none").
        parts = ({**header, "alg": "none"}, claims)
        encoded = [
            base64.urlsafe_b64encode(json.dumps(p).encode()).decode().rstrip("=") for p in parts
        ]
        return ".".join(encoded) + "."

    idp.sign = unsigned
    web = app.test_client()
    refused(finish(web, begin(web, idp)))
    assert web.get("/app/dashboard").status_code == 303
    assert len(idp.token_requests) == 3


def test_answers_from_another_issuer_or_with_errors_are_refused(
    app: Flask, idp: FakeProvider
) -> None:
    web = app.test_client()
    # RFC 9207: the authorization response names its issuer; another one is a mix-up.
    refused(finish(web, begin(web, idp), iss="https://idp.evil.example.org"))
    refused(finish(web, begin(web, idp), iss=""))  # the provider says it always sends one
    text = refused(finish(web, begin(web, idp), code="", error="access_denied"))
    assert "You cancelled the sign-in." in text
    text = refused(finish(web, begin(web, idp), code="", error="server_error<script>"))
    assert "did not sign you in (server_error" in text and "<script>" not in text
    assert idp.token_requests == []


def test_a_userinfo_answer_about_someone_else_is_refused(app: Flask, idp: FakeProvider) -> None:
    idp.userinfo = {"sub": "u-9999", "name": "Mallory"}
    web = app.test_client()
    refused(finish(web, begin(web, idp)))


def test_discovery_naming_another_issuer_stops_the_sign_in(app: Flask, idp: FakeProvider) -> None:
    idp.metadata["issuer"] = "https://idp.evil.example.org"
    r = app.test_client().get("/app/login/clinic")
    assert r.status_code == 502
    assert "cannot be used for sign-in right now" in r.get_data(as_text=True)


def test_unmapped_or_ambiguous_groups_get_no_role(app: Flask, idp: FakeProvider) -> None:
    for groups in ([], ["unrelated"], ["kat-nurses", "clinic7-referrers"]):
        idp.groups = groups
        web = app.test_client()
        text = refused(finish(web, begin(web, idp)), 403)
        assert "role" in text
    details = [e.get("outcomeDesc", "") for e in audit_details(app)]
    assert details.count("browser sign-in refused: no role mapped for this person") == 2
    assert details.count("browser sign-in refused: claims map to several roles") == 1


# ---------------------------------------------------------------------------- sessions


def test_sign_out_ends_the_session_for_every_copy_of_the_cookie(
    app: Flask, idp: FakeProvider
) -> None:
    web, csrf = sign_in(app, idp)
    cookie = web.get_cookie(browser.COOKIE)
    assert cookie is not None
    copy = app.test_client()
    copy.set_cookie(browser.COOKIE, cookie.value)
    assert copy.get("/fhir/Patient").status_code == 200
    r = web.post("/app/logout", data={"csrf_token": csrf})
    assert r.status_code == 303 and f"{browser.COOKIE}=;" in r.headers["Set-Cookie"]
    assert copy.get("/fhir/Patient").status_code == 401
    assert copy.get("/app/dashboard").status_code == 303
    # A second process on the same database agrees (the session is over in the database).
    other_process = create_app(app.extensions["fhir_kat"].settings)
    try:
        again = other_process.test_client()
        again.set_cookie(browser.COOKIE, cookie.value)
        assert again.get("/fhir/Patient").status_code == 401
    finally:
        other_process.extensions["fhir_kat"].export.shutdown()
        other_process.extensions["fhir_kat"].store.dispose()


def test_idle_and_absolute_timeouts_on_the_service_clock(app: Flask, idp: FakeProvider) -> None:
    state = app.extensions["fhir_kat"]
    real = state.clock
    idle = state.settings.session_idle_seconds
    absolute = state.settings.session_absolute_seconds
    web, _ = sign_in(app, idp)
    start = real()
    try:
        state.clock = lambda: start + timedelta(seconds=idle - 5)
        assert web.get("/app/dashboard").status_code == 200  # used in time: renewed
        state.clock = lambda: start + timedelta(seconds=2 * idle - 10)
        assert web.get("/app/dashboard").status_code == 200
        state.clock = lambda: start + timedelta(seconds=3 * idle)
        assert web.get("/app/dashboard").status_code == 303  # idle too long

        state.clock = real
        web, _ = sign_in(app, idp)
        start = real()
        moment = start
        while moment < start + timedelta(seconds=absolute - idle):  # used all day long
            moment += timedelta(seconds=idle - 60)
            state.clock = lambda m=moment: m  # type: ignore[misc]
            assert web.get("/fhir/Patient").status_code == 200
        state.clock = lambda: start + timedelta(seconds=absolute + 1)
        assert web.get("/fhir/Patient").status_code == 401  # over, however busy
    finally:
        state.clock = real


def test_a_role_change_applies_at_the_next_sign_in_and_a_new_mapping_ends_sessions(
    app: Flask, idp: FakeProvider
) -> None:
    web, csrf = sign_in(app, idp)
    assert web.get("/fhir/Observation").status_code == 200
    idp.groups = ["clinic7-referrers"]  # the IdP's administrator moves the person
    assert web.get("/fhir/Observation").status_code == 200  # this session keeps its grant
    web.post("/app/logout", data={"csrf_token": csrf})
    web, _ = sign_in(app, idp)
    assert web.get("/fhir/Observation").status_code == 403  # now a referrer
    assert "(referrer)" in web.get("/app/").get_data(as_text=True)

    # The service's administrator narrows the mapping (and restarts): the session ends.
    oidc = app.extensions["fhir_kat"].identity_providers["clinic"]
    scopes, _ = parse_scopes(["system/Task.rs"])
    roles = dict(oidc.provider.roles)
    roles["clinic7-referrers"] = RoleGrant("referrer", tuple(scopes), CLINIC_ORG, "TREAT")
    oidc.provider = replace(oidc.provider, roles=roles)
    assert web.get("/app/").status_code == 303


# ---------------------------------------------------------------------------- the sign-in page


def test_the_client_sign_in_is_for_local_development_only(app: Flask, idp: FakeProvider) -> None:
    page = app.test_client().get("/app/login").get_data(as_text=True)
    assert 'href="/app/login/clinic?next=/app/"' in page and "Sign in with Clinic 7" in page
    assert 'name="client_secret"' not in page  # providers configured: the form is off ...
    r = app.test_client().post(
        "/app/login", data={"client_id": "staff", "client_secret": "staff-secret"}
    )
    assert r.status_code == 403 and "Set-Cookie" not in r.headers  # ... and refused
    state = app.extensions["fhir_kat"]
    state.settings = replace(state.settings, client_sign_in="on")  # explicitly enabled
    page = app.test_client().get("/app/login").get_data(as_text=True)
    assert "For local development only." in page and 'name="client_secret"' in page
    r = app.test_client().post(
        "/app/login", data={"client_id": "staff", "client_secret": "staff-secret"}
    )
    assert r.status_code == 303


def test_a_browser_landing_on_the_root_gets_the_sign_in_page_an_api_client_a_401(
    app: Flask,
) -> None:
    web = app.test_client()
    html = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    for path in ("/", "/app"):
        r = web.get(path, headers=html)
        assert r.status_code == 303 and r.headers["Location"] == "/app/", path
    assert web.get("/app/", headers=html).headers["Location"] == "/app/login?next=/app/"
    for accept in ("*/*", "application/fhir+json", "application/json"):
        r = web.get("/", headers={"Accept": accept})
        assert r.status_code == 401, accept
        assert r.get_json()["resourceType"] == "OperationOutcome"
