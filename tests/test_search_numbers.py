"""R4 ``value-quantity`` search on Observation (the number index, ``search_number``), on both
databases: the prefixes, the implicit range of a search value's precision, units by
``|system|code`` and ``||code``, ``:missing``, refusals; and the internal parameters that share
the index stay out of reach of clients and out of the CapabilityStatement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from fhir_kat.search import all_params, params_for
from tests.test_fhir_rest import assert_outcome, ids, observation, patient, post
from tools.hl7_packages import ensure

UCUM = "http://unitsofmeasure.org"


@pytest.fixture
def weights(client: FlaskClient) -> dict[str, str]:
    pid = post(client, "/fhir/Patient", patient()).get_json()["id"]
    made = {}
    for key, quantity in {
        "w99.5": {"value": 99.5, "unit": "kg", "system": UCUM, "code": "kg"},
        "w100": {"value": 100, "unit": "kg", "system": UCUM, "code": "kg"},
        "w100.004": {"value": 100.004, "unit": "kg", "system": UCUM, "code": "kg"},
        "w100.5": {"value": 100.5, "unit": "kg", "system": UCUM, "code": "kg"},
        "lb": {"value": 100, "unit": "lb", "system": "urn:other", "code": "[lb_av]"},
        "score": {"value": 12.25, "unit": "{score}"},
    }.items():
        # Body weight, not a total score: a total in kg would be refused (issue 17).
        obs = observation(f"Patient/{pid}", code="29463-7")
        del obs["valueInteger"]
        obs["valueQuantity"] = quantity
        r = post(client, "/fhir/Observation", obs)
        assert r.status_code == 201, r.data
        made[key] = r.get_json()["id"]
    r = post(client, "/fhir/Observation", observation(f"Patient/{pid}", code="29463-7"))  # 12
    made["integer"] = r.get_json()["id"]
    return made


def test_value_quantity_prefixes_precision_and_units(
    client: FlaskClient, weights: dict[str, str]
) -> None:
    def found(query: str) -> set[str]:
        r = client.get(f"/fhir/Observation?{query}")
        assert r.status_code == 200, r.data
        names = {v: k for k, v in weights.items()}
        return {names[i] for i in ids(r.get_json())}

    kg = {"w99.5", "w100", "w100.004", "w100.5"}
    # 100 = [99.5, 100.5); 100.00 = [99.995, 100.005)
    assert found("value-quantity=100") == {"w99.5", "w100", "w100.004", "lb"}
    assert found("value-quantity=eq100.00") == {"w100", "w100.004", "lb"}
    assert found("value-quantity=ne100") == {"w100.5", "score"}
    assert found("value-quantity=gt100") == {"w100.004", "w100.5"}
    assert found("value-quantity=ge100") == {"w100", "w100.004", "w100.5", "lb"}
    assert found("value-quantity=lt100") == {"w99.5", "score"}
    assert found("value-quantity=le99.5") == {"w99.5", "score"}
    assert found(f"value-quantity=ge0|{UCUM}|kg") == kg
    assert found("value-quantity=100||[lb_av]") == {"lb"}
    assert found("value-quantity=100||lb") == {"lb"}  # the human unit, when no system
    assert found("value-quantity=12.25||{score}") == {"score"}
    assert found("value-quantity=12.25,99.5") == {"score", "w99.5"}
    assert found("value-quantity=ge99&value-quantity=lt100.5") == kg - {"w100.5"} | {"lb"}
    # valueInteger is not a Quantity: R4's value-quantity leaves it out
    assert found("value-quantity:missing=true") == {"integer"}
    assert found("value-quantity:missing=false") == set(weights) - {"integer"}


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("value-quantity=sa100", "not-supported"),
        ("value-quantity=ap100", "not-supported"),
        ("value-quantity=abc", "value"),
        ("value-quantity=", "value"),
        ("value-quantity=100|kg", "value"),
        ("value-quantity:exact=100", "not-supported"),
    ],
)
def test_value_quantity_refusals(client: FlaskClient, query: str, code: str) -> None:
    assert_outcome(client.get(f"/fhir/Observation?{query}"), 400, code)


def test_internal_parameters_are_not_searchable_nor_advertised(
    client: FlaskClient, weights: dict[str, str]
) -> None:
    internal = [n for n, p in all_params()["Observation"].items() if p.internal]
    assert internal and not set(internal) & set(params_for("Observation"))
    for name in internal:
        r = client.get(f"/fhir/Observation?{name}=12")
        assert r.status_code == 200 and len(ids(r.get_json())) == len(weights)  # ignored
        strict = client.get(f"/fhir/Observation?{name}=12", headers={"Prefer": "handling=strict"})
        assert_outcome(strict, 400, "not-supported")
    cap = client.get("/fhir/metadata").get_json()
    obs = next(x for x in cap["rest"][0]["resource"] if x["type"] == "Observation")
    params = {p["name"]: p["type"] for p in obs["searchParam"]}
    assert params["value-quantity"] == "quantity"
    assert not [n for n in params if n.startswith("internal")]


def test_value_quantity_matches_the_official_r4_definition(hl7_examples: Path) -> None:
    official = json.loads(
        (hl7_examples / "SearchParameter-Observation-value-quantity.json").read_text()
    )
    mine = all_params()["Observation"]["value-quantity"]
    assert (official["code"], official["type"], official["base"]) == (
        mine.name,
        mine.type,
        ["Observation"],
    )
    # (Observation.value as Quantity) | (Observation.value as SampledData): SampledData has no
    # single value to compare, so only the Quantity is indexed.
    assert "Observation.value as Quantity" in official["expression"]
    assert mine.paths == (("valueQuantity",),)


@pytest.fixture
def hl7_examples() -> Path:
    return ensure("hl7.fhir.r4.examples")
