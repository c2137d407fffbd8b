"""A real Bulk Data client against a live server: SMART Fetch (the exporter cumulus-etl hands
exports to) signs in with SMART Backend Services (its own private_key_jwt), kicks off a Group
export with the scopes of the types it exports, polls and downloads — and gets exactly the
consenting members' data."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask

from fhir_kat.app import create_app
from fhir_kat.settings import Settings
from tests.conftest import HA_ORG, TEST_CLIENTS, LiveServer, client_as
from tests.test_visibility import consent_for, observation

SMART_FETCH = Path(sys.executable).with_name("smart-fetch")


@pytest.fixture
def fetch_app(settings: Settings, tmp_path: Path) -> Iterator[tuple[Flask, Path]]:
    key = ec.generate_private_key(ec.SECP384R1())
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    private = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
    for jwk in (public, private):
        jwk.update({"kid": "fetch-1", "alg": "ES384"})
    private["key_ops"] = ["sign"]  # how SMART Fetch picks its signing key from a JWKS
    jwks = tmp_path / "fetch.jwks"  # SMART Fetch knows a key file by its suffix
    jwks.write_text(json.dumps({"keys": [private]}))
    jwks.chmod(0o600)
    clients = dict(TEST_CLIENTS)
    clients["smart-fetch"] = {
        "role": "health-authority",
        "scopes": ["system/*.rs"],
        "organization": HA_ORG,
        "jwks": {"keys": [public]},
    }
    application = create_app(replace(settings, extra={"clients": clients}))
    yield application, jwks
    application.extensions["fhir_kat"].export.shutdown()
    application.extensions["fhir_kat"].store.dispose()


def _read(folder: Path, rtype: str) -> list[dict[str, Any]]:
    found = []
    for path in folder.rglob(f"*{rtype}*.ndjson*"):
        opener: Any = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            found += [json.loads(line) for line in fh if line.strip()]
    return found


@pytest.mark.skipif(not SMART_FETCH.exists(), reason="smart-fetch is a dev dependency")
def test_smart_fetch_exports_a_group(fetch_app: tuple[Flask, Path], tmp_path: Path) -> None:
    app, jwks = fetch_app
    staff = client_as(app, "staff")
    patients = []
    for _ in range(3):
        patients.append(
            staff.post("/fhir/Patient", json={"resourceType": "Patient"}).get_json()["id"]
        )
    for pid in patients:
        assert staff.post("/fhir/Observation", json=observation(pid)).status_code == 201
    for pid in patients[:2]:  # the third has given no consent
        assert staff.post("/fhir/Consent", json=consent_for(pid, "HA-ISLAND")).status_code == 201
    group = {
        "resourceType": "Group",
        "id": "cohort",
        "type": "person",
        "actual": True,
        "member": [{"entity": {"reference": f"Patient/{p}"}} for p in patients],
    }
    assert staff.put("/fhir/Group/cohort", json=group).status_code == 201
    out = tmp_path / "out"
    with LiveServer(app) as server:
        done = subprocess.run(
            [
                str(SMART_FETCH),
                "bulk",
                "--fhir-url",
                server.url + "/fhir",
                "--smart-client-id",
                "smart-fetch",
                "--smart-key",
                str(jwks),
                "--group",
                "cohort",
                "--type",
                "Patient,Observation",
                "--no-compression",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=tmp_path,
            check=False,
        )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    exported = {r["id"] for r in _read(out, "Patient")}
    assert exported == set(patients[:2])
    subjects = {r["subject"]["reference"] for r in _read(out, "Observation")}
    assert subjects == {f"Patient/{p}" for p in patients[:2]}
    shutil.rmtree(out)
