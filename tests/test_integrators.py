"""What integrators hit in the first hour, with the clients they use: SMART discovery that
fhirclient's backend-services sign-in finds on its own, fhirpy's ``get_or_create``, Bulk Data
kick-offs as Bulk Data 2.0 clients send them (POST, lenient ``_type``, Group exports with
type-only scopes), and the CLI's documented ``--since``."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fhirclient import client as smart_client
from fhirclient.models.patient import Patient as FCPatient
from fhirpy import SyncFHIRClient
from flask import Flask
from flask.testing import FlaskClient

from fhir_kat.app import create_app
from fhir_kat.cli import _since_instant
from fhir_kat.security.policy import ROLES, role_allows
from fhir_kat.services.capability import DEFINITION_TYPES
from fhir_kat.settings import Settings
from tests.conftest import HA_ORG, TEST_CLIENTS, LiveServer, _registration, client_as
from tests.test_security import _assertion, _keypair
from tools.hl7_packages import ensure_tree

FHIR = "application/fhir+json"
LETTERS = {
    "read": "r",
    "vread": "r",
    "history-instance": "r",
    "update": "u",
    "delete": "d",
    "create": "c",
    "search-type": "s",
}


@pytest.fixture
def integrator_app(settings: Settings) -> Iterator[tuple[Flask, Any]]:
    """The usual clients, plus a backend-services client (ES384 key) and a health authority
    whose scopes name exported types only, as SMART Fetch and cumulus-etl ask for them."""
    key, jwk = _keypair("ES384")
    clients = dict(TEST_CLIENTS)
    clients["backend-ES384"] = {
        "role": "health-authority",
        "scopes": ["system/*.rs"],
        "organization": HA_ORG,
        "jwks": {"keys": [jwk]},
    }
    clients["ha-types"] = _registration(
        "health-authority",
        ["system/Patient.rs", "system/Observation.rs"],
        "types-secret",
        organization=HA_ORG,
    )
    application = create_app(replace(settings, extra={"clients": clients}))
    yield application, key
    application.extensions["fhir_kat"].export.shutdown()
    application.extensions["fhir_kat"].store.dispose()


# ------------------------------------------------------------------ discovery


def test_discovery_documents_come_from_one_source(app: Flask) -> None:
    c = app.test_client()
    conf = c.get("/.well-known/smart-configuration").get_json()
    assert c.get("/fhir/.well-known/smart-configuration").get_json() == conf
    assert "issuer" not in conf and "jwks_uri" not in conf  # no OpenID Connect offered
    assert conf["grant_types_supported"] == ["client_credentials"]
    assert {"client-confidential-asymmetric", "permission-v2"} <= set(conf["capabilities"])
    cap = c.get("/fhir/metadata").get_json()
    security = cap["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    uris = next(
        e
        for e in security["extension"]
        if e["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    )
    assert uris["extension"] == [{"url": "token", "valueUri": conf["token_endpoint"]}]
    assert cap["instantiates"] == ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"]


def test_the_capability_statement_lists_only_what_some_role_may_do(app: Flask) -> None:
    cap = app.test_client().get("/fhir/metadata").get_json()
    for entry in cap["rest"][0]["resource"]:
        listed = {i["code"] for i in entry["interaction"]}
        if entry["type"] in DEFINITION_TYPES:
            # The published definitions: read-only for every signed-in caller (ADR 0022).
            assert listed == {"read", "search-type"}, entry["type"]
            continue
        for code, letter in LETTERS.items():
            some_role = any(role_allows(r, entry["type"], letter) for r in ROLES)
            assert (code in listed) == some_role, (entry["type"], code)
    audit = next(e for e in cap["rest"][0]["resource"] if e["type"] == "AuditEvent")
    assert {i["code"] for i in audit["interaction"]} == {
        "read",
        "vread",
        "history-instance",
        "search-type",
    }


def test_fhirclient_signs_in_with_backend_services_on_its_own(
    integrator_app: tuple[Flask, Any],
) -> None:
    app, key = integrator_app
    with LiveServer(app) as server:
        base = server.url + "/fhir"
        assertion = _assertion(key, "ES384", "backend-ES384", server.url + "/auth/token")
        fc = smart_client.FHIRClient(
            settings={
                "app_id": "backend-ES384",
                "api_base": base,
                "jwt_token": assertion,
                "scope": "system/Patient.rs",
            }
        )
        assert not fc.prepare()  # no token yet, but the CapabilityStatement has been read:
        assert fc.server.auth.auth_type == "oauth2"  # it found the SMART token endpoint
        assert fc.server.auth._token_uri == server.url + "/auth/token"
        fc.authorize()
        assert fc.ready and fc.server.auth.access_token
        staff = client_as(app, "staff")
        staff.post("/fhir/Patient", json={"resourceType": "Patient", "gender": "female"})
        # Consent filtering holds for it too: no consent, nothing seen; but it is signed in.
        bundle = fc.server.request_json("Patient")
        assert bundle["resourceType"] == "Bundle" and bundle["total"] == 0
        assert list(FCPatient.where({"gender": "female"}).perform_resources_iter(fc.server)) == []


def test_fhir_kit_client_finds_the_endpoints_in_every_call(live_server: LiveServer) -> None:
    """fhir-kit-client (npm) races the SMART configuration, the CapabilityStatement and the
    OpenID configuration and takes whichever answers first: each must name the token
    endpoint (it once found none in 16 of 40 calls, when the CapabilityStatement won)."""
    node = shutil.which("node")
    assert node is not None, "node is not on PATH: the fhir-kit-client test needs Node.js 20+"
    result = subprocess.run(
        [
            node,
            str(Path(__file__).parent / "support" / "fhir_kit_discovery.mjs"),
            str(ensure_tree("fhir-kit-client")),
            live_server.url + "/fhir",
            "40",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout)
    assert len(found) == 40
    token = live_server.url + "/auth/token"
    assert [f["token"] for f in found] == [token] * 40, [f for f in found if f["token"] != token]
    # No authorization endpoint is offered (backend services only), from any of the sources.
    assert {f["authorize"] for f in found} == {None}


# ------------------------------------------------------------------ conditional create


def test_fhirpy_get_or_create_makes_one_patient(live_server: LiveServer) -> None:
    fhir = SyncFHIRClient(live_server.url + "/fhir", authorization=f"Bearer {live_server.token}")
    wanted = fhir.resource(
        "Patient", identifier=[{"system": "urn:kat:gc", "value": "1"}], gender="other"
    )
    first, created = (
        fhir.resources("Patient").search(identifier="urn:kat:gc|1").get_or_create(wanted)
    )
    second, again = (
        fhir.resources("Patient").search(identifier="urn:kat:gc|1").get_or_create(wanted)
    )
    assert created and not again and first.id == second.id
    assert fhir.resources("Patient").search(identifier="urn:kat:gc|1").count() == 1


def test_a_create_never_ignores_its_query(client: FlaskClient) -> None:
    body = json.dumps({"resourceType": "Patient", "gender": "other"})
    r = client.post(
        "/fhir/Patient?identifier=urn:x|1",
        data=body,
        content_type=FHIR,
        headers={"If-None-Exist": "identifier=urn:x|2"},
    )
    assert r.status_code == 400 and r.get_json()["issue"][0]["expression"] == ["If-None-Exist"]
    r = client.post("/fhir/Patient?nonsense=1", data=body, content_type=FHIR)
    assert r.status_code == 400  # unknown conditions are refused, as in If-None-Exist


# ------------------------------------------------------------------ Bulk Data


def _finish(c: FlaskClient, r: Any) -> dict[str, Any]:
    assert r.status_code == 202, r.get_json()
    for _ in range(400):
        poll = c.get(r.headers["Content-Location"])
        if poll.status_code == 200:
            manifest: dict[str, Any] = poll.get_json()
            return manifest
        time.sleep(0.025)
    raise AssertionError("export did not finish")


def _lines(c: FlaskClient, url: str) -> list[dict[str, Any]]:
    response = c.get(url)
    text = response.get_data(as_text=True)
    response.close()
    return [json.loads(line) for line in text.splitlines() if line]


def test_post_kick_off_with_parameters(client: FlaskClient) -> None:
    client.post("/fhir/Patient", json={"resourceType": "Patient", "gender": "male"})
    params = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "_outputFormat", "valueString": "application/fhir+ndjson"},
            {"name": "_type", "valueString": "Patient"},
            {"name": "_since", "valueInstant": "2000-01-01T00:00:00Z"},
        ],
    }
    r = client.post(
        "/fhir/$export", json=params, headers={"Prefer": "respond-async"}, content_type=FHIR
    )
    manifest = _finish(client, r)
    assert [o["type"] for o in manifest["output"]] == ["Patient"]
    bad = params | {"parameter": [{"name": "patient", "valueString": "x"}]}
    r = client.post(
        "/fhir/$export", json=bad, headers={"Prefer": "respond-async"}, content_type=FHIR
    )
    assert r.status_code == 400


def test_lenient_handling_skips_what_is_not_held_and_reports_it(client: FlaskClient) -> None:
    client.post("/fhir/Patient", json={"resourceType": "Patient"})
    strict = client.get("/fhir/$export?_type=Device,Patient", headers={"Prefer": "respond-async"})
    assert strict.status_code == 400
    r = client.get(
        "/fhir/$export?_type=Device,Patient,Basic",
        headers={"Prefer": "respond-async, handling=lenient"},
    )
    manifest = _finish(client, r)
    assert [o["type"] for o in manifest["output"]] == ["Patient"]
    (error,) = manifest["error"]
    assert error["type"] == "OperationOutcome"
    outcomes = _lines(client, error["url"])
    texts = [o["issue"][0]["diagnostics"] for o in outcomes]
    assert any("Device" in t for t in texts) and any("Basic" in t for t in texts)


def test_a_group_export_needs_the_exported_types_scopes_not_a_group_scope(
    integrator_app: tuple[Flask, Any],
) -> None:
    app, _ = integrator_app
    staff = client_as(app, "staff")
    pid = staff.post("/fhir/Patient", json={"resourceType": "Patient"}).get_json()["id"]
    group = {
        "resourceType": "Group",
        "type": "person",
        "actual": True,
        "member": [{"entity": {"reference": f"Patient/{pid}"}}],
    }
    assert staff.put("/fhir/Group/g1", json=group | {"id": "g1"}).status_code == 201
    typed = client_as(app, "ha-types")
    r = typed.get("/fhir/Group/g1/$export?_type=Patient", headers={"Prefer": "respond-async"})
    manifest = _finish(typed, r)
    assert manifest["output"] == []  # no consent: nothing of the member leaves, but it ran
    # A scope refusal says so, the same way everywhere.
    for refused in (
        typed.get("/fhir/Group/g1/$export?_type=Condition", headers={"Prefer": "respond-async"}),
        typed.get("/fhir/Condition"),
        typed.get("/fhir/Group/g1"),
    ):
        assert refused.status_code == 403
        assert 'error="insufficient_scope"' in refused.headers["WWW-Authenticate"]


def test_the_documented_since_works(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _since_instant("2026-01-01") == "2026-01-01T00:00:00Z"
    assert _since_instant("2026-01-01T08:00:00-08:00") == "2026-01-01T08:00:00-08:00"
    for bad in ("2026-13-01", "yesterday", "2026-01-01T08:00"):
        with pytest.raises(argparse.ArgumentTypeError):
            _since_instant(bad)


def test_server_py_runs_from_an_interpreter_without_the_dependencies(tmp_path: Any) -> None:
    """``python server.py`` from a bare interpreter hands over to the checkout's .venv."""
    import subprocess
    import sys
    from pathlib import Path

    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    server = Path(__file__).resolve().parents[1] / "server.py"
    done = subprocess.run(
        [str(bare / "bin" / "python"), str(server), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: fhir-kat serve" in done.stdout
