"""Every safety signal of docs/safety.md, through the native API and through FHIR: each test
asserts the stored record, the Flag (category safety, business identifier, flag-detail at the
trigger, code of kat-safety) and its delivery row for the care team — and that an entry error
is refused with nothing stored. Then the Flag lifecycle (acknowledge, resolve, never reopened
or deleted) and the open-Flags search the workspace uses."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from fhir_kat.app import create_app
from fhir_kat.clinical.safety import FLAG_DETAIL, FLAG_IDS, SAFETY_SYSTEM
from fhir_kat.exchange import outbox as ob
from fhir_kat.mapping.engine import deterministic_id
from fhir_kat.settings import Settings
from tests.conftest import HA_ORG, client_as
from tests.support.clinical import adverse_event, phq9_response
from tests.support.conformance import assert_conformant

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
PHN = "9999999998"
#: Ids derived from business identifiers are keyed by the installation (docs/security.md):
#: ``keyed_ids`` sets these for each test's app.
NAMESPACE = uuid.UUID(int=0)
PID = ""
REFERRAL_SYSTEM = "https://emr.example-clinic.ca/referrals"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
STAFF = {
    "family_name": "Nurseperson",
    "given_names": ["Sam"],
    "identifier": {"system": "https://fhir-kat.example.org/fhir/sid/staff", "value": "RPN-0042"},
}
PARTNERS = {
    # The program's own care team: every Flag at once, no consent asked.
    "care-team": {
        "base_url": "https://care.example.test/fhir",
        "artifact_kinds": ["safety-flags"],
        "care_team": True,
    },
    # The health authority: every kind, each patient delivery consent-checked at send time.
    "ha": {"base_url": "https://ha.example.test/fhir", "organization": HA_ORG},
}


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    global NAMESPACE, PID
    configured = replace(settings, extra={**settings.extra, "partners": PARTNERS})
    application = create_app(configured)
    NAMESPACE = application.extensions["fhir_kat"].artifacts.id_namespace
    PID = did("Patient", PHN)
    yield application
    application.extensions["fhir_kat"].export.shutdown()
    application.extensions["fhir_kat"].store.dispose()


def did(*parts: Any) -> str:
    """The id the service gives these business identifiers (its keyed namespace)."""
    return deterministic_id(*parts, namespace=NAMESPACE)


def example(name: str, /, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((EXAMPLES / f"{name}.json").read_text())
    body.update(changes)
    return body


def post(c: FlaskClient, kind: str, body: dict[str, Any], status: int = 201) -> Any:
    r = c.post(f"/api/v1/{kind}", data=json.dumps(body), content_type="application/json")
    assert r.status_code == status, r.get_json()
    return r.get_json()


def fhir_put(c: FlaskClient, resource: dict[str, Any], status: int = 201) -> Any:
    r = c.put(
        f"/fhir/{resource['resourceType']}/{resource['id']}",
        data=json.dumps(resource),
        content_type="application/fhir+json",
    )
    assert r.status_code == status, r.get_json()
    return r.get_json()


def referral(c: FlaskClient, value: str = "R-7781", **changes: Any) -> None:
    body = example("referrals", **changes)
    body["referral_identifier"] = {"system": REFERRAL_SYSTEM, "value": value}
    body["source_id"] = f"REF-{value}"
    post(c, "referrals", body)


def intake_complete(c: FlaskClient, value: str = "R-7781") -> None:
    """The three intake steps of the paper, each cleared, and the treatment consent."""
    for n, step in enumerate(("nurse-intake", "psychiatrist-clearance", "contraindication-check")):
        post(
            c,
            "screenings",
            example(
                "screenings",
                source_id=f"SCREEN-{value}-{n}",
                referral_identifier={"system": REFERRAL_SYSTEM, "value": value},
                step=step,
                findings=[],
            ),
        )
    treatment_consent(c)


def treatment_consent(c: FlaskClient, session: int | None = None, source: str = "C-T") -> None:
    body = example("consents", source_id=source, kind="treatment")
    body.pop("permitted_party")
    body.pop("purposes")
    if session is not None:
        body["session_number"] = session
    post(c, "consents", body)


def participant(c: FlaskClient) -> None:
    """A referred participant with a treatment consent (the example referral is eligible;
    whether intake is complete matters only to the prerequisite tests, which set it up)."""
    referral(c)
    treatment_consent(c)


def session(**changes: Any) -> dict[str, Any]:
    return copy.deepcopy(example("medication-administrations", **changes))


def flags(c: FlaskClient, code: str | None = None) -> list[dict[str, Any]]:
    bundle = c.get(f"/fhir/Flag?patient={PID}&_count=200").get_json()
    found = [e["resource"] for e in bundle.get("entry", [])]
    return [f for f in found if code is None or f["code"]["coding"][0]["code"] == code]


def assert_signal(app: Flask, c: FlaskClient, code: str, trigger: str) -> dict[str, Any]:
    """The Flag is stored as docs/safety.md says, and queued for the care team (no consent
    check: a treatment disclosure inside the program) and for the health authority (asking
    for a sharing consent for TREAT at send time)."""
    (flag,) = flags(c, code)
    assert flag["status"] == "active"
    assert flag["category"][0]["coding"][0]["code"] == "safety"
    assert flag["identifier"] == [{"system": FLAG_IDS, "value": flag["id"]}]
    assert flag["code"]["coding"][0]["system"] == SAFETY_SYSTEM
    assert flag["subject"] == {"reference": f"Patient/{PID}"}
    details = [
        e["valueReference"]["reference"] for e in flag["extension"] if e["url"] == FLAG_DETAIL
    ]
    assert details[0] == trigger, details
    assert c.get(f"/fhir/{trigger}").status_code == 200  # the trigger is stored
    assert_conformant(flag)
    store = app.extensions["fhir_kat"].store
    rows = {d.partner: d for d in _deliveries_of(store, flag["id"])}
    assert set(rows) == {"care-team", "ha"}, rows
    assert rows["care-team"].consent_check is None
    assert rows["ha"].consent_check is not None
    assert rows["ha"].consent_check["purpose"] == "TREAT"
    return flag


def _deliveries_of(store: Any, flag_id: str) -> list[ob.Delivery]:
    """The queued deliveries that carry this Flag (claimed, then given back untouched)."""
    from sqlalchemy import select

    with store.read() as tx:
        rows = tx.conn.execute(select(ob.outbox)).all()
    out = []
    for r in rows:
        payload = json.loads(r.payload)
        resources = payload.get("artifact") if isinstance(payload, dict) else None
        if isinstance(resources, list) and any(
            res.get("resourceType") == "Flag" and res.get("id") == flag_id for res in resources
        ):
            out.append(
                ob.Delivery(
                    r.id,
                    r.partner,
                    r.kind,
                    r.patient_key,
                    payload,
                    r.attempts,
                    "",
                    json.loads(r.consent_check) if r.consent_check else None,
                    r.created_at,
                )
            )
    return out


ROUTES = ["native", "fhir"]


# ---------------------------------------------------------------------------- instruments

PHQ = ["LA6568-5", "LA6569-3", "LA6570-1", "LA6571-9"]


def phq9(values: list[int | None], source: str, when: str, status: str = "completed") -> Any:
    return {
        "source_id": source,
        "patient_phn": PHN,
        "instrument": "phq9",
        "authored": when,
        "status": status,
        "answers": [
            {"item": f"phq9-{i + 1}", "answer": PHQ[v]}
            for i, v in enumerate(values)
            if v is not None
        ],
    }


def phq9_fhir(values: list[int | None], rid: str, when: str) -> dict[str, Any]:
    return phq9_response(values, rid, when, f"Patient/{PID}")


@pytest.mark.parametrize("route", ROUTES)
def test_phq9_item9_above_zero(app: Flask, client: FlaskClient, route: str) -> None:
    participant(client)
    values: list[int | None] = [1, 1, 1, 1, 0, 0, 0, 0, 1]
    if route == "native":
        post(client, "questionnaire-responses", phq9(values, "Q1", "2026-02-01T10:00:00Z"))
        trigger = f"QuestionnaireResponse/{did('QuestionnaireResponse', 'Q1')}"
    else:
        fhir_put(client, phq9_fhir(values, "qr-1", "2026-02-01T10:00:00Z"))
        trigger = "QuestionnaireResponse/qr-1"
    assert_signal(app, client, "phq9-item9-positive", trigger)


@pytest.mark.parametrize("route", ROUTES)
def test_phq9_item9_unanswered_at_moderate_or_worse(
    app: Flask, client: FlaskClient, route: str
) -> None:
    participant(client)
    mild: list[int | None] = [1, 1, 1, 1, 0, 0, 0, 0, None]  # 4: mild, no signal
    moderate: list[int | None] = [2, 2, 2, 2, 1, 1, 0, 0, None]  # 10: moderate
    if route == "native":
        # A completed response must answer item 9 (422); a partial one is stored.
        post(
            client,
            "questionnaire-responses",
            phq9(moderate, "Q0", "2026-02-01T10:00:00Z"),
            status=422,
        )
        post(
            client,
            "questionnaire-responses",
            phq9(mild, "Q1", "2026-02-01T10:00:00Z", "in-progress"),
        )
        assert flags(client) == []
        post(
            client,
            "questionnaire-responses",
            phq9(moderate, "Q2", "2026-02-02T10:00:00Z", "in-progress"),
        )
        trigger = f"QuestionnaireResponse/{did('QuestionnaireResponse', 'Q2')}"
    else:
        fhir_put(client, phq9_fhir(mild, "qr-1", "2026-02-01T10:00:00Z"))
        assert flags(client) == []
        fhir_put(client, phq9_fhir(moderate, "qr-2", "2026-02-02T10:00:00Z"))
        trigger = "QuestionnaireResponse/qr-2"
    flag = assert_signal(app, client, "phq9-item9-unanswered", trigger)
    assert "add up to 10" in flag["code"]["text"]
    # No total was scored (no prorating): the Flag is the only trace of the risk.
    total = client.get(f"/fhir/Observation?patient={PID}&code={LOINC}|44261-6").get_json()
    assert total["total"] == 0


@pytest.mark.parametrize("route", ROUTES)
def test_phq9_rise(app: Flask, client: FlaskClient, route: str) -> None:
    participant(client)
    first: list[int | None] = [1, 1, 1, 1, 1, 0, 0, 0, 0]  # 5
    later: list[int | None] = [2, 2, 2, 1, 1, 1, 1, 0, 0]  # 10: +5
    if route == "native":
        post(client, "questionnaire-responses", phq9(first, "Q1", "2026-02-01T10:00:00Z"))
        post(client, "questionnaire-responses", phq9(later, "Q2", "2026-03-01T10:00:00Z"))
        trigger = f"QuestionnaireResponse/{did('QuestionnaireResponse', 'Q2')}"
    else:
        fhir_put(client, phq9_fhir(first, "qr-1", "2026-02-01T10:00:00Z"))
        fhir_put(client, phq9_fhir(later, "qr-2", "2026-03-01T10:00:00Z"))
        trigger = "QuestionnaireResponse/qr-2"
    flag = assert_signal(app, client, "phq9-rise", trigger)
    assert "5 -> 10" in flag["code"]["text"]


# ---------------------------------------------------------------------------- vital signs


def bp_observation(oid: str, systolic: int, diastolic: int, when: str) -> dict[str, Any]:
    def component(code: str, value: int) -> dict[str, Any]:
        return {
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "valueQuantity": {"value": value, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
        }

    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
        "subject": {"reference": f"Patient/{PID}"},
        "effectiveDateTime": when,
        "component": [component("8480-6", systolic), component("8462-4", diastolic)],
    }


def simple_observation(oid: str, code: str, value: float, unit: str, when: str) -> dict[str, Any]:
    obs = bp_observation(oid, 0, 0, when)
    del obs["component"]
    obs["code"] = {"coding": [{"system": LOINC, "code": code}]}
    obs["valueQuantity"] = {"value": value, "unit": unit, "system": UCUM, "code": unit}
    return obs


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("systolic_mmhg", 180, "systolic-bp-high"),
        ("diastolic_mmhg", 110, "diastolic-bp-high"),
        ("spo2_percent", 89, "spo2-low"),
    ],
)
def test_vital_signs_beyond_limits(
    app: Flask, client: FlaskClient, route: str, field: str, value: int, code: str
) -> None:
    participant(client)
    when = "2026-02-10T12:50:00-08:00"
    if route == "native":
        body = session()
        body["vital_signs_before"][field] = value
        if field == "diastolic_mmhg":
            body["vital_signs_before"]["systolic_mmhg"] = 190  # keeps it a possible reading
        post(client, "medication-administrations", body)
        source = body["source_id"]
        part = "85354-9" if field != "spo2_percent" else field
        trigger = f"Observation/{did('Observation', source, 'before', part)}"
    else:
        if field == "spo2_percent":
            # 2708-6 alone (the R4 vital-signs profile's code) is read as SpO2 too.
            obs = simple_observation("o-spo2", "2708-6", value, "%", when)
        else:
            systolic = value if field == "systolic_mmhg" else 190
            obs = bp_observation("o-bp", systolic, value if field == "diastolic_mmhg" else 80, when)
        fhir_put(client, obs)
        trigger = f"Observation/{obs['id']}"
    flag = assert_signal(app, client, code, trigger)
    assert str(value) in flag["code"]["text"]
    # Its urgency is the rules' (safety.yaml flag_priority), carried and narrated on the Flag.
    (priority,) = [x for x in flag["extension"] if x["url"].endswith("/flag-priority")]
    assert priority["valueCodeableConcept"]["coding"][0]["code"] == "PM"
    assert "Medium priority (program decision awaiting clinical review)" in flag["text"]["div"]
    # One below the limit (or at it, for "below") raises nothing more.
    assert len(flags(client, code)) == 1


@pytest.mark.parametrize("route", ROUTES)
def test_a_diastolic_above_the_systolic_is_refused_and_nothing_is_stored(
    app: Flask, client: FlaskClient, route: str
) -> None:
    participant(client)
    if route == "native":
        body = session()
        body["vital_signs_after"].update(systolic_mmhg=80, diastolic_mmhg=120)
        outcome = post(client, "medication-administrations", body, status=422)
        assert outcome["issue"][0]["expression"] == ["vital_signs_after.diastolic_mmhg"]
        stored = client.get(f"/fhir/MedicationAdministration?patient={PID}").get_json()
        assert stored["total"] == 0
    else:
        r = client.put(
            "/fhir/Observation/o-bp",
            data=json.dumps(bp_observation("o-bp", 80, 120, "2026-02-10T12:50:00Z")),
            content_type="application/fhir+json",
        )
        assert r.status_code == 422
        assert "entry error" in r.get_json()["issue"][0]["diagnostics"]
        assert client.get("/fhir/Observation/o-bp").status_code == 404
    assert flags(client) == []


# ---------------------------------------------------------------------------- dose and weight


def fhir_session(mid: str, dose_mg: float, route_code: str, **extra: Any) -> dict[str, Any]:
    routes = {"intramuscular": "78421000", "oral-lozenge": "26643006"}
    ma: dict[str, Any] = {
        "resourceType": "MedicationAdministration",
        "id": mid,
        "status": "completed",
        "medicationCodeableConcept": {
            "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "6130"}]
        },
        "subject": {"reference": f"Patient/{PID}"},
        "effectivePeriod": {"start": "2026-02-10T13:00:00-08:00"},
        "dosage": {
            "route": {"coding": [{"system": "http://snomed.info/sct", "code": routes[route_code]}]},
            "dose": {"value": dose_mg, "unit": "mg", "system": UCUM, "code": "mg"},
        },
    }
    ma.update(extra)
    return ma


@pytest.mark.parametrize("route", ROUTES)
def test_a_dose_above_the_hard_ceiling_even_with_an_override(
    app: Flask, client: FlaskClient, route: str
) -> None:
    participant(client)
    if route == "native":
        body = session(dose_mg=700.0)  # 10 mg/kg at 70 kg
        body["dose_override"] = {
            "reason": "participant request",
            "clinician": body["administered_by"],
        }
        post(client, "medication-administrations", body)
        mid = did("MedicationAdministration", body["source_id"])
        trigger = f"MedicationAdministration/{mid}"
    else:
        fhir_put(
            client, simple_observation("w-1", "29463-7", 70, "kg", "2026-02-10T12:45:00-08:00")
        )
        ma = fhir_session(
            "ma-1", 700.0, "intramuscular", supportingInformation=[{"reference": "Observation/w-1"}]
        )
        fhir_put(client, ma)
        trigger = "MedicationAdministration/ma-1"
    flag = assert_signal(app, client, "dose-above-ceiling", trigger)
    assert "10 mg/kg is above the ceiling of 1.5 mg/kg" in flag["code"]["text"]


@pytest.mark.parametrize("route", ROUTES)
def test_a_weight_far_from_the_earlier_ones(app: Flask, client: FlaskClient, route: str) -> None:
    participant(client)
    post(client, "medication-administrations", session())  # 70 kg on 2026-02-10
    if route == "native":
        # The next session's weight typed in pounds: 154 "kg" makes 231 mg look like 1.5 mg/kg.
        later = session(
            source_id="SESSION-3", session_number=3, body_weight_kg=154.0, dose_mg=231.0
        )
        later["start"], later["end"] = "2026-02-24T13:00:00-08:00", "2026-02-24T17:00:00-08:00"
        post(client, "medication-administrations", later)
        trigger = f"Observation/{did('Observation', 'SESSION-3', 'body-weight')}"
    else:
        obs = simple_observation("w-2", "29463-7", 154, "kg", "2026-02-24T12:45:00-08:00")
        fhir_put(client, obs)
        trigger = "Observation/w-2"
    flag = assert_signal(app, client, "body-weight-implausible", trigger)
    assert "differs by 120 % from every earlier recorded weight" in flag["code"]["text"]
    # The same weight in pounds, in UCUM, is the same person: nothing raised.
    fhir_put(
        client, simple_observation("w-3", "29463-7", 154.3, "[lb_av]", "2026-03-01T12:45:00-08:00")
    )
    assert len(flags(client, "body-weight-implausible")) == 1


# ---------------------------------------------------------------------------- adverse events


def fhir_adverse_event(aid: str, kind: str | None, seriousness: str | None) -> dict[str, Any]:
    return adverse_event(kind, seriousness, f"Patient/{PID}", id=aid)


@pytest.mark.parametrize("route", [*ROUTES, "in-session"])
@pytest.mark.parametrize(
    ("kind", "seriousness", "code"),
    [
        ("suicidality", "Non-serious", "adverse-event-suicidality"),
        ("worsening-symptoms", "Non-serious", "adverse-event-worsening-symptoms"),
        ("hospitalisation", "SeriousResultsInHospitalization", "adverse-event-hospitalisation"),
        ("emergency-visit", "Serious", "adverse-event-emergency-visit"),
        ("emergence-reaction", "Non-serious", "adverse-event-emergence-reaction"),
        ("nausea", "Serious", "adverse-event-serious"),
    ],
)
def test_adverse_events_that_need_a_clinician(
    app: Flask, client: FlaskClient, route: str, kind: str, seriousness: str, code: str
) -> None:
    participant(client)
    post(client, "medication-administrations", session())
    if route == "native":
        # Reported on its own, days after the session, linked to it.
        report = example("adverse-events", kind=kind, seriousness=seriousness)
        post(client, "adverse-events", report)
        aid = did("AdverseEvent", "report", report["source_id"])
        ae = client.get(f"/fhir/AdverseEvent/{aid}").get_json()
        session_id = did("MedicationAdministration", "SESSION-2026-0002")
        assert ae["suspectEntity"][0]["instance"]["reference"] == (
            f"MedicationAdministration/{session_id}"
        )
        assert ae["severity"]["coding"][0]["code"] == "moderate"
        trigger = f"AdverseEvent/{aid}"
    elif route == "in-session":
        body = session(source_id="SESSION-AE")
        body["adverse_events"] = [{"kind": kind, "serious": seriousness != "Non-serious"}]
        post(client, "medication-administrations", body)
        trigger = f"AdverseEvent/{did('AdverseEvent', 'SESSION-AE', 0)}"
    else:
        fhir_put(client, fhir_adverse_event("ae-1", kind, seriousness))
        trigger = "AdverseEvent/ae-1"
    flag = assert_signal(app, client, code, trigger)
    assert flag["period"]["start"]


def test_adverse_events_a_rule_cannot_classify_go_to_a_clinician(
    app: Flask, client: FlaskClient
) -> None:
    participant(client)
    fhir_put(client, fhir_adverse_event("ae-text", None, "Non-serious"))
    fhir_put(client, fhir_adverse_event("ae-unstated", "nausea", None))
    fhir_put(client, fhir_adverse_event("ae-plain", "nausea", "Non-serious"))
    raised = flags(client, "adverse-event-unclassified")
    triggers = sorted(
        e["valueReference"]["reference"]
        for f in raised
        for e in f["extension"]
        if e["url"] == FLAG_DETAIL
    )
    assert triggers == ["AdverseEvent/ae-text", "AdverseEvent/ae-unstated"]
    # Raised blood pressure coded only in SNOMED CT (24184005) is classified: not serious.
    snomed = fhir_adverse_event("ae-bp", None, "Non-serious")
    snomed["event"]["coding"] = [{"system": "http://snomed.info/sct", "code": "24184005"}]
    fhir_put(client, snomed)
    assert len(flags(client, "adverse-event-unclassified")) == 2


def test_a_report_for_a_session_that_is_not_stored_is_refused(client: FlaskClient) -> None:
    participant(client)
    report = example("adverse-events", session_source_id="NO-SUCH-SESSION")
    outcome = post(client, "adverse-events", report, status=422)
    assert {i["code"] for i in outcome["issue"]} == {"not-found"}
    assert flags(client) == []


# ---------------------------------------------------------------------------- prerequisites


@pytest.mark.parametrize("route", ROUTES)
def test_dosing_for_a_rejected_referral(app: Flask, client: FlaskClient, route: str) -> None:
    referral(client, contraindications=[{"code": "psychosis"}])
    treatment_consent(client)
    task = client.get(f"/fhir/Task?patient={PID}").get_json()["entry"][0]["resource"]
    assert task["status"] == "rejected"
    trigger = _dose(client, route)
    flag = assert_signal(app, client, "dosing-referral-rejected", trigger)
    details = [e["valueReference"]["reference"] for e in flag["extension"] if "valueReference" in e]
    assert f"Task/{task['id']}" in details


@pytest.mark.parametrize("route", ROUTES)
def test_dosing_before_intake_is_complete(app: Flask, client: FlaskClient, route: str) -> None:
    referral(client, flags=[{"code": "extreme-emotional-lability", "value": True}])
    treatment_consent(client)
    task = client.get(f"/fhir/Task?patient={PID}").get_json()["entry"][0]["resource"]
    assert task["status"] not in ("accepted", "in-progress")
    assert_signal(app, client, "dosing-intake-incomplete", _dose(client, route))


@pytest.mark.parametrize("route", ROUTES)
def test_dosing_without_a_referral_or_a_treatment_consent(
    app: Flask, client: FlaskClient, route: str
) -> None:
    # The Patient only (as an earlier artifact would leave it): no referral, no consent.
    fhir_put(client, {"resourceType": "Patient", "id": PID})
    trigger = _dose(client, route)
    assert_signal(app, client, "dosing-without-referral", trigger)
    assert_signal(app, client, "dosing-without-treatment-consent", trigger)


@pytest.mark.parametrize("route", ROUTES)
def test_a_session_with_its_prerequisites_raises_nothing(client: FlaskClient, route: str) -> None:
    """Referral accepted after the three intake steps, a treatment consent, a dose and vital
    signs inside the limits: the session is stored and no Flag is raised."""
    referral(client)
    intake_complete(client)
    _dose(client, route)
    assert flags(client) == []


def test_a_treatment_consent_for_another_session_does_not_cover_this_one(
    app: Flask, client: FlaskClient
) -> None:
    referral(client)
    intake_complete_without_consent(client)
    treatment_consent(client, session=3, source="C-3")
    trigger = _dose(client, "native")  # session 2
    assert_signal(app, client, "dosing-without-treatment-consent", trigger)
    treatment_consent(client, session=2, source="C-2")
    post(client, "medication-administrations", session(source_id="SESSION-2B"))
    assert len(flags(client, "dosing-without-treatment-consent")) == 1
    consent = client.get(f"/fhir/Consent/{did('Consent', 'C-2')}").get_json()
    assert consent["extension"][0]["valueInteger"] == 2


def intake_complete_without_consent(c: FlaskClient) -> None:
    for n, step in enumerate(("nurse-intake", "psychiatrist-clearance", "contraindication-check")):
        post(c, "screenings", example("screenings", source_id=f"S-{n}", step=step, findings=[]))


def _dose(c: FlaskClient, route: str) -> str:
    if route == "native":
        body = session()
        post(c, "medication-administrations", body)
        mid = did("MedicationAdministration", body["source_id"])
        return f"MedicationAdministration/{mid}"
    fhir_put(c, fhir_session("ma-1", 84.0, "intramuscular"))
    return "MedicationAdministration/ma-1"


# ---------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("number", [1, 4])
def test_a_session_off_the_schedule_is_recorded_and_flagged(
    app: Flask, client: FlaskClient, route: str, number: int
) -> None:
    participant(client)
    if route == "native":
        body = session(session_number=number)
        outcome = post(client, "medication-administrations", body, status=422)
        assert "schedule_deviation" in outcome["issue"][0]["diagnostics"]
        body["schedule_deviation"] = {
            "reason": "synthetic reason",
            "clinician": body["administered_by"],
        }
        post(client, "medication-administrations", body)
        mid = did("MedicationAdministration", body["source_id"])
        ma = client.get(f"/fhir/MedicationAdministration/{mid}").get_json()
        deviation = next(e for e in ma["extension"] if e["url"].endswith("/schedule-deviation"))
        parts = {p["url"]: p for p in deviation["extension"]}
        assert parts["reason"]["valueString"] == "synthetic reason"
        assert parts["clinician"]["valueReference"]["reference"].startswith("Practitioner/")
        trigger = f"MedicationAdministration/{mid}"
    else:
        number_ext = {
            "url": "https://fhir-kat.example.org/fhir/StructureDefinition/session-number",
            "valueInteger": number,
        }
        fhir_put(client, fhir_session("ma-9", 84.0, "intramuscular", extension=[number_ext]))
        trigger = "MedicationAdministration/ma-9"
    flag = assert_signal(app, client, "schedule-deviation", trigger)
    assert f"session {number}" in flag["code"]["text"]


# ---------------------------------------------------------------------------- lifecycle


@pytest.fixture
def raised(app: Flask, client: FlaskClient) -> dict[str, Any]:
    participant(client)
    post(
        client,
        "questionnaire-responses",
        phq9([1, 1, 1, 1, 0, 0, 0, 0, 2], "Q1", "2026-02-01T10:00:00Z"),
    )
    (flag,) = flags(client, "phq9-item9-positive")
    return flag


def test_staff_acknowledge_then_resolve_a_flag(client: FlaskClient, raised: dict[str, Any]) -> None:
    open_ones = client.get("/fhir/Flag?status=active&category=safety").get_json()
    assert [e["resource"]["id"] for e in open_ones["entry"]] == [raised["id"]]
    ack = client.post(
        f"/api/v1/flags/{raised['id']}/$acknowledge",
        data=json.dumps({"by": STAFF, "note": "called the participant"}),
        content_type="application/json",
    )
    assert ack.status_code == 200, ack.get_json()
    flag = ack.get_json()
    assert flag["status"] == "active"
    record = next(e for e in flag["extension"] if e["url"].endswith("/flag-acknowledgement"))
    parts = {p["url"]: p for p in record["extension"]}
    assert parts["note"]["valueString"] == "called the participant"
    assert parts["at"]["valueDateTime"]
    who = client.get(f"/fhir/{parts['by']['valueReference']['reference']}").get_json()
    assert who["identifier"][0]["value"] == "RPN-0042"
    done = client.post(
        f"/api/v1/flags/{raised['id']}/$resolve",
        data=json.dumps({"by": STAFF, "note": "safety plan in place"}),
        content_type="application/json",
    ).get_json()
    assert done["status"] == "inactive" and done["period"]["end"]
    assert_conformant(done)
    assert client.get("/fhir/Flag?status=active&category=safety").get_json()["total"] == 0
    assert client.get("/fhir/Flag?status=inactive").get_json()["total"] == 1
    again = client.post(
        f"/api/v1/flags/{raised['id']}/$resolve",
        data=json.dumps({"by": STAFF}),
        content_type="application/json",
    )
    assert again.status_code == 409
    # The same trigger written again raises nothing new, and does not reopen the Flag.
    post(
        client,
        "questionnaire-responses",
        phq9([1, 1, 1, 1, 0, 0, 0, 1, 2], "Q1", "2026-02-01T10:00:00Z"),
        status=200,
    )
    (still,) = flags(client, "phq9-item9-positive")
    assert still["status"] == "inactive"


def test_the_flag_lifecycle_through_fhir(client: FlaskClient, raised: dict[str, Any]) -> None:
    def put(body: dict[str, Any]) -> Any:
        return client.put(
            f"/fhir/Flag/{raised['id']}",
            data=json.dumps(body),
            content_type="application/fhir+json",
        )

    flag = {k: v for k, v in raised.items() if k != "meta"}
    # Resolving needs period.end and who/when (one issue each).
    r = put({**flag, "status": "inactive"})
    assert r.status_code == 422
    assert {i["expression"][0] for i in r.get_json()["issue"]} == {
        "Flag.period.end",
        "Flag.extension",
    }
    # The trigger is fixed.
    r = put({**flag, "code": {"text": "something else"}})
    assert r.status_code == 422
    resolution = {
        "url": "https://fhir-kat.example.org/fhir/StructureDefinition/flag-resolution",
        "extension": [
            {"url": "by", "valueReference": {"display": "Sam Nurseperson"}},
            {"url": "at", "valueDateTime": "2026-02-02T10:00:00Z"},
        ],
    }
    resolved = {
        **flag,
        "status": "inactive",
        "period": {**flag["period"], "end": "2026-02-02T10:00:00Z"},
        "extension": [*flag["extension"], resolution],
    }
    assert put(resolved).status_code == 200
    assert put({**resolved, "status": "active"}).status_code == 409  # not reopened
    assert client.delete(f"/fhir/Flag/{raised['id']}").status_code == 405  # never deleted
    assert client.get(f"/fhir/Flag/{raised['id']}").get_json()["status"] == "inactive"


def test_acting_on_flags_needs_a_staff_role_and_a_who(
    app: Flask, client: FlaskClient, raised: dict[str, Any]
) -> None:
    r = client.post(
        f"/api/v1/flags/{raised['id']}/$resolve",
        data=json.dumps({"note": "no one"}),
        content_type="application/json",
    )
    assert r.status_code == 422 and r.get_json()["issue"][0]["expression"] == ["by"]
    ha = client_as(app, "ha")
    r = ha.post(
        f"/api/v1/flags/{raised['id']}/$resolve",
        data=json.dumps({"by": STAFF}),
        content_type="application/json",
    )
    assert r.status_code == 403
    assert (
        client.post(
            "/api/v1/flags/no-such-flag/$acknowledge",
            data=json.dumps({"by": STAFF}),
            content_type="application/json",
        ).status_code
        == 404
    )


# ---------------------------------------------------------------------------- who is told


def test_the_care_team_gets_flags_at_once_and_an_outside_party_under_treat_consent(
    app: Flask, client: FlaskClient, raised: dict[str, Any]
) -> None:
    """Safety Flags are a treatment disclosure: the care team (care_team = true) gets them
    without a sharing consent; the health authority only under a sharing consent naming it
    for TREAT (a HOPERAT-only consent does not release them)."""
    import responses

    from fhir_kat.exchange.worker import DeliveryWorker
    from fhir_kat.security.consent import ConsentDecisionPoint
    from fhir_kat.services.delivery import make_consent_gate

    state = app.extensions["fhir_kat"]
    gate = make_consent_gate(state.store, ConsentDecisionPoint(), state.clock)
    sent: dict[str, list[Any]] = {"care": [], "ha": []}

    def answer(name: str) -> Callable[[Any], tuple[int, dict[str, str], str]]:
        def reply(request: Any) -> tuple[int, dict[str, str], str]:
            body = json.loads(request.body)
            sent[name].append(body)
            entries = [{"response": {"status": "201 Created"}} for _ in body["entry"]]
            return (
                200,
                {},
                json.dumps(
                    {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}
                ),
            )

        return reply

    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add_callback(responses.POST, "https://care.example.test/fhir", callback=answer("care"))
        mock.add_callback(responses.POST, "https://ha.example.test/fhir", callback=answer("ha"))
        worker = DeliveryWorker(
            state.store, state.partners, gate, state.clock, lambda _s: None, batch_size=100
        )

        def drain() -> None:  # one delivery per partner and patient at a time: in order
            while worker.run_once().claimed:
                pass

        drain()
        flag_sent = [
            b
            for b in sent["care"]
            if any(e["resource"]["resourceType"] == "Flag" for e in b["entry"])
        ]
        assert len(flag_sent) == 1
        types = [e["resource"]["resourceType"] for e in flag_sent[0]["entry"]]
        assert types == ["Flag", "Patient"]
        flag_entry = flag_sent[0]["entry"][0]
        assert flag_entry["request"]["ifNoneExist"].startswith("identifier=")
        # The trigger travels as a logical reference: the care team need not hold our QR.
        detail = flag_entry["resource"]["extension"][0]["valueReference"]
        assert detail["type"] == "QuestionnaireResponse" and "identifier" in detail
        assert not any(
            e["resource"]["resourceType"] == "Flag" for b in sent["ha"] for e in b["entry"]
        )
        store = state.store
        (to_ha,) = [d for d in _deliveries_of(store, raised["id"]) if d.partner == "ha"]
        assert ob.get_delivery(store, to_ha.id).status == "blocked-consent"
        # A sharing consent naming the health authority for operations only: still blocked.
        share = example("consents", source_id="C-HA-OPS", purposes=["HOPERAT"])
        post(client, "consents", share)
        drain()
        assert ob.get_delivery(store, to_ha.id).status == "blocked-consent"
        post(client, "consents", example("consents", source_id="C-HA-TREAT", purposes=["TREAT"]))
        drain()
        assert ob.get_delivery(store, to_ha.id).status == "delivered"


def test_a_fhir_create_of_an_adverse_event_raises_the_same_flag(
    app: Flask, client: FlaskClient
) -> None:
    """``POST /fhir/AdverseEvent`` (server-assigned id) is a path like any other."""
    participant(client)
    body = fhir_adverse_event("ignored", "hospitalisation", "SeriousResultsInHospitalization")
    del body["id"]
    r = client.post(
        "/fhir/AdverseEvent", data=json.dumps(body), content_type="application/fhir+json"
    )
    assert r.status_code == 201
    aid = r.get_json()["id"]
    assert_signal(app, client, "adverse-event-hospitalisation", f"AdverseEvent/{aid}")


def test_session_1_given_im_with_a_clinician_override_is_recorded_and_flagged(
    app: Flask, client: FlaskClient
) -> None:
    """The issue's probe: session 1 given intramuscularly with a dose_override (reason and
    clinician) was refused; it is recorded, the override standing for the deviation."""
    participant(client)
    body = session(session_number=1)
    body["dose_override"] = {
        "reason": "lozenge not tolerated",
        "clinician": body["administered_by"],
    }
    post(client, "medication-administrations", body)
    mid = did("MedicationAdministration", body["source_id"])
    flag = assert_signal(app, client, "schedule-deviation", f"MedicationAdministration/{mid}")
    assert "Recorded reason: lozenge not tolerated" in flag["code"]["text"]


def test_what_the_service_writes_carries_a_true_narrative(
    client: FlaskClient, raised: dict[str, Any]
) -> None:
    """R4 dom-6 on the service's own writes (the Task, score Observations, their Provenance,
    the Flag), and the narrative follows the resource when the service changes it: a resolved
    Flag's narrative says inactive."""
    from fhir_kat.mapping.narrative import narrative

    def generated(resource: dict[str, Any]) -> bool:
        body = {k: v for k, v in resource.items() if k not in ("text", "meta")}
        return resource.get("text") == narrative(dict(body, meta=resource.get("meta")))

    for rtype in ("Task", "Observation", "Provenance", "Flag", "QuestionnaireResponse"):
        found = client.get(f"/fhir/{rtype}?_count=100").get_json()
        assert found["total"] > 0, rtype
        for entry in found["entry"]:
            resource = entry["resource"]
            assert resource.get("text", {}).get("status") == "generated", rtype
            assert "<table>" in resource["text"]["div"] or rtype == "QuestionnaireResponse"
    assert generated(client.get(f"/fhir/Flag/{raised['id']}").get_json())
    assert "<td>active</td>" in raised["text"]["div"]
    done = client.post(
        f"/api/v1/flags/{raised['id']}/$resolve",
        data=json.dumps({"by": STAFF, "note": "safety plan in place"}),
        content_type="application/json",
    ).get_json()
    assert (
        "<td>inactive</td>" in done["text"]["div"] and "<td>active</td>" not in done["text"]["div"]
    )
    assert generated(done)
    # A client's own narrative is never replaced.
    mine = {"status": "additional", "div": '<div xmlns="http://www.w3.org/1999/xhtml">mine</div>'}
    patient = client.get("/fhir/Patient?_count=1").get_json()["entry"][0]["resource"]
    patient.pop("meta")
    kept = client.put(
        f"/fhir/Patient/{patient['id']}",
        data=json.dumps(dict(patient, text=mine, gender="unknown")),
        content_type="application/fhir+json",
    )
    assert kept.status_code == 200, kept.get_json()
    assert kept.get_json()["text"] == mine
