"""Property: whatever the mix of referrals, consents (whole, narrowed, denied, revoked) and
later writes, every path a client has tells it exactly what its plain search tells it.

Seeded random worlds (reproducible: the seed is in the test id). After every other write, for each
client and each type it may read: a read answers 200 exactly for the ids its search returns, an
``_id`` search and a count agree, ``_include`` brings nothing beyond what a search of the
included type returns; at the end a Bulk ``$export`` holds the same resources as the searches.

A referrer's Patients (ADR 0027) are checked against a model kept by the test itself: the
people its own program referrals are about, whatever the referral's status, except referrals
entered in error — clinics referring the same person, withdrawals and erasures included. On
every path (read, vread, history, ``_id`` search, count, ``_include``/``_revinclude``, a
transaction ``GET``, a conditional create by PHN) a referrer gets what its plain search says."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import client_as
from tests.test_appointments import session_appointment
from tests.test_visibility import (
    PHN_A,
    PHN_B,
    PHQ9_TOTAL,
    World,
    consent_for,
    fhir,
    native,
    observation,
    phn,
    referral,
)

#: BC PHN identifier system (DOMAIN.md).
PHN_SYSTEM = "https://fhir.infoway-inforoute.ca/NamingSystem/ca-bc-patient-healthcare-id"
CLIENTS = ("ha", "referrer", "other-referrer", "staff")
TYPES = ("Patient", "Observation", "Task", "ServiceRequest", "Consent", "Group", "Appointment")
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


def _check(
    app: Flask, every: dict[str, set[str]], model: Model | None = None
) -> dict[str, dict[str, set[str]]]:
    """Every path against the plain search, for every client; returns what each saw (and
    checks each referrer's Patients against ``model``)."""
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
        if who in REFERRERS:
            _check_referrer(c, every, seen[who])
            if model is not None:
                assert seen[who]["Patient"] == model.expected(who), (who, model)
    return seen


REFERRERS = ("referrer", "other-referrer")


def _check_referrer(c: FlaskClient, every: dict[str, set[str]], seen: dict[str, set[str]]) -> None:
    """The paths a referrer has to Patients beyond read and search (ADR 0027)."""
    for rid in every["Patient"]:
        visible = rid in seen["Patient"]
        assert (c.get(f"/fhir/Patient/{rid}/_history/1").status_code == 200) == visible
        history = c.get(f"/fhir/Patient/{rid}/_history")
        assert history.status_code == (200 if visible else 404), rid
        entry = {"request": {"method": "GET", "url": f"Patient/{rid}"}}
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": [entry]}
        status = fhir(c, "POST", "/fhir", bundle).get_json()["entry"][0]["response"]["status"]
        assert status.startswith("200" if visible else "404"), (rid, status)
    # Its referrals bring their own Patients along, and the Patients only its own referrals.
    bundle = c.get("/fhir/Task?_include=Task:patient&_count=1000").get_json()
    included = {
        e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "include"
    }
    assert included <= seen["Patient"]
    bundle = c.get(
        "/fhir/Patient?_revinclude=ServiceRequest:subject&_revinclude=Task:patient&_count=1000"
    ).get_json()
    for e in bundle.get("entry", []):
        if e["search"]["mode"] == "include":
            assert e["resource"]["id"] in seen[e["resource"]["resourceType"]]
    assert bundle["total"] == len(seen["Patient"])


class Model:
    """Who referred whom, kept by the test: (clinic client, patient id, ServiceRequest id)."""

    def __init__(self) -> None:
        self.referrals: list[tuple[str, str, str]] = []
        self.erased: set[str] = set()

    def expected(self, who: str) -> set[str]:
        return {p for c, p, sr in self.referrals if c == who and sr not in self.erased}

    def __repr__(self) -> str:
        return f"Model({self.referrals}, erased={self.erased})"


def _refer(staff: FlaskClient, c: FlaskClient, clinic: str, number: str, phn_value: str) -> Any:
    """The clinic refers PHN ``phn_value`` under its referral number; returns the new Task."""
    r = native(c, "referrals", referral(clinic, number, phn_value))
    assert r.status_code in (200, 201), r.get_json()
    return next(
        e["resource"]
        for e in staff.get(
            f"/fhir/Task?_count=1000&identifier=https://emr.{clinic.lower()}.ca/r|{number}"
        ).get_json()["entry"]
    )


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
    clinics = {
        "referrer": ("CLINIC-7", world.referrer),
        "other-referrer": ("CLINIC-8", world.other),
    }
    model = Model()
    phns: dict[str, str] = {}
    for who, key, value in (("referrer", "A", PHN_A), ("other-referrer", "B", PHN_B)):
        task = staff.get(f"/fhir/Task/{world.task_id[key]}").get_json()
        model.referrals.append((who, world.patient[key], task["focus"]["reference"][15:]))
        phns[world.patient[key]] = value
    # A few more participants, referred by either clinic.
    for n in range(rng.randint(1, 3)):
        who = rng.choice(REFERRERS)
        clinic, c = clinics[who]
        value = phn(40000000 + 97 * n + seed)
        task = _refer(staff, c, clinic, f"P{seed}{n}", value)
        patient = task["for"]["reference"].split("/")[1]
        patients.append(patient)
        phns[patient] = value
        model.referrals.append((who, patient, task["focus"]["reference"][15:]))
    for step in range(8):
        action = rng.choice(
            (
                "observation",
                "consent",
                "revoke",
                "move",
                "co-refer",
                "withdraw",
                "erase",
                "appointment",
            )
        )
        patient = rng.choice(patients)
        if action == "co-refer":  # a clinic refers a person another clinic (or itself) referred
            who = rng.choice(REFERRERS)
            clinic, c = clinics[who]
            task = _refer(staff, c, clinic, f"C{seed}{step}", phns[patient])
            model.referrals.append((who, patient, task["focus"]["reference"][15:]))
            r = staff.get(f"/fhir/Task/{task['id']}")
        elif action == "withdraw":  # the referrer withdraws one of its referrals: still its own
            who, _, sr = rng.choice(model.referrals)
            task = _all(staff, f"/fhir/Task?focus=ServiceRequest/{sr}")[0]
            if task["status"] not in ("requested", "on-hold", "accepted"):
                continue
            body = task | {"status": "cancelled", "statusReason": {"text": "Patient moved away"}}
            body.pop("meta")
            r = fhir(clinics[who][1], "PUT", f"/fhir/Task/{task['id']}", body)
        elif action == "erase":  # the program marks a referral entered in error
            _, _, sr = rng.choice(model.referrals)
            body = staff.get(f"/fhir/ServiceRequest/{sr}").get_json() | {
                "status": "entered-in-error"
            }
            body.pop("meta")
            r = fhir(staff, "PUT", f"/fhir/ServiceRequest/{sr}", body)
            model.erased.add(sr)
        elif action == "appointment":  # a KaT session booked for the participant
            when = f"2027-{rng.randint(1, 9):02d}-{rng.randint(1, 28):02d}T09:00:00-08:00"
            booking = session_appointment(patient, when, rng.randint(1, 3))
            r = fhir(staff, "POST", "/fhir/Appointment", booking)
        elif action == "observation":
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
            seen = _check(app, every, model)
    exported = _export(app, "ha")
    assert exported == {t: seen["ha"][t] for t in exported}
    # A referrer's conditional create of a Patient by PHN: the one it sees is answered (200,
    # naming it); for one it does not see the answer is exactly that for a PHN never held
    # (a bare Patient of nobody it referred: 403, nothing stored) — ADR 0027, ADR 0015.
    never = phn(77777777)
    for who in REFERRERS:
        c = clinics[who][1]
        for patient, value in [*phns.items(), ("never", never)]:
            answer = _conditional_patient(c, value)
            if patient in seen[who]["Patient"]:
                assert answer["response"]["status"].startswith("200"), (who, answer)
                assert f"Patient/{patient}/" in answer["response"]["location"]
            else:
                assert _normalised(answer, value) == _normalised(
                    _conditional_patient(c, never), never
                ), who
    assert staff.get("/fhir/Patient?_summary=count").get_json()["total"] == len(every["Patient"])


def _conditional_patient(c: FlaskClient, value: str) -> dict[str, Any]:
    """The one entry of a batch creating a Patient with PHN ``value`` unless one exists."""
    ident = {"system": PHN_SYSTEM, "value": value}
    entry = {
        "resource": {"resourceType": "Patient", "identifier": [ident]},
        "request": {
            "method": "POST",
            "url": "Patient",
            "ifNoneExist": f"identifier={PHN_SYSTEM}|{value}",
        },
    }
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [entry]}
    answer = fhir(c, "POST", "/fhir", bundle).get_json()
    assert len(answer["entry"]) == 1, answer  # one answer per entry
    found: dict[str, Any] = answer["entry"][0]
    return found


def _normalised(answer: dict[str, Any], value: str) -> str:
    return json.dumps(answer).replace(value, "X")
