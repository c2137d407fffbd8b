"""The referral as an SDC form (issue 21): ``Questionnaire/kat-referral`` served with the
program's ValueSets, ``$populate`` from the launch context, and a submitted response read back
into the same referral as the native route — golden parity (``tests/golden/referrals-sdc/``:
``<case>.input.json``, the response, and ``<case>.native.json``, the same answers as a native
referral, map to one ``<case>.expected.json``), the same bundle over HTTP
(``POST /api/v1/referrals``, ``$extract``), and every refusal naming the item."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from fhir_kat.artifacts import json_schema
from fhir_kat.errors import Unprocessable
from fhir_kat.mapping import map_artifact
from fhir_kat.mapping.sdc_referral import (
    populate,
    referral_from_response,
    referral_questionnaire,
)
from fhir_kat.terminology import load_terminology
from tests.test_golden import CONTEXT

GOLDEN = Path(__file__).parent / "golden" / "referrals-sdc"
CASES = sorted(p.name.removesuffix(".input.json") for p in GOLDEN.glob("*.input.json"))
KS = "https://fhir-kat.example.org/fhir/CodeSystem/"


def _load(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((GOLDEN / name).read_text())
    return loaded


@pytest.mark.parametrize("case", CASES)
def test_golden_parity_with_the_native_route(case: str, request: pytest.FixtureRequest) -> None:
    from_form = map_artifact(
        "referrals", referral_from_response(_load(f"{case}.input.json")), CONTEXT
    )
    native = map_artifact("referrals", _load(f"{case}.native.json"), CONTEXT)
    assert from_form == native
    expected = GOLDEN / f"{case}.expected.json"
    if request.config.getoption("--update-golden"):
        expected.write_text(json.dumps(from_form, indent=2, ensure_ascii=False) + "\n")
    assert from_form == json.loads(expected.read_text())


def _leaves(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for item in items:
        if item["type"] == "group":
            out += _leaves(item.get("item", []))
        else:
            out.append(item)
    return out


def _schema_has(schema: dict[str, Any], link: str) -> bool:
    """Whether the referral artifact's JSON Schema has the field a linkId names."""
    head, _, rest = link.partition("[")
    node = schema
    for part in head.split("."):
        node = node.get("properties", {}).get(part)
        if node is None:
            return False
    if not rest:
        return True
    items = node.get("items", {})
    if rest == "]":
        return "items" in node
    if rest.startswith("]."):
        return rest[2:] in items.get("properties", {})
    return set(items.get("properties", {})) >= {"code", "value"}


def test_every_item_answers_a_field_of_the_referral_artifact() -> None:
    q = referral_questionnaire()
    schema = json_schema("referrals")
    leaves = _leaves(q["item"])
    missing = [i["linkId"] for i in leaves if not _schema_has(schema, i["linkId"])]
    assert missing == []
    # Every required field of the artifact is asked (the form's identifier/authored aside).
    asked = {i["linkId"].split("[")[0] for i in leaves}
    for field in schema["required"]:
        if field in ("source_id", "referral_identifier", "authored_on"):
            continue
        sub = schema["properties"][field]
        for inner in sub.get("required", []):
            nested = sub["properties"][inner]
            for leaf in (
                nested.get("required", [inner]) if nested.get("type") == "object" else [inner]
            ):
                path = f"{field}.{inner}" if leaf == inner else f"{field}.{inner}.{leaf}"
                if nested.get("type") == "object" and "identifier" in nested.get("properties", {}):
                    continue  # organization: checked by its own leaves below
                assert path in asked, path
    assert {
        "referrer.organization.identifier.system",
        "referrer.organization.identifier.value",
    } <= asked


def test_answer_lists_are_the_program_value_sets() -> None:
    q = referral_questionnaire()
    terminology = load_terminology()
    contained = {c["id"]: c for c in q["contained"]}
    for item in _leaves(q["item"]):
        ref = item.get("answerValueSet")
        if ref:
            name = ref[1:]
            codes = {(c["system"], c["code"]) for c in contained[name]["expansion"]["contains"]}
            assert codes == set(terminology.value_set(name)), name
    flag_items = {i["linkId"] for i in _leaves(q["item"]) if i["linkId"].startswith("flags[")}
    assert flag_items == {f"flags[{c}]" for _, c in terminology.value_set("kat-referral-flag")}


def test_served_questionnaire_is_valid_and_readable(client: FlaskClient) -> None:
    response = client.get("/fhir/Questionnaire/kat-referral")
    assert response.status_code == 200
    served = response.get_json()
    assert served["url"] == "https://fhir-kat.example.org/fhir/Questionnaire/kat-referral"
    assert served["item"] == referral_questionnaire()["item"]


def _bad(qr: dict[str, Any]) -> list[str]:
    with pytest.raises(Unprocessable) as exc:
        referral_from_response(qr)
    return sorted(i.expression[0] for i in exc.value.issues)


def test_refusals_name_each_item() -> None:
    qr = _load("complete.input.json")
    assert _bad({**qr, "identifier": None, "authored": None, "status": "in-progress"}) == [
        "QuestionnaireResponse.authored",
        "QuestionnaireResponse.identifier",
        "QuestionnaireResponse.status",
    ]
    wrong = json.loads(json.dumps(qr))
    patient = wrong["item"][0]["item"]
    patient[0]["answer"] = [{"valueInteger": 9999999998}]  # phn as a number
    patient[4]["answer"] = [{"valueCoding": {"system": KS + "kat-sex", "code": "f"}}]
    patient[3]["answer"].append({"valueDate": "1984-03-03"})  # two birth dates
    wrong["item"].append({"linkId": "bogus", "answer": [{"valueString": "x"}]})
    assert _bad(wrong) == ["bogus", "patient.birth_date", "patient.phn", "patient.sex"]


def test_submitted_response_is_the_same_referral_over_http(client: FlaskClient) -> None:
    qr = _load("complete.input.json")
    native = _load("complete.native.json")
    via_form = _unclocked(client.post("/api/v1/referrals/$transform", json=qr).get_json())
    via_native = _unclocked(client.post("/api/v1/referrals/$transform", json=native).get_json())
    assert via_form == via_native
    extracted = client.post("/fhir/QuestionnaireResponse/$extract", json=qr)
    assert extracted.status_code == 200
    assert _unclocked(extracted.get_json()) == via_native
    stored = client.post("/api/v1/referrals", json=qr)
    assert stored.status_code == 201, stored.get_json()
    again = client.post("/api/v1/referrals", json=native)
    assert again.status_code == 200  # the same referral: nothing new
    sr = client.get(
        "/fhir/ServiceRequest?identifier=https://emr.example-clinic.ca/referrals|R-7781"
    )
    [entry] = sr.get_json()["entry"]
    task = client.get(f"/fhir/Task?focus=ServiceRequest/{entry['resource']['id']}").get_json()
    assert task["entry"][0]["resource"]["status"] in ("received", "on-hold")  # triaged


def _unclocked(bundle: dict[str, Any]) -> dict[str, Any]:
    """The Bundle without the instants the test clock moves between two requests (the
    Provenance's ``recorded``, also shown in its generated narrative)."""
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "Provenance":
            entry["resource"].pop("recorded", None)
            entry["resource"].pop("text", None)
    return bundle


def test_refusal_over_http_is_422_naming_the_item(client: FlaskClient) -> None:
    qr = _load("complete.input.json")
    qr["item"][0]["item"][0]["answer"] = [{"valueString": "123"}]  # not a PHN
    response = client.post("/api/v1/referrals", json=qr)
    assert response.status_code == 422
    assert any("patient.phn" in i["expression"][0] for i in response.get_json()["issue"])


PATIENT = {
    "resourceType": "Patient",
    "id": "ehr-avery",
    "identifier": [
        {
            "system": "https://fhir.infoway-inforoute.ca/NamingSystem/ca-bc-patient-healthcare-id",
            "value": "9999999998",
        }
    ],
    "name": [{"family": "Testcase", "given": ["Avery", "Q"]}],
    "gender": "female",
    "birthDate": "1984-03-02",
    "telecom": [{"system": "phone", "value": "250-555-0100"}],
}
USER = {
    "resourceType": "Practitioner",
    "id": "dr-jordan",
    "identifier": [
        {
            "system": "https://fhir.infoway-inforoute.ca/NamingSystem/ca-bc-license-physician",
            "value": "99001",
        }
    ],
    "name": [{"family": "Example", "given": ["Jordan"]}],
}


def _condition(
    code: str, display: str, system: str = "http://snomed.info/sct", clinical: str = "active"
) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": clinical,
                }
            ]
        },
        "code": {"coding": [{"system": system, "code": code, "display": display}]},
        "subject": {"reference": "Patient/ehr-avery"},
    }


CONDITIONS = {
    "resourceType": "Bundle",
    "type": "searchset",
    "entry": [
        {"resource": _condition("47505003", "Posttraumatic stress disorder")},
        {
            "resource": _condition(
                "F17.2", "Nicotine dependence", "http://hl7.org/fhir/sid/icd-10-ca"
            )
        },
        # not active: not prefilled
        {"resource": _condition("69322001", "Psychotic disorder", clinical="resolved")},
        # not a system the form takes
        {"resource": _condition("X1", "Local code", "http://example.org/local")},
    ],
}


def _answers(qr: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out = {}

    def walk(items: list[dict[str, Any]]) -> None:
        for i in items:
            if "answer" in i:
                out[i["linkId"]] = i["answer"]
            walk(i.get("item", []))

    walk(qr["item"])
    return out


def test_populate_prefills_from_the_launch_context() -> None:
    qr = populate({"patient": PATIENT, "user": USER, "conditions": CONDITIONS}, "Patient/ehr-avery")
    answers = _answers(qr)
    assert qr["status"] == "in-progress" and qr["subject"] == {"reference": "Patient/ehr-avery"}
    assert answers["patient.phn"] == [{"valueString": "9999999998"}]
    assert answers["patient.given_names[]"] == [{"valueString": "Avery"}, {"valueString": "Q"}]
    assert answers["patient.birth_date"] == [{"valueDate": "1984-03-02"}]
    assert "patient.sex" not in answers  # Patient.gender is a code, not a Coding: asked
    assert answers["patient.contact.phone"] == [{"valueString": "250-555-0100"}]
    assert answers["referrer.licence_number"] == [{"valueString": "99001"}]
    assert [a["valueCoding"]["code"] for a in answers["conditions[]"]] == ["47505003", "F17.2"]
    # What the chart cannot say is left for the physician.
    for link in ("diagnoses[].code", "prior_treatment_failure", "referrer.organization.name"):
        assert link not in answers
    # Without a launch context nothing is guessed.
    assert _answers(populate({})) == {}


def test_populate_operation_then_completion_is_a_referral(client: FlaskClient) -> None:
    params = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "subject", "valueReference": {"reference": "Patient/ehr-avery"}},
            {
                "name": "context",
                "part": [
                    {"name": "name", "valueString": "patient"},
                    {"name": "content", "resource": PATIENT},
                ],
            },
            {
                "name": "context",
                "part": [
                    {"name": "name", "valueString": "user"},
                    {"name": "content", "resource": USER},
                ],
            },
            {
                "name": "context",
                "part": [
                    {"name": "name", "valueString": "conditions"},
                    {"name": "content", "resource": CONDITIONS},
                ],
            },
        ],
    }
    response = client.post("/fhir/Questionnaire/kat-referral/$populate", json=params)
    assert response.status_code == 200, response.get_json()
    qr = response.get_json()["parameter"][0]["resource"]
    # The physician completes what the chart could not say.
    qr["item"][1]["item"] += [
        {
            "linkId": "referrer.organization.name",
            "answer": [{"valueString": "Example Family Practice"}],
        },
        {
            "linkId": "referrer.organization.identifier.system",
            "answer": [{"valueUri": "https://fhir-kat.example.org/fhir/sid/organization"}],
        },
        {
            "linkId": "referrer.organization.identifier.value",
            "answer": [{"valueString": "CLINIC-7"}],
        },
    ]
    [patient] = [group for group in qr["item"] if group["linkId"] == "patient"]
    patient["item"].append(
        {
            "linkId": "patient.sex",
            "answer": [{"valueCoding": {"system": KS + "kat-sex", "code": "female"}}],
        }
    )
    [referral] = [group for group in qr["item"] if group["linkId"] == "referral"]
    assert [i["linkId"] for i in referral["item"]] == ["conditions[]"]  # from %conditions
    referral["item"] += [
        {
            "linkId": "diagnoses[].code",
            "answer": [{"valueCoding": {"system": KS + "kat-diagnosis", "code": "ptsd"}}],
        },
        {"linkId": "prior_treatment_failure", "answer": [{"valueBoolean": True}]},
    ]
    qr.update(
        status="completed",
        authored="2026-12-01T10:00:00Z",
        identifier={"system": "https://emr.example-clinic.ca/referrals", "value": "R-POP-1"},
    )
    stored = client.post("/api/v1/referrals", json=qr)
    assert stored.status_code == 201, stored.get_json()
