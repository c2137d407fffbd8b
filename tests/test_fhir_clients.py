"""Real FHIR clients from PyPI (fhirpy, fhirclient) against a live server on loopback, used the
way an integrator would: create, read, search, page, update."""

from __future__ import annotations

import pytest
from fhirclient import client as smart_client
from fhirclient.models.observation import Observation as FCObservation
from fhirclient.models.patient import Patient as FCPatient
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import OperationOutcome as FhirpyOutcome
from fhirpy.base.exceptions import ResourceNotFound

from tests.conftest import LiveServer


def test_fhirpy_create_read_search_page(live_server: LiveServer) -> None:
    fhir = SyncFHIRClient(live_server.url + "/fhir", authorization=f"Bearer {live_server.token}")
    created = []
    for i in range(5):
        p = fhir.resource(
            "Patient",
            identifier=[{"system": "urn:kat:test", "value": str(i)}],
            name=[{"family": f"Synthetic{i}"}],
            gender="other",
        )
        p.save()
        created.append(p.id)
    obs = fhir.resource(
        "Observation",
        status="final",
        code={"coding": [{"system": "http://loinc.org", "code": "44261-6"}]},
        subject=fhir.reference("Patient", created[0]),
        effectiveDateTime="2026-02-01",
        valueInteger=14,
    )
    obs.save()

    assert fhir.reference("Patient", created[2]).to_resource()["name"][0]["family"] == "Synthetic2"
    found = fhir.resources("Patient").search(identifier="urn:kat:test|3").fetch()
    assert [p.id for p in found] == [created[3]]
    # fetch_all follows the server's next links to the end
    every = fhir.resources("Patient").limit(2).fetch_all()
    assert [p.id for p in every] == created
    assert fhir.resources("Patient").count() == 5

    by_patient = (
        fhir.resources("Observation")
        .search(patient=created[0], code="http://loinc.org|44261-6")
        .include("Observation", "patient")
        .fetch_raw()
    )
    modes = sorted(e["search"]["mode"] for e in by_patient["entry"])
    assert modes == ["include", "match"]

    p0 = fhir.resources("Patient").search(_id=created[0]).get()
    p0["gender"] = "female"
    p0.save()
    assert p0["meta"]["versionId"] == "2"

    with pytest.raises(ResourceNotFound):
        fhir.reference("Patient", "no-such-patient").to_resource()
    bad = fhir.resource("Task", status="bogus", intent="order")
    with pytest.raises(FhirpyOutcome) as err:
        bad.save()
    assert "Task.status" in str(err.value)


def test_fhirclient_models_round_trip(live_server: LiveServer) -> None:
    smart = smart_client.FHIRClient(
        settings={"app_id": "fhir_kat_tests", "api_base": live_server.url + "/fhir"}
    )
    smart.server.session.headers["Authorization"] = f"Bearer {live_server.token}"
    patient = FCPatient({"gender": "female", "birthDate": "1980-05-06", "active": True})
    created = patient.create(smart.server)
    assert created is not None
    pid = created["id"]
    back = FCPatient.read(pid, smart.server)
    assert back.birthDate.isostring == "1980-05-06"

    obs = FCObservation(
        {
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "70274-6"}]},
            "subject": {"reference": f"Patient/{pid}"},
            "effectiveDateTime": "2026-03-01T10:00:00Z",
            "valueInteger": 9,
        }
    )
    obs.create(smart.server)
    results = list(
        FCObservation.where(
            struct={"patient": pid, "code": "http://loinc.org|70274-6"}
        ).perform_resources_iter(smart.server)
    )
    assert len(results) == 1 and results[0].valueInteger == 9
