"""``fhir_kat.artifacts``: the BC PHN rule, ``validate_artifact`` (every problem, the valid part
kept, unknown keys never echoed), and ``json_schema`` — a valid draft 2020-12 schema that accepts
every accepted golden input and the documented examples, and rejects unknown fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from fhir_kat.artifacts import (
    KINDS,
    bc_phn_check_digit,
    bc_phn_valid,
    json_schema,
    validate_artifact,
)
from tests.test_golden import CASES, case_id

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
ACCEPTED = [p for p in CASES if not p.name.startswith("refused-")]


def test_kinds_are_the_url_names() -> None:
    assert KINDS == (
        "referrals",
        "screenings",
        "consents",
        "medication-administrations",
        "questionnaire-responses",
        "adverse-events",
    )


@pytest.mark.parametrize(
    ("phn", "valid"),
    [
        ("9999999998", True),  # the synthetic PHN of the examples
        ("9698658215", True),  # python-stdnum's documented valid example
        ("9698648215", False),  # ... and its invalid-checksum example
        ("5736504210", False),  # first digit must be 9
        ("9999999997", False),
        ("999999999", False),
        ("99999999981", False),
        ("9999 999 998", False),  # separators are the sender's job to strip
        ("９９９９９９９９９８", False),  # full-width digits are digits to Python, not to BC
    ],
)
def test_bc_phn(phn: str, valid: bool) -> None:
    assert bc_phn_valid(phn) is valid


def test_no_phn_has_a_check_digit_of_ten() -> None:
    # remainder 1: no valid PHN starts with these nine digits
    first_nine = next(f"9{n:08d}" for n in range(10**8) if bc_phn_check_digit(f"9{n:08d}") is None)
    assert not any(bc_phn_valid(first_nine + str(d)) for d in range(10))


def test_validation_keeps_the_valid_part_and_names_every_problem() -> None:
    payload = json.loads((EXAMPLES / "medication-administrations.json").read_text())
    payload |= {"body_weight_kg": "heavy", "route": "teleport", "x y": 1}
    payload["adverse_events"] = [{"kind": "nausea"}, {"kind": 3}, {"kind": "vomiting"}]
    checked = validate_artifact("medication-administrations", payload)
    found = {(i.code, i.expression[0]) for i in checked.issues}
    assert found == {
        ("value", "body_weight_kg"),
        ("structure", "<field>"),  # an unknown key that is not field-shaped is not echoed
        ("value", "adverse_events[1].kind"),
        ("code-invalid", "route"),
    }
    assert "body_weight_kg" not in checked.data and checked.data["dose_mg"] == 84.0
    assert [a.get("kind") for a in checked.data["adverse_events"]] == ["nausea", None, "vomiting"]
    assert {"body_weight_kg", "adverse_events", "adverse_events[1]", "route"} <= checked.invalid


def test_a_non_object_is_one_structure_issue() -> None:
    checked = validate_artifact("referrals", [1, 2])
    assert [(i.code, i.expression) for i in checked.issues] == [("structure", ("$",))]


@pytest.mark.parametrize("kind", KINDS)
def test_json_schema_is_valid_and_accepts_the_example(kind: str) -> None:
    schema = json_schema(kind)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith(f"/api/v1/schemas/{kind}.json")
    example = json.loads((EXAMPLES / f"{kind}.json").read_text())
    validator = Draft202012Validator(schema)
    assert list(validator.iter_errors(example)) == []
    assert not validator.is_valid(example | {"surprise": 1})


@pytest.mark.parametrize("path", ACCEPTED, ids=[case_id(p) for p in ACCEPTED])
def test_json_schema_accepts_every_accepted_golden_input(path: Path) -> None:
    schema = json_schema(path.parent.name)
    assert list(Draft202012Validator(schema).iter_errors(json.loads(path.read_text()))) == []


def test_json_schema_lists_value_set_codes_and_required_fields() -> None:
    schema = json_schema("medication-administrations")
    assert schema["properties"]["route"]["enum"] == [
        "buccal",
        "intramuscular",
        "oral-lozenge",
        "sublingual",
    ]
    assert "kat-route" in schema["properties"]["route"]["description"]
    assert {"dose_mg", "route", "session_number", "patient_phn"} <= set(schema["required"])
    assert schema["properties"]["patient_phn"]["pattern"] == r"^9\d{9}$"
    events = schema["properties"]["adverse_events"]
    assert events["type"] == "array" and events["items"]["additionalProperties"] is False
    weight = schema["properties"]["body_weight_kg"]
    assert (weight["type"], weight["minimum"], weight["maximum"]) == ("number", 25, 300)
    referral = json_schema("referrals")
    assert referral["properties"]["prior_treatment_failure"]["type"] == ["boolean", "null"]
    assert referral["properties"]["authored_on"]["format"] == "date-time"
    qr = json_schema("questionnaire-responses")
    answer = qr["properties"]["answers"]["items"]["properties"]["answer"]
    assert answer["type"] == ["string", "number"]  # an option's code, or the total


def _field_paths(schema_cls: Any, prefix: str = "") -> list[str]:
    from marshmallow import fields

    out = []
    for name, fld in schema_cls._declared_fields.items():
        many = isinstance(fld, fields.List)
        inner = fld.inner if many else fld
        path = f"{prefix}{name}{'[]' if many else ''}"
        out.append(path)
        if isinstance(inner, fields.Nested):
            out += _field_paths(type(inner.schema), f"{path}.")
    return out


def test_every_field_is_in_the_field_reference() -> None:
    from fhir_kat.artifacts import SCHEMAS

    text = (EXAMPLES.parent / "artifacts.md").read_text()
    for kind, schema in SCHEMAS.items():
        section = text.split(f"\n## {kind}\n", 1)[1].split("\n## ", 1)[0]
        for path in _field_paths(schema):
            assert f"| `{path}` |" in section, (kind, path)
