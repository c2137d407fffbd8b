"""Invariants of every mapped output (FHIR-Converter's habit): valid R4B, conformant to HL7's R4
definitions, every reference resolves, ids unique, no empty elements, deterministic, and every
coded value traces to a ConceptMap/CodeSystem of ours, a code DOMAIN.md names, or a constant of
a mapping file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from fhir_kat.mapping import lint_mappings
from fhir_kat.mapping.engine import ENGINE_CODES
from fhir_kat.terminology import load_terminology
from fhir_kat.validation.resource import structure_issues
from tests.support.conformance import assert_conformant
from tests.test_golden import CASES, run

MAPPED = [p for p in CASES if not p.name.startswith("refused-")]
#: References that point at stored data another artifact created (by deterministic id).
EXTERNAL = {
    "screenings": {"Patient", "Task", "ServiceRequest"},
    "consents": {"Patient", "Organization"},
    "medication-administrations": {"Patient", "Organization"},
    "questionnaire-responses": {"Patient"},
}


def _codings(node: Any) -> list[dict[str, Any]]:
    out = []
    if isinstance(node, dict):
        if "system" in node and "code" in node and isinstance(node["code"], str):
            out.append(node)
        for value in node.values():
            out += _codings(value)
    elif isinstance(node, list):
        for value in node:
            out += _codings(value)
    return out


def _refs(node: Any) -> list[str]:
    out = []
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            out.append(node["reference"])
        for value in node.values():
            out += _refs(value)
    elif isinstance(node, list):
        for value in node:
            out += _refs(value)
    return out


def _empty(node: Any) -> bool:
    if node in (None, "", [], {}):
        return True
    if isinstance(node, dict):
        return any(_empty(v) for v in node.values())
    if isinstance(node, list):
        return any(_empty(v) for v in node)
    return False


@pytest.fixture(scope="module")
def constant_codes() -> set[tuple[str, str]]:
    """(system, code) pairs written as constants in mapping files or shipped Questionnaires."""
    root = Path(__file__).resolve().parents[1] / "mappings"
    found: set[tuple[str, str]] = set()
    for path in root.glob("*/*.yaml"):
        found |= {
            (c["system"], c["code"])
            for c in _codings(yaml.safe_load(path.read_text()))
            if isinstance(c.get("system"), str)
        }
    for path in root.glob("questionnaires/*.json"):
        found |= {(c["system"], c["code"]) for c in _codings(json.loads(path.read_text()))}
    return found | {(c["system"], c["code"]) for c in ENGINE_CODES}


@pytest.mark.parametrize("path", MAPPED, ids=[f"{p.parent.name}/{p.name[:-11]}" for p in MAPPED])
def test_output_invariants(path: Path, constant_codes: set[tuple[str, str]]) -> None:
    bundle = run(path)
    assert bundle == run(path), "mapping is not deterministic"
    resources = [e["resource"] for e in bundle["entry"]]
    keys = [f"{r['resourceType']}/{r['id']}" for r in resources]
    assert len(keys) == len(set(keys)), "ids are not unique"
    term = load_terminology()
    mapped = {
        (c["system"], c["code"])
        for targets in term.concept_maps.values()
        for codings in targets.values()
        for c in codings
    }
    local = {(system, code) for system, codes in term.code_systems.items() for code in codes}
    local |= {pair for codes in term.value_sets.values() for pair in codes}
    external = EXTERNAL.get(path.parent.name, set())
    for entry, resource in zip(bundle["entry"], resources, strict=True):
        assert entry["request"] == {
            "method": "PUT",
            "url": f"{resource['resourceType']}/{resource['id']}",
        }
        assert not structure_issues(resource), structure_issues(resource)
        assert_conformant(resource)
        assert not _empty(resource), f"empty element in {resource['resourceType']}"
        for ref in _refs(resource):
            assert ref in keys or ref.split("/")[0] in external, f"dangling {ref}"
        for coding in _codings(resource):
            pair = (coding["system"], coding["code"])
            if coding["system"] in ("http://unitsofmeasure.org",):
                continue
            assert pair in mapped | local | constant_codes, f"untraceable code {pair}"


def test_lint_passes_on_the_repository() -> None:
    assert lint_mappings() == []


def test_lint_catches_broken_mappings(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1] / "mappings"
    for kind in (
        "referrals",
        "screenings",
        "consents",
        "medication-administrations",
        "questionnaire-responses",
    ):
        (tmp_path / kind).mkdir()
        for f in (root / kind).glob("*.yaml"):
            (tmp_path / kind / f.name).write_text(f.read_text())
    (tmp_path / "referrals" / "Broken.yaml").write_text(
        "resourceType: Unicorn\nid: [x]\nresource:\n"
        "  a: {$path: patient.shoe_size}\n  b: {$map: {map: no-such-map, code: x}}\n"
        "  c: {$ref: Nowhere}\n  d: {$fn: {teleport: []}}\n  e: {$cs: {system: nope, code: x}}\n"
    )
    problems = {i.diagnostics for i in lint_mappings(tmp_path)}
    for fragment in (
        "missing 'version'",
        "unknown FHIR resource type",
        "shoe_size",
        "no ConceptMap",
        "no target",
        "teleport",
        "no CodeSystem",
    ):
        assert any(fragment in p for p in problems), (fragment, problems)


def test_mappings_lint_command(capsys: pytest.CaptureFixture[str]) -> None:
    from fhir_kat.cli import main

    assert main(["mappings", "lint"]) == 0
    assert "ok" in capsys.readouterr().out
