"""Property: whatever the mix of referrals, consents (whole, narrowed, denied, revoked) and
later writes, every path a client has tells it exactly what its plain search tells it.

Seeded random worlds (reproducible: the seed is in the test id). After every other write, for each
client and each type it may read: a read answers 200 exactly for the ids its search returns, an
``_id`` search and a count agree, ``_include`` brings nothing beyond what a search of the
included type returns; at the end a Bulk ``$export`` holds the same resources as the searches."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import client_as
from tests.test_visibility import (
    PHQ9_TOTAL,
    World,
    consent_for,
    fhir,
    native,
    observation,
    phn,
    referral,
)

CLIENTS = ("ha", "referrer", "other-referrer", "staff")
TYPES = ("Patient", "Observation", "Task", "ServiceRequest", "Consent", "Group")
NARROWINGS: list[dict[str, Any]] = [
    {},
    {"type": "deny"},
    {"class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}]},
    {"dataPeriod": {"start": "2026-03-01", "end": "2026-06-30"}},
    {"securityLabel": [{"system": "urn:x", "code": "R"}]},
    {
        "action": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/consentaction",
                        "code": "collect",
                    }
                ]
            }
        ]
    },
    {"period": {"start": "2020-01-01", "end": "2021-01-01"}},  # expired
]


def _all(c: FlaskClient, query: str) -> list[dict[str, Any]]:
    bundle = c.get(query).get_json()
    assert bundle["resourceType"] == "Bundle", bundle
    found = [e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]
    assert bundle["total"] == len(found)  # one page: the totals in these worlds are small
    return found


def _check(app: Flask, every: dict[str, set[str]]) -> dict[str, dict[str, set[str]]]:
    """Every path against the plain search, for every client; returns what each saw."""
    seen: dict[str, dict[str, set[str]]] = {}
    for who in CLIENTS:
        c = client_as(app, who)
        seen[who] = {}
        for rtype in TYPES:
            r = c.get(f"/fhir/{rtype}?_count=1000")
            if r.status_code == 403:  # the type itself is not this role's: never any id
                assert all(c.get(f"/fhir/{rtype}/{i}").status_code == 403 for i in every[rtype])
                continue
            ids = {res["id"] for res in _all(c, f"/fhir/{rtype}?_count=1000")}
            seen[who][rtype] = ids
            count = c.get(f"/fhir/{rtype}?_summary=count").get_json()["total"]
            assert count == len(ids), (who, rtype)
            for rid in every[rtype]:
                read = c.get(f"/fhir/{rtype}/{rid}").status_code
                assert (read == 200) == (rid in ids), (who, rtype, rid, read)
                assert read in (200, 404)
                by_id = c.get(f"/fhir/{rtype}?_id={rid}").get_json()["total"]
                assert by_id == (1 if rid in ids else 0), (who, rtype, rid)
        if "Observation" in seen[who] and "Patient" in seen[who]:
            bundle = c.get("/fhir/Observation?_include=Observation:subject&_count=1000").get_json()
            included = {
                e["resource"]["id"]
                for e in bundle.get("entry", [])
                if e["search"]["mode"] == "include"
            }
            assert included <= seen[who]["Patient"], who
    return seen


def _export(app: Flask, who: str) -> dict[str, set[str]]:
    c = client_as(app, who)
    r = c.get("/fhir/$export?_type=Patient,Observation", headers={"Prefer": "respond-async"})
    assert r.status_code == 202, r.get_json()
    status = r.headers["Content-Location"]
    for _ in range(200):
        poll = c.get(status)
        if poll.status_code == 200:
            break
        time.sleep(0.05)
    manifest = poll.get_json()
    out: dict[str, set[str]] = {"Patient": set(), "Observation": set()}
    for item in manifest["output"]:
        response = c.get(item["url"])
        text = response.get_data(as_text=True)
        response.close()
        out[item["type"]] |= {json.loads(line)["id"] for line in text.splitlines() if line}
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_path_agrees_with_the_plain_search(app: Flask, seed: int) -> None:
    rng = random.Random(seed)
    world = World(app)
    staff = world.staff
    patients = list(world.patient.values())
    # A few more participants, referred by either clinic.
    for n in range(rng.randint(1, 3)):
        clinic, c = rng.choice((("CLINIC-7", world.referrer), ("CLINIC-8", world.other)))
        r = native(c, "referrals", referral(clinic, f"P{seed}{n}", phn(40000000 + 97 * n + seed)))
        assert r.status_code == 201, r.get_json()
        task = next(
            e["resource"]
            for e in staff.get("/fhir/Task?_count=100").get_json()["entry"]
            if e["resource"]["identifier"][0]["value"] == f"P{seed}{n}"
        )
        patients.append(task["for"]["reference"].split("/")[1])
    for step in range(6):
        action = rng.choice(("observation", "consent", "revoke", "move"))
        patient = rng.choice(patients)
        if action == "observation":
            when = f"2026-{rng.randint(1, 9):02d}-{rng.randint(1, 28):02d}"
            r = fhir(staff, "POST", "/fhir/Observation", observation(patient, when))
        elif action == "consent":
            narrowing = dict(rng.choice(NARROWINGS))
            r = fhir(staff, "POST", "/fhir/Consent", consent_for(patient, "HA-ISLAND", **narrowing))
        elif action == "revoke":
            consents = _all(staff, "/fhir/Consent?status=active&_count=1000")
            if not consents:
                continue
            body = rng.choice(consents) | {"status": "inactive"}
            body.pop("meta")
            r = fhir(staff, "PUT", f"/fhir/Consent/{body['id']}", body)
        else:
            scores = _all(staff, f"/fhir/Observation?code={PHQ9_TOTAL['code']}&_count=1000")
            body = rng.choice(scores) | {"subject": {"reference": f"Patient/{patient}"}}
            body.pop("meta")
            r = fhir(staff, "PUT", f"/fhir/Observation/{body['id']}", body)
        assert r.status_code in (200, 201), (action, r.get_json())
        if step % 2:  # every other write: the checks read every id as every client
            every = {t: {res["id"] for res in _all(staff, f"/fhir/{t}?_count=1000")} for t in TYPES}
            seen = _check(app, every)
    exported = _export(app, "ha")
    assert exported == {t: seen["ha"][t] for t in exported}
