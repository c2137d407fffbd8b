"""``fhir_kat.terminology``: ConceptMaps translate or refuse (naming code and map), ValueSets
expand from our CodeSystems, files it cannot interpret stop it, and diagnostics never echo a
value that does not look like a code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhir_kat.terminology import (
    BASE,
    TerminologyError,
    UnmappedCode,
    load_terminology,
    safe_code,
    translate,
    validate_code,
)

ROUTE_MAP = f"{BASE}/ConceptMap/kat-route-to-snomed"
ROUTES = f"{BASE}/CodeSystem/kat-route"
DIAGNOSES = f"{BASE}/CodeSystem/kat-diagnosis"


def test_translate_gives_target_codings() -> None:
    assert translate(ROUTE_MAP, ROUTES, "intramuscular") == [
        {"system": "http://snomed.info/sct", "code": "78421000", "display": "Intramuscular route"}
    ]


def test_an_unmapped_code_names_the_code_and_the_map() -> None:
    with pytest.raises(UnmappedCode) as caught:
        translate(ROUTE_MAP, ROUTES, "intranasal")
    assert "'intranasal'" in str(caught.value) and ROUTE_MAP in str(caught.value)
    with pytest.raises(UnmappedCode):
        translate(ROUTE_MAP, DIAGNOSES, "intramuscular")  # right code, wrong source system


def test_deliberately_unmatched_codes_carry_the_maps_reason() -> None:
    term = load_terminology()
    icd = f"{BASE}/ConceptMap/kat-diagnosis-to-icd10"
    with pytest.raises(UnmappedCode, match="no code for treatment-resistant depression"):
        translate(icd, DIAGNOSES, "treatment-resistant-depression")
    assert term.translate(icd, "treatment-resistant-depression", optional=True) == []
    with pytest.raises(UnmappedCode):  # optional forgives only what the map itself declares
        term.translate(icd, "burnout", optional=True)


def test_validate_code_against_value_sets() -> None:
    purposes = f"{BASE}/ValueSet/kat-purpose-of-use"
    act_reason = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
    assert validate_code(purposes, act_reason, "PUBHLTH")
    assert not validate_code(purposes, act_reason, "MARKETING")
    assert not validate_code(purposes, "http://example.org", "PUBHLTH")
    # A ValueSet including a whole CodeSystem of ours expands to all of its codes.
    assert validate_code(f"{BASE}/ValueSet/kat-route", ROUTES, "buccal")
    assert load_terminology().value_set_codes("kat-intake-decision") == [
        "cleared",
        "declined",
        "needs-review",
    ]


def test_every_concept_map_source_is_one_of_our_value_sets() -> None:
    term = load_terminology()
    for table in term.concept_maps.values():
        assert table.source_value_set in term.value_sets, table.url


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("nausea", "nausea"),
        ("HOPERAT", "HOPERAT"),
        ("F41.1", "F41.1"),
        ("250-555-0100", "<value>"),  # a phone number
        ("9999999998", "<value>"),  # a PHN
        ("1984-03-02", "<value>"),
        ("Avery Testcase", "<value>"),
        ("Smith", "<value>"),
        ("a" * 41, "<value>"),
    ],
)
def test_safe_code(value: str, shown: str) -> None:
    assert safe_code(value) == shown


def _folder(path: Path, *docs: dict[str, object]) -> Path:
    path.mkdir()
    for i, doc in enumerate(docs):
        (path / f"{i}.json").write_text(json.dumps(doc))
    return path


def test_files_it_cannot_interpret_are_refused(tmp_path: Path) -> None:
    value_set = {
        "resourceType": "ValueSet",
        "url": f"{BASE}/ValueSet/all-snomed",
        "compose": {"include": [{"system": "http://snomed.info/sct"}]},
    }
    with pytest.raises(TerminologyError, match="cannot expand"):
        load_terminology(_folder(tmp_path / "a", value_set))
    filtered = value_set | {
        "compose": {"include": [{"system": ROUTES, "filter": [{"property": "x"}]}]}
    }
    with pytest.raises(TerminologyError, match="only include by system"):
        load_terminology(_folder(tmp_path / "b", filtered))
    with pytest.raises(TerminologyError, match="not a CodeSystem"):
        load_terminology(_folder(tmp_path / "c", {"resourceType": "Patient", "url": "x"}))
