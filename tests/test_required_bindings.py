"""Required bindings generated from HL7's R4 definitions: what they catch and where they point,
that HL7's own examples pass, and that the committed table is exactly what the generator makes
from the pinned package."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import pytest

from fhir_kat.validation.bindings import check_required_bindings
from fhir_kat.validation.resource import SUPPORTED_TYPES
from tests.support.conformance import official_examples
from tools import gen_required_bindings
from tools.gen_required_bindings import SUPPORTED

ALLERGY_CLINICAL = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
UCUM = "http://unitsofmeasure.org"

#: HL7 examples with a genuine required-binding error: none in R4 4.0.1 for these types.
BINDING_EXCEPTIONS: dict[str, str] = {}


def exprs(resource: dict[str, Any]) -> list[str]:
    return [e for i in check_required_bindings(resource) for e in i.expression]


def task(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Task", "status": "requested", "intent": "order", **extra}


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        pytest.param(task(), [], id="valid"),
        pytest.param(task(status="bogus"), ["Task.status"], id="code"),
        pytest.param({"resourceType": "Patient", "gender": "x"}, ["Patient.gender"], id="gender"),
        pytest.param(
            {"resourceType": "Patient", "name": [{"use": "bogus"}, {"use": "official"}]},
            ["Patient.name[0].use"],
            id="datatype-in-list",
        ),
        pytest.param(
            {"resourceType": "Patient", "telecom": [{"value": "1"}, {"system": "pigeon"}]},
            ["Patient.telecom[1].system"],
            id="contactpoint",
        ),
        pytest.param(
            {"resourceType": "Patient", "contact": [{"gender": "x", "address": {"use": "y"}}]},
            ["Patient.contact[0].gender", "Patient.contact[0].address.use"],
            id="backbone",
        ),
        pytest.param(
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "x"},
                "valueQuantity": {"value": 1, "comparator": "~"},
            },
            ["Observation.valueQuantity.comparator"],
            id="choice",
        ),
        pytest.param(
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "x"},
                "component": [
                    {"code": {"text": "a"}, "valueRange": {"low": {"comparator": "<"}}},
                    {"code": {"text": "b"}, "valueQuantity": {"comparator": "~~"}},
                ],
            },
            ["Observation.component[1].valueQuantity.comparator"],
            id="choice-in-backbone",  # Range.low is a SimpleQuantity: "<" is a valid code
        ),
        pytest.param(
            {
                "resourceType": "Patient",
                "extension": [{"url": "urn:x", "valueHumanName": {"use": "nick"}}],
                "_birthDate": {"extension": [{"url": "urn:y", "valueAge": {"comparator": "="}}]},
            },
            [
                "Patient.extension[0].valueHumanName.use",
                "Patient.birthDate.extension[0].valueAge.comparator",
            ],
            id="extensions",
        ),
        pytest.param(
            {
                "resourceType": "Questionnaire",
                "status": "draft",
                "item": [{"linkId": "1", "type": "group", "item": [{"linkId": "2", "type": "?"}]}],
            },
            ["Questionnaire.item[0].item[0].type"],
            id="content-reference",
        ),
        pytest.param(
            {
                "resourceType": "Patient",
                "contained": [task(id="t", status="nope")],
            },
            ["Patient.contained[0].status"],
            id="contained",
        ),
        pytest.param(
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "resource": {"resourceType": "Patient", "gender": "q"},
                        "request": {"method": "FETCH", "url": "Patient"},
                    },
                    {
                        "response": {
                            "status": "200",
                            "outcome": {
                                "resourceType": "OperationOutcome",
                                "issue": [{"severity": "fatal-ish", "code": "invalid"}],
                            },
                        }
                    },
                ],
            },
            [
                "Bundle.entry[0].resource.gender",
                "Bundle.entry[0].request.method",
                "Bundle.entry[1].response.outcome.issue[0].severity",
            ],
            id="bundle",
        ),
        pytest.param(
            {
                "resourceType": "Parameters",
                "parameter": [{"name": "r", "resource": task(intent="wish")}],
            },
            ["Parameters.parameter[0].resource.intent"],
            id="parameters",
        ),
        pytest.param(
            {"resourceType": "Patient", "gender": 1, "name": "x", "telecom": [None, 3]},
            [],
            id="wrong-json-types-are-the-schema's-business",
        ),
        pytest.param({"resourceType": "MessageHeader", "x": 1}, [], id="unsupported-type"),
    ],
)
def test_required_bindings(resource: dict[str, Any], expected: list[str]) -> None:
    assert exprs(resource) == expected


def test_every_problem_is_code_invalid_and_names_value_set_and_allowed_codes() -> None:
    [problem] = check_required_bindings(task(status="bogus"))
    assert problem.code == "code-invalid"
    assert problem.severity == "error"
    assert "http://hl7.org/fhir/ValueSet/task-status" in problem.diagnostics
    assert "allowed: accepted, cancelled, completed, draft," in problem.diagnostics
    [big] = check_required_bindings(
        {
            "resourceType": "Bundle",
            "entry": [{"resource": {"resourceType": "CapabilityStatement", "fhirVersion": "9"}}],
        }
    )
    assert "(allowed: 22 codes of http://hl7.org/fhir/FHIR-version)" in big.diagnostics


def test_codeable_concept_needs_a_coding_from_the_value_set() -> None:
    """FHIR R4 terminologies.html: for a required CodeableConcept at least one coding SHALL be
    from the value set; other codings may sit beside it; text alone does not do."""
    base = {"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/1"}}
    good = {"system": ALLERGY_CLINICAL, "code": "active"}
    for ok in (
        {"coding": [good]},
        {"coding": [{"system": "urn:other", "code": "x"}, good], "text": "Active"},
    ):
        assert exprs({**base, "clinicalStatus": ok}) == []
    for bad in (
        {"text": "active"},
        {"coding": [{"system": "urn:other", "code": "active"}]},
        {"coding": [{"system": ALLERGY_CLINICAL, "code": "bogus"}]},
        {"coding": [{"code": "active"}]},  # no system: not a coding of the value set
    ):
        assert exprs({**base, "clinicalStatus": bad}) == ["AllergyIntolerance.clinicalStatus"]


def test_diagnostics_never_echo_submitted_values() -> None:
    """A code field may hold a name someone typed (tests/test_security.py): issues name the
    element, the value set and what it allows, never what was sent."""
    subject = {"reference": "Patient/1"}
    sent = [
        {"resourceType": "Patient", "gender": "Zebediah"},
        {
            "resourceType": "Condition",
            "subject": subject,
            "clinicalStatus": {"coding": [{"system": "urn:Zebediah", "code": "Zebediah"}]},
        },
        {"resourceType": "Condition", "subject": subject, "clinicalStatus": {"text": "Zebediah"}},
    ]
    for resource in sent:
        [problem] = check_required_bindings(resource)
        assert "Zebediah" not in problem.diagnostics


def test_data_file_is_consistent_and_lists_what_it_cannot_check() -> None:
    data = json.loads(
        resources.files("fhir_kat.validation")
        .joinpath("data/required_bindings.json")
        .read_text("utf-8")
    )
    assert data["source"] == "hl7.fhir.r4.examples@4.0.1"
    assert set(data["roots"]) == {*SUPPORTED, "Parameters"}
    for path, binding in data["bindings"].items():
        owner, _, name = path.rpartition(".")
        assert name in data["types"][owner], path
        assert binding["valueSet"] in data["valueSets"], path
    assert set(data["unexpandable"]) == {
        "http://hl7.org/fhir/ValueSet/mimetypes",  # urn:ietf:bcp:13 is not in the package
        "http://hl7.org/fhir/ValueSet/currencies",  # nor is ISO 4217
    }
    for entry in data["unexpandable"].values():
        assert entry["reason"] and entry["elements"]
    some = data["valueSets"]["http://hl7.org/fhir/ValueSet/name-use"]
    assert some == {
        "http://hl7.org/fhir/name-use": sorted(
            ["usual", "official", "temp", "nickname", "anonymous", "old", "maiden"]
        )
    }


def test_generator_covers_every_type_the_service_stores() -> None:
    assert set(SUPPORTED_TYPES) <= set(SUPPORTED)


@pytest.mark.hl7
@pytest.mark.parametrize("resource_type", SUPPORTED)
def test_official_examples_have_no_binding_errors(resource_type: str) -> None:
    examples = official_examples(resource_type)
    assert examples, resource_type
    found = {
        name: [f"{', '.join(i.expression)}: {i.diagnostics}" for i in problems]
        for name, doc in examples
        if (problems := check_required_bindings(doc))
    }
    expected = {name for name, _ in examples if name in BINDING_EXCEPTIONS}
    assert set(found) == expected, found


@pytest.mark.hl7
def test_committed_table_is_what_the_generator_makes() -> None:
    assert gen_required_bindings.main(["gen_required_bindings.py", "--check"]) == 0
