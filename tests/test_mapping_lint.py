"""``lint_mappings`` (and ``fhir-kat mappings lint``): clean on the repository, and each kind of
mistake in a copy of ``mappings/`` is caught and named."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from fhir_kat.artifacts import MAPPED_SCHEMAS
from fhir_kat.mapping import lint_mappings, mapping_versions

MAPPINGS = Path(__file__).resolve().parents[1] / "mappings"


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, root)
    return root


def diagnostics(root: Path) -> list[str]:
    return [f"{' '.join(i.expression)}: {i.diagnostics}" for i in lint_mappings(root)]


def test_lint_passes_on_the_repository() -> None:
    assert lint_mappings() == []


def test_lint_passes_on_an_untouched_copy(copy: Path) -> None:
    assert diagnostics(copy) == []


def test_mapping_versions_name_every_file() -> None:
    versions = mapping_versions()
    assert versions["mappings/referrals/Patient.yaml"] == "2"
    assert all(isinstance(v, str) and v for v in versions.values())
    assert set(versions) == {
        f"mappings/{kind}/{path.name}"
        for kind in MAPPED_SCHEMAS
        for path in (MAPPINGS / kind).glob("*.yaml")
    }


def test_lint_catches_a_broken_mapping_file(copy: Path) -> None:
    (copy / "referrals" / "Broken.yaml").write_text(
        "resourceType: Unicorn\nid: [x]\nsurprise: 1\nresource:\n"
        "  a: {$path: patient.shoe_size}\n  b: {$map: {map: no-such-map, code: x}}\n"
        "  c: {$ref: Nowhere}\n  d: {$fn: {teleport: []}}\n  e: {$cs: {system: nope, code: x}}\n"
        "  f: {$teleport: 1}\n  g: {$path: item.code}\n  h: {$path: x, extra: 1}\n"
    )
    found = "\n".join(diagnostics(copy))
    for fragment in (
        "missing 'version'",
        "unknown key 'surprise'",
        "unknown FHIR resource type",
        "unknown source field 'patient.shoe_size'",
        "no ConceptMap no-such-map",
        "no target 'Nowhere'",
        "no registered function teleport",
        "no CodeSystem nope",
        "unknown operation $teleport",
        "'item.code' outside a repeat",
        "must stand alone",
    ):
        assert fragment in found, (fragment, found)


def test_lint_checks_target_elements(copy: Path) -> None:
    path = copy / "referrals" / "Task.yaml"
    path.write_text(
        path.read_text()
        .replace("  status: requested", "  statuss: requested")
        .replace("  code: {coding:", "  code: {codings:")
    )
    found = "\n".join(diagnostics(copy))
    assert "'statuss' is not an element of Task" in found
    assert "'codings' is not an element of CodeableConcept" in found


def test_lint_checks_repeats_and_constant_codes(copy: Path) -> None:
    path = copy / "referrals" / "Condition-diagnosis.yaml"
    path.write_text(path.read_text().replace("repeat: diagnoses", "repeat: reason"))
    task = copy / "referrals" / "Task.yaml"
    task.write_text(task.read_text().replace("code: received", "code: teleported"))
    found = "\n".join(diagnostics(copy))
    assert "repeat 'reason' is not a list field" in found
    assert "no code 'teleported'" in found


def test_lint_checks_terminology_and_protocol(copy: Path) -> None:
    (copy / "terminology" / "ValueSet-kat-route.json").unlink()
    protocol = copy / "program" / "protocol.yaml"
    protocol.write_text(protocol.read_text().replace("  oral-lozenge: {}\n", ""))
    found = "\n".join(diagnostics(copy))
    assert "source ValueSet https://fhir-kat.example.org/fhir/ValueSet/kat-route" in found
    assert "protocol:" in found


def test_lint_checks_questionnaires(copy: Path) -> None:
    path = copy / "questionnaires" / "Questionnaire-gad-7.json"
    doc = json.loads(path.read_text())
    first_question = next(i for i in doc["item"] if i.get("answerOption"))
    first_question["answerOption"][0]["valueCoding"] = {
        "system": "https://fhir-kat.example.org/fhir/CodeSystem/kat-instruments",
        "code": "gad7-never",
    }
    del doc["version"]
    path.write_text(json.dumps(doc))
    found = "\n".join(diagnostics(copy))
    assert "code 'gad7-never' is not in" in found
    assert "a canonical url of ours and a version" in found


def test_lint_checks_questionnaires_against_the_instruments(tmp_path: Path) -> None:
    """A new Questionnaire version must be listed where responses are checked, and every
    calculated item must be a total the service computes (so that a sent value is checked)."""
    found = {}
    for listed in (False, True):
        root = tmp_path / f"listed-{listed}" / "mappings"
        shutil.copytree(MAPPINGS, root)
        path = root / "questionnaires" / "Questionnaire-phq-9.json"
        doc = json.loads(path.read_text())
        doc["version"] = "7"
        doc["item"][-1]["code"] = [{"system": "http://loinc.org", "code": "44260-8"}]
        path.write_text(json.dumps(doc))
        if listed:
            catalogue = root / "instruments" / "instruments.yaml"
            text = re.sub(
                r"questionnaire_versions: \[[^\]]*\]",
                'questionnaire_versions: ["7"]',
                catalogue.read_text(),
                count=1,
            )
            catalogue.write_text(text)
        found[listed] = "\n".join(diagnostics(root))
    assert "version is not in instruments.yaml's questionnaire_versions" in found[False]
    assert "questionnaire_versions" not in found[True]
    for text in found.values():
        assert "calculated item 'phq9-total' is not the total the service computes" in text


def test_mappings_lint_command(capsys: pytest.CaptureFixture[str]) -> None:
    from fhir_kat.cli import main

    assert main(["mappings", "lint"]) == 0
    assert "ok" in capsys.readouterr().out
