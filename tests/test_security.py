"""Authentication, roles, scopes, SMART Backend Services, consent enforcement, audit, PHI-free
logs and rate limits."""

from __future__ import annotations

import json
import stat
import time
import uuid
from base64 import b64encode
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask
from flask.testing import FlaskClient

from fhir_kat.app import create_app
from fhir_kat.security.clients import ensure_local_clients, load_clients
from fhir_kat.security.ratelimit import FailureLimiter
from fhir_kat.settings import Settings
from tests.conftest import HA_ORG, TEST_CLIENTS, client_as, token_for

FHIR = "application/fhir+json"
PURPOSES = "http://terminology.hl7.org/CodeSystem/v3-ActReason"


def post(c: FlaskClient, path: str, body: Any, **headers: str) -> Any:
    return c.post(path, data=json.dumps(body), content_type=FHIR, headers=headers)


def put(c: FlaskClient, path: str, body: Any) -> Any:
    return c.put(path, data=json.dumps(body), content_type=FHIR)


# ------------------------------------------------------------------------------ role matrix

ROLES = ["none", "forged", "expired", "staff", "admin", "ha", "referrer", "staff-readonly"]


def _forged(app: Flask) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    claims = {
        "iss": "urn:fhir-kat",
        "aud": "urn:fhir-kat",
        "sub": "staff",
        "role": "admin",
        "scope": "system/*.cruds",
        "exp": int(time.time()) + 60,
        "iat": int(time.time()),
        "jti": "x",
    }
    return jwt.encode(claims, key, algorithm="ES256")


def _expired(app: Flask) -> str:
    state = app.extensions["fhir_kat"]
    claims = {
        "iss": "urn:fhir-kat",
        "aud": "urn:fhir-kat",
        "sub": "staff",
        "role": "program-staff",
        "scope": "system/*.cruds",
        "exp": int(time.time()) - 10,
        "iat": int(time.time()) - 310,
        "jti": "y",
    }
    return jwt.encode(claims, state.tokens.key, algorithm="ES256")


def caller(app: Flask, who: str) -> FlaskClient:
    if who in ("forged", "expired"):
        c = app.test_client()
        token = _forged(app) if who == "forged" else _expired(app)
        c.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        return c
    return client_as(app, None if who == "none" else who)


PATIENT = {"resourceType": "Patient", "gender": "female"}
TASK = {"resourceType": "Task", "status": "requested", "intent": "order"}
AUDIT = {
    "resourceType": "AuditEvent",
    "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
    "recorded": "2026-01-01T00:00:00Z",
    "agent": [{"requestor": True, "who": {"display": "x"}}],
    "source": {"observer": {"display": "x"}},
}

# (name, method, path, body) -> expected status per caller, in ROLES order.
MATRIX: list[tuple[str, str, str, Any, list[int]]] = [
    ("metadata", "GET", "/fhir/metadata", None, [200] * 8),
    ("smart-config", "GET", "/.well-known/smart-configuration", None, [200] * 8),
    ("healthz", "GET", "/healthz", None, [200] * 8),
    # A referrer searches the Patients of its own program referrals (ADR 0027): here none.
    ("search Patient", "GET", "/fhir/Patient", None, [401, 401, 401, 200, 403, 200, 200, 200]),
    # The health authority reads Patients, but not one no consent opens to it: that one does
    # not exist for it (404, as for an id never stored); nor for a referrer that did not refer it.
    ("read Patient", "GET", "/fhir/Patient/p1", None, [401, 401, 401, 200, 403, 404, 404, 200]),
    # A referrer records patient data only with its own program referral (docs/security.md).
    ("create Patient", "POST", "/fhir/Patient", PATIENT, [401, 401, 401, 201, 403, 403, 403, 403]),
    (
        "update Patient",
        "PUT",
        "/fhir/Patient/p1",
        {**PATIENT, "id": "p1"},
        [401, 401, 401, 200, 403, 403, 200, 403],
    ),
    (
        "delete Patient",
        "DELETE",
        "/fhir/Patient/p2",
        None,
        [401, 401, 401, 204, 403, 403, 403, 403],
    ),
    ("search Task", "GET", "/fhir/Task", None, [401, 401, 401, 200, 403, 200, 200, 403]),
    # A referrer's Task is a referral in its own organisation's name (requester) or nothing.
    ("create Task", "POST", "/fhir/Task", TASK, [401, 401, 401, 201, 403, 403, 403, 403]),
    (
        "search AuditEvent",
        "GET",
        "/fhir/AuditEvent",
        None,
        [401, 401, 401, 403, 200, 403, 403, 403],
    ),
    (
        "create AuditEvent",
        "POST",
        "/fhir/AuditEvent",
        AUDIT,
        [401, 401, 401, 403, 403, 403, 403, 403],
    ),
    (
        "transaction",
        "POST",
        "/fhir",
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"resource": PATIENT, "request": {"method": "POST", "url": "Patient"}}],
        },
        [401, 401, 401, 200, 403, 403, 403, 403],
    ),
]


@pytest.fixture
def seeded_app(app: Flask) -> Flask:
    staff = client_as(app, "staff")
    for pid in ("p1", "p2"):
        assert put(staff, f"/fhir/Patient/{pid}", {**PATIENT, "id": pid}).status_code == 201
    return app


@pytest.mark.parametrize(
    ("name", "method", "path", "body", "expected"), MATRIX, ids=[m[0] for m in MATRIX]
)
def test_role_endpoint_matrix(
    seeded_app: Flask, name: str, method: str, path: str, body: Any, expected: list[int]
) -> None:
    got = {}
    for who in ROLES:
        c = caller(seeded_app, who)
        data = json.dumps(body) if body is not None else None
        r = c.open(path, method=method, data=data, content_type=FHIR if body else None)
        got[who] = r.status_code
        if r.status_code in (401, 403):
            assert r.content_type.startswith(FHIR)
            assert r.get_json()["resourceType"] == "OperationOutcome"
        if r.status_code == 401:
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert got == dict(zip(ROLES, expected, strict=True)), name


def test_insufficient_scope_says_so(seeded_app: Flask) -> None:
    r = client_as(seeded_app, "staff-readonly").get("/fhir/Observation")
    assert r.status_code == 403
    assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    expired = caller(seeded_app, "expired").get("/fhir/Patient")
    assert 'error="invalid_token"' in expired.headers["WWW-Authenticate"]


# ------------------------------------------------------------------------------ token endpoint


def test_client_secret_basic_and_post(app: Flask) -> None:
    c = app.test_client()
    r = c.post(
        "/auth/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": "Basic " + _b64("staff:staff-secret")},
    )
    assert r.status_code == 200, r.data
    body = r.get_json()
    assert body["token_type"] == "bearer" and body["expires_in"] <= 300
    assert r.headers["Cache-Control"] == "no-store"
    use = c.get("/fhir/Patient", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert use.status_code == 200

    r = c.post(
        "/auth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": "ha",
            "client_secret": "ha-secret",
            "scope": "system/Observation.rs",
        },
    )
    assert r.status_code == 200 and r.get_json()["scope"] == "system/Observation.rs"
    narrow = r.get_json()["access_token"]
    assert c.get("/fhir/Patient", headers={"Authorization": f"Bearer {narrow}"}).status_code == 403


@pytest.mark.parametrize(
    ("form", "headers", "status", "error"),
    [
        ({"grant_type": "password"}, {}, 400, "unsupported_grant_type"),
        (
            {"grant_type": "client_credentials", "client_id": "staff", "client_secret": "nope"},
            {},
            401,
            "invalid_client",
        ),
        (
            {"grant_type": "client_credentials", "client_id": "ghost", "client_secret": "x"},
            {},
            401,
            "invalid_client",
        ),
        (
            {
                "grant_type": "client_credentials",
                "client_id": "ha",
                "client_secret": "ha-secret",
                "scope": "system/Patient.cruds",
            },
            {},
            400,
            "invalid_scope",
        ),
        (
            {
                "grant_type": "client_credentials",
                "client_id": "ha",
                "client_secret": "ha-secret",
                "scope": "user/Patient.rs",
            },
            {},
            400,
            "invalid_scope",
        ),
        ({"grant_type": "client_credentials"}, {}, 400, "invalid_request"),
    ],
)
def test_token_refusals(
    app: Flask, form: dict[str, str], headers: dict[str, str], status: int, error: str
) -> None:
    r = app.test_client().post("/auth/token", data=form, headers=headers)
    assert r.status_code == status and r.get_json()["error"] == error


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def _keypair(alg: str) -> tuple[Any, dict[str, Any]]:
    if alg == "RS384":
        key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    else:
        key = ec.generate_private_key(ec.SECP384R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": f"k-{alg}", "alg": alg, "use": "sig"})
    return key, jwk


@pytest.fixture
def jwt_app(settings: Settings) -> Any:
    keys = {alg: _keypair(alg) for alg in ("RS384", "ES384")}
    clients = dict(TEST_CLIENTS)
    for alg, (_, jwk) in keys.items():
        clients[f"backend-{alg}"] = {
            "role": "health-authority",
            "scopes": ["system/*.rs"],
            "organization": HA_ORG,
            "jwks": {"keys": [jwk]},
        }
    application = create_app(replace(settings, extra={"clients": clients}))
    yield application, {alg: k for alg, (k, _) in keys.items()}
    application.extensions["fhir_kat"].store.dispose()


def _assertion(key: Any, alg: str, client_id: str, aud: str, **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": aud,
        "exp": now + 240,
        "iat": now,
        "jti": str(uuid.uuid4()),
        **overrides,
    }
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": f"k-{alg}"})


def _token_request(c: FlaskClient, assertion: str) -> Any:
    return c.post(
        "/auth/token",
        data={
            "grant_type": "client_credentials",
            "scope": "system/Observation.rs",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        },
    )


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_smart_backend_services(jwt_app: Any, alg: str) -> None:
    app, keys = jwt_app
    c = app.test_client()
    aud = "http://localhost/auth/token"
    client_id = f"backend-{alg}"
    assertion = _assertion(keys[alg], alg, client_id, aud)
    r = _token_request(c, assertion)
    assert r.status_code == 200, r.data
    claims = jwt.decode(r.get_json()["access_token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] <= 300 and claims["sub"] == client_id

    replay = _token_request(c, assertion)
    assert replay.status_code == 401 and "jti" in replay.get_json()["error_description"]

    expired = _assertion(keys[alg], alg, client_id, aud, exp=int(time.time()) - 5)
    assert _token_request(c, expired).status_code == 401
    wrong_aud = _assertion(keys[alg], alg, client_id, "http://elsewhere/token")
    assert _token_request(c, wrong_aud).get_json()["error"] == "invalid_client"
    too_long = _assertion(keys[alg], alg, client_id, aud, exp=int(time.time()) + 900)
    assert _token_request(c, too_long).status_code == 401
    other_alg = "ES384" if alg == "RS384" else "RS384"
    wrong_key = jwt.encode(
        {"iss": client_id, "sub": client_id, "aud": aud, "exp": int(time.time()) + 60, "jti": "z"},
        keys[other_alg],
        algorithm=other_alg,
        headers={"kid": f"k-{alg}"},
    )
    assert _token_request(c, wrong_key).status_code == 401
    rs256 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    weak = jwt.encode(
        {"iss": client_id, "sub": client_id, "aud": aud, "exp": int(time.time()) + 60, "jti": "w"},
        rs256,
        algorithm="RS256",
    )
    assert _token_request(c, weak).status_code == 401


def test_smart_configuration_advertises_backend_services(app: Flask) -> None:
    conf = app.test_client().get("/.well-known/smart-configuration").get_json()
    assert conf["token_endpoint"].endswith("/auth/token")
    assert "private_key_jwt" in conf["token_endpoint_auth_methods_supported"]
    assert set(conf["token_endpoint_auth_signing_alg_values_supported"]) == {"RS384", "ES384"}
    cap = app.test_client().get("/fhir/metadata").get_json()
    assert cap["rest"][0]["security"]["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"


def test_client_registration_errors_are_all_reported() -> None:
    from fhir_kat.settings import SettingsError

    with pytest.raises(SettingsError) as err:
        load_clients(
            {
                "a": {"role": "wizard", "scopes": ["everything"]},
                "b": {
                    "role": "health-authority",
                    "scopes": ["system/*.rs"],
                    "secret_env": "NOPE_NOT_SET",
                },
            },
            None,
            {},
        )
    text = str(err.value)
    for fragment in ("role must be", "not a SMART", "NOPE_NOT_SET", "organization"):
        assert fragment in text


def test_local_clients_bootstrap(tmp_path: Path) -> None:
    lines = ensure_local_clients(tmp_path)
    credentials = tmp_path / "local-credentials.txt"
    assert credentials.exists() and any("local-credentials.txt" in line for line in lines)
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert ensure_local_clients(tmp_path) == []  # only on a new data directory
    client_id, secret = credentials.read_text().splitlines()[2].split()
    registry = load_clients({}, tmp_path, {})
    assert registry.get(client_id) is not None and registry.get(client_id).check_secret(secret)
    assert secret not in (tmp_path / "local-clients.json").read_text()


# ------------------------------------------------------------------------------ consent


def _consent(patient: str, actor: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    provision: dict[str, Any] = {
        "type": "permit",
        "purpose": [{"system": PURPOSES, "code": "HOPERAT"}],
    }
    if actor is not None:
        provision["actor"] = [
            {
                "role": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                            "code": "IRCP",
                        }
                    ]
                },
                "reference": actor,
            }
        ]
    provision.update(extra.pop("provision", {}))
    return {
        "resourceType": "Consent",
        "status": extra.pop("status", "active"),
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient}"},
        "dateTime": "2026-01-01",
        "provision": provision,
        **extra,
    }


@pytest.fixture
def consent_world(app: Flask) -> dict[str, Any]:
    staff = client_as(app, "staff")
    system, value = HA_ORG.split("|")
    ha_org = post(
        staff,
        "/fhir/Organization",
        {"resourceType": "Organization", "identifier": [{"system": system, "value": value}]},
    ).get_json()["id"]
    other_org = post(
        staff, "/fhir/Organization", {"resourceType": "Organization", "name": "Another party"}
    ).get_json()["id"]
    patients = {}
    for name in ("none", "ha", "ha_by_identifier", "other", "expired", "revoked", "nested"):
        pid = post(staff, "/fhir/Patient", PATIENT).get_json()["id"]
        patients[name] = pid
        post(
            staff,
            "/fhir/Observation",
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}]},
                "subject": {"reference": f"Patient/{pid}"},
                "valueInteger": 7,
            },
        )
    ha_ref = {"reference": f"Organization/{ha_org}"}
    post(staff, "/fhir/Consent", _consent(patients["ha"], ha_ref))
    post(
        staff,
        "/fhir/Consent",
        _consent(patients["ha_by_identifier"], {"identifier": {"system": system, "value": value}}),
    )
    post(
        staff,
        "/fhir/Consent",
        _consent(patients["other"], {"reference": f"Organization/{other_org}"}),
    )
    post(
        staff,
        "/fhir/Consent",
        _consent(patients["expired"], ha_ref, provision={"period": {"end": "2026-01-31"}}),
    )
    revoked = post(staff, "/fhir/Consent", _consent(patients["revoked"], ha_ref)).get_json()
    post(
        staff,
        "/fhir/Consent",
        _consent(
            patients["nested"],
            ha_ref,
            provision={
                "provision": [
                    {
                        "type": "deny",
                        "class": [
                            {"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}
                        ],
                    }
                ]
            },
        ),
    )
    return {"patients": patients, "revoked": revoked, "staff": staff}


def _visible(c: FlaskClient, rtype: str) -> set[str]:
    bundle = c.get(f"/fhir/{rtype}?_count=100").get_json()
    assert bundle["total"] == len(bundle.get("entry", []))  # counts never leak hidden data
    return {
        e["resource"]
        .get("subject", {})
        .get("reference", "Patient/" + e["resource"]["id"])
        .split("/")[1]
        for e in bundle.get("entry", [])
    }


def test_consent_governs_what_the_health_authority_sees(
    app: Flask, consent_world: dict[str, Any]
) -> None:
    p = consent_world["patients"]
    ha = client_as(app, "ha")
    assert _visible(ha, "Observation") == {p["ha"], p["ha_by_identifier"], p["revoked"]}
    assert _visible(ha, "Patient") == {p["ha"], p["ha_by_identifier"], p["revoked"], p["nested"]}
    assert ha.get(f"/fhir/Patient/{p['ha']}").status_code == 200
    never = ha.get("/fhir/Patient/never-stored")
    for hidden in ("none", "other", "expired"):
        r = ha.get(f"/fhir/Patient/{p[hidden]}")
        # Exactly the answer for an id never stored: nothing says the participant exists.
        assert r.status_code == 404 and r.get_json() == _reworded(never.get_json(), p[hidden])
    # _include never smuggles in what the caller could not read on its own
    inc = ha.get("/fhir/Observation?_include=Observation:patient&_count=100").get_json()
    included = {e["resource"]["id"] for e in inc["entry"] if e["search"]["mode"] == "include"}
    assert included == {p["ha"], p["ha_by_identifier"], p["revoked"]}

    revoked = dict(consent_world["revoked"], status="inactive")
    assert put(consent_world["staff"], f"/fhir/Consent/{revoked['id']}", revoked).status_code == 200
    assert p["revoked"] not in _visible(ha, "Observation")  # takes effect on the next request
    assert ha.get(f"/fhir/Patient/{p['revoked']}").status_code == 404
    assert _visible(consent_world["staff"], "Observation") == set(p.values())  # staff: all


def _reworded(outcome: dict[str, Any], rid: str) -> dict[str, Any]:
    """``outcome`` (for ``never-stored``) as it reads for ``rid``."""
    return json.loads(json.dumps(outcome).replace("never-stored", rid))


def test_privacy_consent_without_patient_is_refused(client: FlaskClient) -> None:
    body = _consent("x", None)
    del body["patient"]
    r = post(client, "/fhir/Consent", body)
    assert r.status_code == 422
    assert r.get_json()["issue"][0]["expression"] == ["Consent.patient"]


# ------------------------------------------------------------------------------ referrer scope


def test_referrer_sees_only_its_own_referrals(app: Flask) -> None:
    staff = client_as(app, "staff")
    tasks = {}
    for org_value in ("CLINIC-7", "CLINIC-8"):
        org = post(
            staff,
            "/fhir/Organization",
            {
                "resourceType": "Organization",
                "identifier": [
                    {
                        "system": "https://fhir-kat.example.org/fhir/sid/organization",
                        "value": org_value,
                    }
                ],
            },
        )
        role = post(
            staff,
            "/fhir/PractitionerRole",
            {
                "resourceType": "PractitionerRole",
                "organization": {"reference": f"Organization/{org.get_json()['id']}"},
            },
        )
        task = post(
            staff,
            "/fhir/Task",
            {**TASK, "requester": {"reference": f"PractitionerRole/{role.get_json()['id']}"}},
        )
        tasks[org_value] = task.get_json()["id"]
    mine = client_as(app, "referrer").get("/fhir/Task").get_json()
    assert [e["resource"]["id"] for e in mine["entry"]] == [tasks["CLINIC-7"]]
    assert mine["total"] == 1
    assert client_as(app, "referrer").get(f"/fhir/Task/{tasks['CLINIC-8']}").status_code == 404
    assert (
        client_as(app, "other-referrer").get(f"/fhir/Task/{tasks['CLINIC-8']}").status_code == 200
    )


# ------------------------------------------------------------------------------ audit


def test_every_access_is_audited_and_audit_is_immutable(app: Flask) -> None:
    staff = client_as(app, "staff")
    pid = post(staff, "/fhir/Patient", PATIENT).get_json()["id"]
    staff.get(f"/fhir/Patient/{pid}")
    staff.get(f"/fhir/Observation?patient={pid}")
    app.test_client().get(f"/fhir/Patient/{pid}")  # denied: no token
    admin = client_as(app, "admin")
    events = admin.get(f"/fhir/AuditEvent?patient={pid}&_count=50").get_json()
    subtypes = sorted(e["resource"]["subtype"][0]["code"] for e in events["entry"])
    assert subtypes == ["create", "read"]
    read_event = next(
        e["resource"] for e in events["entry"] if e["resource"]["subtype"][0]["code"] == "read"
    )
    assert read_event["agent"][0]["who"]["identifier"]["value"] == "staff"
    assert read_event["outcome"] == "0" and read_event["action"] == "R"
    all_events = admin.get("/fhir/AuditEvent?_count=200").get_json()["entry"]
    denied = [e["resource"] for e in all_events if e["resource"]["outcome"] == "4"]
    assert any(d.get("outcomeDesc") == "denied: no bearer token" for d in denied)
    search = [
        e["resource"] for e in all_events if e["resource"]["subtype"][0]["code"] == "search-type"
    ]
    assert search and any(ent["role"]["code"] == "24" for ent in search[0]["entity"])
    some = all_events[0]["resource"]
    assert put(admin, f"/fhir/AuditEvent/{some['id']}", some).status_code == 403
    assert admin.delete(f"/fhir/AuditEvent/{some['id']}").status_code == 403
    assert staff.delete(f"/fhir/AuditEvent/{some['id']}").status_code == 403
    token_issue = app.test_client().post(
        "/auth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": "admin",
            "client_secret": "admin-secret",
        },
    )
    assert token_issue.status_code == 200
    logins = admin.get("/fhir/AuditEvent?type=http://dicom.nema.org/resources/ontology/DCM|110114")
    assert logins.get_json()["total"] >= 1


# ------------------------------------------------------------------------------ no PHI in logs

PHI = ["Zebediah", "Quuxworth", "9871234567", "1911-11-11", "42 Wallaby Way", "hears voices"]


def test_no_phi_reaches_the_log(app: Flask, capfd: pytest.CaptureFixture[str]) -> None:
    staff = client_as(app, "staff")
    patient = {
        "resourceType": "Patient",
        "identifier": [
            {
                "system": "https://fhir.infoway-inforoute.ca/NamingSystem/"
                "ca-bc-patient-healthcare-id",
                "value": "9871234567",
            }
        ],
        "name": [{"family": "Quuxworth", "given": ["Zebediah"]}],
        "birthDate": "1911-11-11",
        "address": [{"line": ["42 Wallaby Way"]}],
    }
    pid = post(staff, "/fhir/Patient", patient).get_json()["id"]
    staff.get("/fhir/Patient?name=Quuxworth&identifier=9871234567&birthdate=1911-11-11")
    post(staff, "/fhir/Patient", {**patient, "gender": "Zebediah"})  # invalid code, echoed?
    post(staff, "/fhir/Patient", {**patient, "birthDate": "Quuxworth 9871234567"})
    staff.post("/fhir/Patient", data='{"name": "Zebediah" hears voices', content_type=FHIR)
    post(
        staff,
        "/fhir/Observation",
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "hears voices"},
            "subject": {"reference": f"Patient/{pid}"},
            "valueString": "Zebediah hears voices",
        },
    )
    post(
        staff,
        "/fhir",
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "resource": {**patient, "gender": "bogus"},
                    "request": {"method": "POST", "url": "Patient"},
                }
            ],
        },
    )
    app.test_client().get("/fhir/Patient?name=Zebediah")
    app.test_client().post(
        "/auth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": "Zebediah",
            "client_secret": "9871234567",
        },
    )
    captured = capfd.readouterr()
    logs = captured.err + captured.out
    assert "request" in logs  # the log is there …
    for value in PHI:
        assert value not in logs  # … and says nothing about the person


def test_error_messages_do_not_echo_values(client: FlaskClient) -> None:
    r = post(client, "/fhir/Patient", {"resourceType": "Patient", "birthDate": "Quuxworth"})
    assert r.status_code == 400 and "Quuxworth" not in r.get_data(as_text=True)
    r = post(client, "/fhir/Patient", {"resourceType": "Patient", "gender": "Zebediah"})
    assert r.status_code == 400 and "Zebediah" not in r.get_data(as_text=True)


# ------------------------------------------------------------------------------ hardening


def test_rate_limit_answers_429_with_retry_after(settings: Settings) -> None:
    app = create_app(replace(settings, extra={"clients": TEST_CLIENTS}, rate_limit_per_minute=3))
    c = client_as(app, "staff")
    statuses = [c.get("/fhir/Patient").status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    r = c.get("/fhir/Patient")
    assert int(r.headers["Retry-After"]) >= 1 and r.get_json()["issue"][0]["code"] == "throttled"
    app.extensions["fhir_kat"].store.dispose()


def test_security_headers(client: FlaskClient) -> None:
    r = client.get("/fhir/metadata")
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Cache-Control"] == "no-store"


def test_token_lifetime_is_capped(app: Flask) -> None:
    claims = jwt.decode(token_for(app, "staff"), options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] <= 300
    assert datetime.fromtimestamp(claims["exp"], UTC) - datetime.now(UTC) <= timedelta(seconds=301)


def test_a_remembered_token_still_expires_and_failures_are_never_remembered(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verified tokens are remembered per process (``TokenService.verify``); their ``exp``
    is still enforced on every use, and a token that failed is checked afresh each time."""
    from fhir_kat.security import tokens as tokens_module

    service = app.extensions["fhir_kat"].tokens
    token = token_for(app, "staff")
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    first = service.verify(token)
    assert service.verify(token) is first  # remembered: the same principal, no new decode
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    assert client.get("/fhir/Patient").status_code == 200
    monkeypatch.setattr(tokens_module.time, "time", lambda: float(exp))
    with pytest.raises(jwt.ExpiredSignatureError):
        service.verify(token)
    answer = client.get("/fhir/Patient")
    assert answer.status_code == 401
    assert "expired" in answer.get_json()["issue"][0]["diagnostics"]
    monkeypatch.undo()
    forged = _forged(app)
    for _ in range(2):
        with pytest.raises(jwt.InvalidSignatureError):
            service.verify(forged)


# ------------------------------------------------------------------ failed sign-in throttling


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failure_limiter_counts_failures_in_a_sliding_window() -> None:
    clock = FakeMonotonic()
    limiter = FailureLimiter(3, 600, clock=clock)
    for _ in range(3):
        assert limiter.wait("192.0.2.1", "a") == 0
        limiter.failed("192.0.2.1", "a")
        clock.now += 100
    assert limiter.wait("192.0.2.1", "a") == 300  # the first failure (t=1000) leaves at 1600
    assert limiter.wait("192.0.2.2", "a") == 0  # the same client id from elsewhere
    clock.now = 1600
    assert limiter.wait("192.0.2.1", "a") == 0
    off = FailureLimiter(0, clock=clock)
    for _ in range(50):
        off.failed("192.0.2.1", "a")
    assert off.wait("192.0.2.1", "a") == 0


def _throttled_app(app: Flask) -> FakeMonotonic:
    clock = FakeMonotonic()
    app.extensions["fhir_kat"].auth_failures = FailureLimiter(10, 600, clock=clock)
    return clock


def test_repeated_wrong_secrets_at_the_token_endpoint_are_throttled(app: Flask) -> None:
    clock = _throttled_app(app)
    c = app.test_client()

    def attempt(client_id: str, secret: str) -> Any:
        return c.post(
            "/auth/token",
            data={"grant_type": "client_credentials"},
            headers={
                "Authorization": "Basic " + b64encode(f"{client_id}:{secret}".encode()).decode()
            },
        )

    for _ in range(10):
        assert attempt("ha", "guess").status_code == 401
    refused = attempt("ha", "ha-secret")  # even the right secret is not checked now
    assert refused.status_code == 429
    assert refused.get_json()["error"] == "temporarily_unavailable"
    assert int(refused.headers["Retry-After"]) == 600
    # other clients from the same address are not locked out, nor is a malformed request a guess
    assert attempt("staff", "staff-secret").status_code == 200
    for _ in range(12):
        assert c.post("/auth/token", data={"grant_type": "password"}).status_code == 400
    assert attempt("staff", "staff-secret").status_code == 200
    clock.now += 600
    assert attempt("ha", "ha-secret").status_code == 200
    # every refusal is in the audit trail, without the secret
    events = client_as(app, "admin").get("/fhir/AuditEvent?_count=200").get_json()["entry"]
    details = [e["resource"].get("outcomeDesc", "") for e in events]
    assert "token refused: too many failed attempts" in details
    assert not any("guess" in json.dumps(e) for e in events)


def test_repeated_wrong_secrets_at_the_browser_sign_in_are_throttled(app: Flask) -> None:
    clock = _throttled_app(app)
    c = app.test_client()

    def sign_in(secret: str) -> Any:
        return c.post(
            "/app/login",
            data={"client_id": "staff", "client_secret": secret, "next": "/app/"},
            headers={"Origin": "http://localhost"},
        )

    for _ in range(10):
        assert sign_in("guess").status_code == 401
    refused = sign_in("staff-secret")
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) == 600
    assert b"Too many failed sign-ins" in refused.data
    clock.now += 601
    assert sign_in("staff-secret").status_code == 303


def test_behind_a_proxy_failures_are_counted_per_forwarded_client_address(
    settings: Settings,
) -> None:
    proxied = create_app(replace(settings, proxy_hops=1))
    try:
        _throttled_app(proxied)
        c = proxied.test_client()

        def attempt(source: str, secret: str) -> int:
            form = {"grant_type": "client_credentials", "client_id": "ha", "client_secret": secret}
            return c.post("/auth/token", data=form, headers={"X-Forwarded-For": source}).status_code

        for _ in range(10):
            assert attempt("203.0.113.5", "guess") == 401
        assert attempt("203.0.113.5", "ha-secret") == 429
        assert attempt("198.51.100.7", "ha-secret") == 200  # the real client, elsewhere
    finally:
        proxied.extensions["fhir_kat"].export.shutdown()
        proxied.extensions["fhir_kat"].store.dispose()
