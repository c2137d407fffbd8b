"""``ValueSet/$expand``, ``ValueSet/$validate-code``, ``CodeSystem/$lookup`` and
``ConceptMap/$translate`` on the service's own terminology: GET and POST, type and instance
level, every answer checked against the files it comes from (every ValueSet, every CodeSystem
concept, every ConceptMap row), and every error an OperationOutcome naming the parameter."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from fhir_kat.settings import Settings
from fhir_kat.terminology import BASE, load_terminology
from fhir_kat.terminology.criteria import load_criteria
from tests.conftest import client_as
from tests.support.conformance import assert_conformant

FHIR = "application/fhir+json"
pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # The tests walk every code of every file: more requests than a client's minute allows.
    return replace(settings, rate_limit_per_minute=0)


@pytest.fixture
def referrer(app: Flask) -> FlaskClient:
    # The least-privileged role: definitions describe no patient.
    return client_as(app, "referrer")


def _post(client: FlaskClient, path: str, *params: dict[str, Any]) -> Any:
    body = {"resourceType": "Parameters", "parameter": list(params)}
    return client.post(path, data=json.dumps(body), content_type=FHIR)


def _value(parameters: dict[str, Any], name: str) -> Any:
    for p in parameters.get("parameter", []):
        if p["name"] == name:
            return next(v for k, v in p.items() if k.startswith("value"))
    return None


def _outcome(response: Any, status: int, expression: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    body: dict[str, Any] = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert any(expression in i.get("expression", []) for i in body["issue"]), body
    return body


def test_expand_every_enumerable_value_set(referrer: FlaskClient) -> None:
    terminology = load_terminology()
    for url, members in terminology.value_sets.items():
        response = referrer.get("/fhir/ValueSet/$expand", query_string={"url": url})
        assert response.status_code == 200, url
        body = response.get_json()
        assert_conformant(body)
        expansion = body["expansion"]
        got = {(c["system"], c["code"]) for c in expansion.get("contains", [])}
        assert got == set(members), url
        assert expansion["total"] == len(members)
        for c in expansion.get("contains", []):
            display = terminology.display(c["system"], c["code"])
            if display:
                assert c["display"] == display
        assert "compose" not in body


def test_expand_filter_paging_and_instance(referrer: FlaskClient) -> None:
    url = f"{BASE}/ValueSet/kat-route"
    full = referrer.get(f"/fhir/ValueSet/$expand?url={url}").get_json()["expansion"]
    codes = [c["code"] for c in full["contains"]]
    page = referrer.get("/fhir/ValueSet/kat-route/$expand?offset=1&count=2").get_json()
    assert [c["code"] for c in page["expansion"]["contains"]] == codes[1:3]
    assert page["expansion"]["total"] == len(codes) and page["expansion"]["offset"] == 1
    filtered = _post(
        referrer,
        "/fhir/ValueSet/$expand",
        {"name": "url", "valueUri": url},
        {"name": "filter", "valueString": "LOZENGE"},
    ).get_json()
    assert [c["code"] for c in filtered["expansion"]["contains"]] == ["oral-lozenge"]
    # The same question gets the same expansion identifier.
    again = referrer.get(f"/fhir/ValueSet/$expand?url={url}").get_json()["expansion"]
    assert again["identifier"] == full["identifier"]


def test_expand_errors(referrer: FlaskClient) -> None:
    _outcome(referrer.get("/fhir/ValueSet/$expand"), 400, "url")
    _outcome(referrer.get("/fhir/ValueSet/$expand?url=http://loinc.org/vs"), 404, "url")
    _outcome(referrer.get(f"/fhir/ValueSet/$expand?url={BASE}/ValueSet/kat-route|99"), 404, "url")
    _outcome(referrer.get("/fhir/ValueSet/no-such/$expand"), 404, "ValueSet")
    _outcome(
        referrer.get(f"/fhir/ValueSet/$expand?url={BASE}/ValueSet/kat-route&count=x"), 400, "count"
    )
    body = _outcome(referrer.get("/fhir/ValueSet/kat-route/$expand?bogus=1&other=2"), 400, "bogus")
    assert len(body["issue"]) == 2  # one issue per problem
    _outcome(referrer.get("/fhir/ValueSet/kat-route/$expand?filter=a&filter=b"), 400, "filter")
    _outcome(
        referrer.post("/fhir/ValueSet/$expand", data="{}", content_type=FHIR), 400, "Parameters"
    )
    # A criterion ValueSet defined by is-a filters on SNOMED CT cannot be expanded here.
    criterion = next(c for c in load_criteria().values() if c.include.roots)
    _outcome(referrer.get(f"/fhir/ValueSet/$expand?url={criterion.url}"), 422, "url")
    anonymous = referrer.application.test_client()
    assert anonymous.get(f"/fhir/ValueSet/$expand?url={BASE}/ValueSet/kat-route").status_code == 401


def test_validate_code_every_member_and_non_members(referrer: FlaskClient) -> None:
    terminology = load_terminology()
    for url, members in terminology.value_sets.items():
        for system, code in sorted(members):
            body = referrer.get(
                "/fhir/ValueSet/$validate-code",
                query_string={"url": url, "system": system, "code": code},
            ).get_json()
            assert _value(body, "result") is True, (url, code)
        body = referrer.get(
            "/fhir/ValueSet/$validate-code",
            query_string={"url": url, "system": "http://example.org/x", "code": "nope"},
        ).get_json()
        assert_conformant(body)
        assert _value(body, "result") is False and "not in" in _value(body, "message")


def test_validate_code_forms(referrer: FlaskClient) -> None:
    url = f"{BASE}/ValueSet/kat-route"
    system = f"{BASE}/CodeSystem/kat-route"
    coding = {"system": system, "code": "intramuscular"}
    ok = _post(
        referrer,
        "/fhir/ValueSet/$validate-code",
        {"name": "url", "valueUri": url},
        {"name": "coding", "valueCoding": coding},
    ).get_json()
    assert _value(ok, "result") is True and _value(ok, "display") == "Intramuscular"
    concept = {"coding": [{"system": "http://snomed.info/sct", "code": "1"}, coding]}
    ok = _post(
        referrer,
        "/fhir/ValueSet/kat-route/$validate-code",
        {"name": "codeableConcept", "valueCodeableConcept": concept},
    ).get_json()
    assert _value(ok, "result") is True
    # A bare code of a single-system ValueSet; a wrong display is a false result.
    assert _value(
        referrer.get("/fhir/ValueSet/kat-route/$validate-code?code=buccal").get_json(), "result"
    )
    wrong = referrer.get(
        f"/fhir/ValueSet/kat-route/$validate-code?code=buccal&system={system}&display=Oral"
    ).get_json()
    assert _value(wrong, "result") is False and "display" in _value(wrong, "message")
    _outcome(referrer.get("/fhir/ValueSet/kat-route/$validate-code"), 400, "code")
    _outcome(
        _post(
            referrer,
            "/fhir/ValueSet/kat-route/$validate-code",
            {"name": "code", "valueCode": "buccal"},
            {"name": "coding", "valueCoding": coding},
        ),
        400,
        "code",
    )
    # A value that is not a code is never echoed (it could be a name or a PHN).
    echoed = referrer.get(
        "/fhir/ValueSet/kat-route/$validate-code?code=Jane%20Doe%209876543210"
    ).get_json()
    assert "Jane" not in json.dumps(echoed) and "9876543210" not in json.dumps(echoed)


def test_validate_code_criteria(referrer: FlaskClient) -> None:
    for criterion in load_criteria().values():
        for system, code in criterion.members():
            body = referrer.get(
                "/fhir/ValueSet/$validate-code",
                query_string={"url": criterion.url, "system": system, "code": code},
            ).get_json()
            assert _value(body, "result") is True, (criterion.id, code)


def test_lookup_every_concept(referrer: FlaskClient) -> None:
    for doc in load_terminology().resources:
        if doc["resourceType"] != "CodeSystem":
            continue
        for concept in doc["concept"]:
            body = referrer.get(
                "/fhir/CodeSystem/$lookup",
                query_string={"system": doc["url"], "code": concept["code"]},
            ).get_json()
            assert _value(body, "name") == doc["name"]
            assert _value(body, "display") == concept.get("display")
            assert _value(body, "version") == doc["version"]
    body = _post(
        referrer,
        "/fhir/CodeSystem/kat-route/$lookup",
        {"name": "coding", "valueCoding": {"code": "buccal"}},
    ).get_json()
    assert_conformant(body)
    assert _value(body, "display") == "Buccal"
    _outcome(referrer.get("/fhir/CodeSystem/kat-route/$lookup?code=nasal"), 404, "code")
    _outcome(referrer.get("/fhir/CodeSystem/$lookup?system=http://loinc.org&code=1"), 404, "system")
    _outcome(referrer.get("/fhir/CodeSystem/$lookup?code=buccal"), 400, "system")


def test_translate_every_row(referrer: FlaskClient) -> None:
    terminology = load_terminology()
    for doc in terminology.resources:
        if doc["resourceType"] != "ConceptMap":
            continue
        for group in doc["group"]:
            for element in group["element"]:
                body = referrer.get(
                    "/fhir/ConceptMap/$translate",
                    query_string={
                        "url": doc["url"],
                        "system": group["source"],
                        "code": element["code"],
                    },
                ).get_json()
                assert_conformant(body)
                expected = [t for t in element["target"] if "code" in t]
                matches = [p for p in body["parameter"] if p["name"] == "match"]
                if not expected:
                    assert _value(body, "result") is False
                    comment = element["target"][0].get("comment", "")
                    assert comment in _value(body, "message")
                    continue
                assert _value(body, "result") is True
                got = {
                    next(q["valueCoding"]["code"] for q in m["part"] if q["name"] == "concept")
                    for m in matches
                }
                # Several groups may map one source code (to different target systems).
                assert {t["code"] for t in expected} <= got


def test_translate_forms_and_errors(referrer: FlaskClient) -> None:
    url = f"{BASE}/ConceptMap/kat-route-to-snomed"
    ok = _post(
        referrer,
        "/fhir/ConceptMap/kat-route-to-snomed/$translate",
        {"name": "coding", "valueCoding": {"code": "intramuscular"}},
    ).get_json()
    assert _value(ok, "result") is True
    match = next(p for p in ok["parameter"] if p["name"] == "match")
    assert {q["name"] for q in match["part"]} == {"equivalence", "concept", "source"}
    missing = referrer.get(f"/fhir/ConceptMap/$translate?url={url}&code=nasal").get_json()
    assert _value(missing, "result") is False and "nasal" in _value(missing, "message")
    _outcome(referrer.get("/fhir/ConceptMap/$translate?code=nasal"), 400, "url")
    _outcome(
        referrer.get(f"/fhir/ConceptMap/$translate?url={url}&code=x&reverse=true"), 400, "reverse"
    )
    _outcome(
        referrer.get(f"/fhir/ConceptMap/$translate?url={url}&code=x&target=http://x/vs"),
        404,
        "target",
    )
    _outcome(referrer.get("/fhir/ConceptMap/nope/$translate?code=x"), 404, "ConceptMap")
