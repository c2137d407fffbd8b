"""Required bindings generated from HL7's R4 definitions: what they catch, where they point, and
that the committed table is exactly what the generator makes from the pinned package."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_kat.validation.bindings import check_required_bindings
from tools import gen_required_bindings


def exprs(resource: dict[str, Any]) -> list[str]:
    return [e for i in check_required_bindings(resource) for e in i.expression]


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        ({"resourceType": "Task", "status": "bogus", "intent": "order"}, ["Task.status"]),
        ({"resourceType": "Patient", "gender": "x"}, ["Patient.gender"]),
        (
            {"resourceType": "Patient", "name": [{"family": "A"}, {"use": "nick"}]},
            ["Patient.name[1].use"],
        ),
        (
            {"resourceType": "Patient", "telecom": [{"system": "pigeon", "value": "1"}]},
            ["Patient.telecom[0].system"],
        ),
        (
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "x"},
                "valueQuantity": {"value": 1, "comparator": "~"},
            },
            ["Observation.valueQuantity.comparator"],
        ),
        (
            {
                "resourceType": "Patient",
                "contained": [
                    {"resourceType": "Task", "id": "t", "status": "nope", "intent": "order"}
                ],
            },
            ["Patient.contained[0].status"],
        ),
        (
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "resource": {"resourceType": "Patient", "gender": "q"},
                        "request": {"method": "FETCH", "url": "Patient"},
                    }
                ],
            },
            ["Bundle.entry[0].resource.gender", "Bundle.entry[0].request.method"],
        ),
        ({"resourceType": "Task", "status": "requested", "intent": "order"}, []),
    ],
)
def test_required_bindings(resource: dict[str, Any], expected: list[str]) -> None:
    assert exprs(resource) == expected


def test_codeable_concept_needs_a_coding_from_the_value_set() -> None:
    # AllergyIntolerance.clinicalStatus is a CodeableConcept with a required binding.
    system = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
    base = {"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/1"}}
    ok = {
        **base,
        "clinicalStatus": {
            "coding": [{"system": "urn:other", "code": "x"}, {"system": system, "code": "active"}]
        },
    }
    assert exprs(ok) == []
    for bad in ({"text": "active"}, {"coding": [{"system": "urn:other", "code": "active"}]}):
        assert exprs({**base, "clinicalStatus": bad}) == ["AllergyIntolerance.clinicalStatus"]


def test_diagnostics_never_echo_the_value() -> None:
    problems = check_required_bindings({"resourceType": "Patient", "gender": "Zebediah"})
    assert problems and all("Zebediah" not in p.diagnostics for p in problems)


@pytest.mark.hl7
def test_committed_table_matches_hl7_definitions() -> None:
    assert gen_required_bindings.main(["gen", "--check"]) == 0
