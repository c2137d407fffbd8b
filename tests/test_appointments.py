"""KaT treatment sessions booked as FHIR ``Appointment`` (issue 19): through the FHIR API and the
write pipeline (tests run with FHIR_KAT_PIPELINE_STRICT=1), searchable by the parameters the
worklist uses (patient, date, status, service-type — advertised in the CapabilityStatement),
and under the one visibility rule: program staff see every booking, the health authority only
where the participant's consent opens it, a referrer none (not its role's)."""

from __future__ import annotations

from typing import Any

from flask import Flask

from tests.conftest import client_as
from tests.test_visibility import World, consent_for, fhir

#: kat-service#kat-session: "Ketamine-assisted therapy session" (the program's own CodeSystem,
#: mappings/terminology/CodeSystem-kat-service.json; the dosing Encounter carries it too).
SERVICE = "https://fhir-kat.example.org/fhir/CodeSystem/kat-service"
SESSION_NUMBER = "https://fhir-kat.example.org/fhir/StructureDefinition/session-number"


def session_appointment(
    patient: str, start: str, number: int, status: str = "booked"
) -> dict[str, Any]:
    """A booked KaT session: 4 h in person (DOMAIN.md: "Three KaT sessions … 4 h each")."""
    hour = int(start[11:13])
    return {
        "resourceType": "Appointment",
        "extension": [{"url": SESSION_NUMBER, "valueInteger": number}],
        "status": status,
        "serviceType": [{"coding": [{"system": SERVICE, "code": "kat-session"}]}],
        "start": start,
        "end": f"{start[:11]}{hour + 4:02d}{start[13:]}",
        "participant": [
            {"actor": {"reference": f"Patient/{patient}"}, "status": "accepted"},
        ],
    }


def test_a_booked_session_is_stored_and_found_as_the_worklist_asks(app: Flask) -> None:
    world = World(app)
    staff, a = world.staff, world.patient["A"]
    r = fhir(
        staff, "POST", "/fhir/Appointment", session_appointment(a, "2027-03-02T09:00:00-08:00", 2)
    )
    assert r.status_code == 201, r.get_json()
    booked = r.get_json()
    fhir(
        staff,
        "POST",
        "/fhir/Appointment",
        session_appointment(a, "2026-01-05T09:00:00-08:00", 1, "fulfilled"),
    )
    query = (
        f"/fhir/Appointment?patient=Patient/{a}&status=booked&date=ge2026-12-01"
        f"&service-type={SERVICE}|kat-session&_include=Appointment:patient"
    )
    bundle = staff.get(query).get_json()
    matches = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "match"]
    included = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "include"]
    assert [m["id"] for m in matches] == [booked["id"]]
    assert [p["id"] for p in included] == [a]
    # A status outside R4's appointmentstatus (required binding) is refused, nothing stored.
    wrong = fhir(
        staff,
        "POST",
        "/fhir/Appointment",
        session_appointment(a, "2027-03-09T09:00:00-08:00", 3, "scheduled"),
    )
    assert wrong.status_code in (400, 422), wrong.get_json()
    assert staff.get("/fhir/Appointment?_summary=count").get_json()["total"] == 2


def test_a_session_booking_names_its_patient_session_and_time_on_every_route(app: Flask) -> None:
    """The pipeline's "KaT session bookings" check (R4 app-3 and what the worklist needs),
    through REST, a transaction and a batch alike: 422 naming each problem, nothing stored."""
    world = World(app)
    staff, a = world.staff, world.patient["A"]
    bad = session_appointment(a, "2027-03-02T09:00:00-08:00", 2)
    bad.pop("end")
    bad["extension"] = []
    bad["participant"].append(
        {"actor": {"reference": f"Patient/{world.patient['B']}"}, "status": "accepted"}
    )
    r = fhir(staff, "POST", "/fhir/Appointment", bad)
    assert r.status_code == 422, r.get_json()
    assert sorted(i["expression"][0] for i in r.get_json()["issue"]) == [
        "Appointment.extension",
        "Appointment.participant",
        "Appointment.start",
    ]
    entry = {"resource": bad, "request": {"method": "POST", "url": "Appointment"}}
    r = fhir(
        staff, "POST", "/fhir", {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    )
    assert r.status_code == 422
    r = fhir(staff, "POST", "/fhir", {"resourceType": "Bundle", "type": "batch", "entry": [entry]})
    assert r.get_json()["entry"][0]["response"]["status"].startswith("422")
    assert staff.get("/fhir/Appointment?_summary=count").get_json()["total"] == 0
    # Proposed: no time yet is fine; any other Appointment (not a KaT session) is not ours to judge.
    proposed = session_appointment(a, "2027-03-02T09:00:00-08:00", 2, "proposed")
    for key in ("start", "end"):
        proposed.pop(key)
    assert fhir(staff, "POST", "/fhir/Appointment", proposed).status_code == 201
    other = bad | {"serviceType": [{"text": "physiotherapy"}]}
    assert fhir(staff, "POST", "/fhir/Appointment", other).status_code == 201


def test_the_capability_statement_lists_the_worklists_parameters(app: Flask) -> None:
    statement = client_as(app, "staff").get("/fhir/metadata").get_json()
    (resource,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "Appointment"]
    names = {p["name"] for p in resource["searchParam"]}
    assert {"patient", "date", "status", "service-type"} <= names
    assert "Appointment:patient" in resource.get("searchInclude", [])


def test_bookings_follow_the_one_visibility_rule(app: Flask) -> None:
    world = World(app)
    ids = {}
    for key in ("A", "B"):
        r = fhir(
            world.staff,
            "POST",
            "/fhir/Appointment",
            session_appointment(world.patient[key], "2027-03-02T09:00:00-08:00", 2),
        )
        assert r.status_code == 201
        ids[key] = r.get_json()["id"]
    # A's consent opens A's data to the health authority (World); B's does not exist.
    seen = world.ha.get("/fhir/Appointment").get_json()
    assert [e["resource"]["id"] for e in seen["entry"]] == [ids["A"]]
    assert world.ha.get(f"/fhir/Appointment/{ids['B']}").status_code == 404
    # A referrer's role reads no bookings (not even of its own referral's patient).
    assert world.referrer.get("/fhir/Appointment").status_code == 403
    assert world.referrer.get(f"/fhir/Appointment/{ids['A']}").status_code == 403
    # B consents later: B's booking opens too.
    r = fhir(world.staff, "POST", "/fhir/Consent", consent_for(world.patient["B"], "HA-ISLAND"))
    assert r.status_code == 201
    assert world.ha.get(f"/fhir/Appointment/{ids['B']}").status_code == 200
