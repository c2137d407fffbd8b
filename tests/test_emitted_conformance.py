"""Everything the service emits, held to HL7's R4 JSON schema, invariants and required bindings:
CapabilityStatement, OperationOutcomes, every Bundle type it builds, AuditEvents, the Measure and
its MeasureReport, and $export NDJSON lines."""

from __future__ import annotations

import json
import time
from typing import Any

from flask import Flask

from tests.conftest import client_as
from tests.support.conformance import assert_conformant

FHIR = "application/fhir+json"


def test_everything_emitted_conforms(app: Flask) -> None:
    staff, admin = client_as(app, "staff"), client_as(app, "admin")
    emitted: list[dict[str, Any]] = []

    def keep(response: Any) -> Any:
        if response.data and response.mimetype in (FHIR, "application/json"):
            body = response.get_json()
            if isinstance(body, dict) and "resourceType" in body:
                emitted.append(body)
        return response

    keep(staff.get("/fhir/metadata"))
    p = keep(
        staff.post(
            "/fhir/Patient",
            data=json.dumps({"resourceType": "Patient", "gender": "female"}),
            content_type=FHIR,
        )
    ).get_json()
    keep(
        staff.put(
            f"/fhir/Patient/{p['id']}", data=json.dumps(dict(p, gender="other")), content_type=FHIR
        )
    )
    keep(staff.get(f"/fhir/Patient/{p['id']}/_history"))
    keep(staff.get("/fhir/Patient?_count=1&gender=other"))
    keep(
        staff.post(
            "/fhir",
            data=json.dumps(
                {
                    "resourceType": "Bundle",
                    "type": "transaction",
                    "entry": [
                        {
                            "fullUrl": "urn:uuid:5b6f7a3e-0000-4000-8000-000000000001",
                            "resource": {
                                "resourceType": "Observation",
                                "status": "final",
                                "code": {
                                    "coding": [{"system": "http://loinc.org", "code": "44261-6"}]
                                },
                                "subject": {"reference": f"Patient/{p['id']}"},
                                "effectiveDateTime": "2026-01-05",
                                "valueQuantity": {"value": 12},
                            },
                            "request": {"method": "POST", "url": "Observation"},
                        }
                    ],
                }
            ),
            content_type=FHIR,
        )
    )
    keep(
        staff.post(
            "/fhir",
            data=json.dumps(
                {
                    "resourceType": "Bundle",
                    "type": "batch",
                    "entry": [
                        {"request": {"method": "GET", "url": "Patient/nope"}},
                        {"request": {"method": "GET", "url": "Observation?patient=" + p["id"]}},
                    ],
                }
            ),
            content_type=FHIR,
        )
    )
    for bad in ({"resourceType": "Patient", "gender": 1}, {"resourceType": "Task"}):
        keep(staff.post(f"/fhir/{bad['resourceType']}", data=json.dumps(bad), content_type=FHIR))
    keep(app.test_client().get("/fhir/Patient"))  # 401
    keep(staff.get("/fhir/nowhere/x/y"))
    keep(staff.get("/fhir/Measure/kat-program-outcomes"))
    keep(
        staff.get(
            "/fhir/Measure/kat-program-outcomes/$evaluate-measure?periodStart=2026-01-01"
            "&periodEnd=2026-12-31"
        )
    )
    keep(admin.get("/fhir/AuditEvent?_count=100"))
    kick = staff.get("/fhir/$export?_type=Patient,Observation", headers={"Prefer": "respond-async"})
    status = kick.headers["Content-Location"].split("localhost", 1)[1]
    for _ in range(100):
        r = staff.get(status)
        if r.status_code == 200:
            break
        time.sleep(0.1)
    for output in r.get_json()["output"]:
        f = staff.get(output["url"].split("localhost", 1)[1])
        emitted += [json.loads(line) for line in f.get_data(as_text=True).splitlines()]
        f.close()

    kinds = {(e["resourceType"], e.get("type")) for e in emitted if e["resourceType"] == "Bundle"}
    kinds |= {(e["resourceType"], None) for e in emitted}
    for expected in ("CapabilityStatement", "OperationOutcome", "Measure", "MeasureReport"):
        assert any(k == expected for k, _ in kinds), expected
    for btype in ("searchset", "history", "transaction-response", "batch-response"):
        assert ("Bundle", btype) in kinds, btype
    audit = next(
        e
        for e in emitted
        if e.get("type") == "searchset"
        and e.get("entry", [{}])[0].get("resource", {}).get("resourceType") == "AuditEvent"
    )
    assert audit["total"] > 5
    for resource in emitted:
        assert_conformant(resource)
