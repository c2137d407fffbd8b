"""Invariants of every mapped output (FHIR-Converter's habit), checked on every golden case:
valid R4B, conformant to HL7's R4 definitions, every reference resolves, ids unique, no empty
elements, deterministic, every coded value traces to our terminology or a mapping file's
constant — plus the identity rules across kinds and the refusal paths' robustness.

References that leave the bundle are allowed only where an artifact points at data another
artifact stored (by the same deterministic id): ``EXTERNAL`` lists them. A screening's Task and
ServiceRequest are the referral's (the store refuses the screening with 422 when they are not
stored); a session's Patient is the referral's; the program Organization is the referral's.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from fhir.resources.R4B import get_fhir_model_class

from fhir_kat.canonical import read_definition
from fhir_kat.errors import Unprocessable
from fhir_kat.exchange.bundles import identifier_query
from fhir_kat.mapping import map_artifact
from fhir_kat.mapping.engine import ENGINE_CODES, deterministic_id
from fhir_kat.terminology import load_terminology
from fhir_kat.validation.narrative import narrative_issues
from fhir_kat.validation.resource import structure_issues
from tests.support.conformance import assert_conformant
from tests.test_golden import CASES, CONTEXT, GOLDEN, case_id, run

MAPPED = [p for p in CASES if not p.name.startswith("refused-")]
MAPPING_FILES = sorted((Path(__file__).resolve().parents[1] / "mappings").glob("*/*.yaml"))
MAPPING_FILES = [f for f in MAPPING_FILES if "resourceType" in yaml.safe_load(f.read_text())]
REFUSED = [p for p in CASES if p.name.startswith("refused-")]
#: References that point at stored data another artifact created (by deterministic id).
EXTERNAL = {
    "screenings": {"Patient", "Task", "ServiceRequest"},
    "consents": {"Patient", "Organization"},
    "medication-administrations": {"Patient"},
    "questionnaire-responses": {"Patient"},
    # A report names the session it followed: that session's Encounter and administration.
    "adverse-events": {"Patient", "Encounter", "MedicationAdministration"},
}
#: Input fields whose values are PHI or free text: never in a diagnostic.
PHI_KEYS = {
    "phn",
    "patient_phn",
    "family_name",
    "given_names",
    "birth_date",
    "phone",
    "email",
    "reason",
    "notes",
    "note",
    "description",
    "title",
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


def _contact_points(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, list):
        return [c for item in node for c in _contact_points(item)]
    if not isinstance(node, dict):
        return []
    own = [c for c in node.get("telecom", []) if isinstance(c, dict)]
    return own + [c for k, v in node.items() if k != "telecom" for c in _contact_points(v)]


def test_every_emitted_resource_type_is_covered_by_a_narrative() -> None:
    """The golden cases emit every type the mappings write, each with its narrative."""
    emitted = {e["resource"]["resourceType"] for p in MAPPED for e in run(p)["entry"]}
    written = {yaml.safe_load(f.read_text())["resourceType"] for f in MAPPING_FILES}
    assert written <= emitted, written - emitted
    assert "Provenance" in emitted


def _empty(node: Any) -> bool:
    if node in (None, "", [], {}):
        return True
    if isinstance(node, dict):
        return any(_empty(v) for v in node.values())
    if isinstance(node, list):
        return any(_empty(v) for v in node)
    return False


def _phi_values(node: Any, key: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            out |= _phi_values(v, k)
    elif isinstance(node, list):
        for v in node:
            out |= _phi_values(v, key)
    elif isinstance(node, str) and key in PHI_KEYS and len(node) >= 3:
        out.add(node)
    return out


@pytest.fixture(scope="module")
def constant_codes() -> set[tuple[str, str]]:
    """(system, code) pairs written as constants in mapping files or shipped Questionnaires."""
    root = Path(__file__).resolve().parents[1] / "mappings"
    found: set[tuple[str, str]] = set()
    for kind in EXTERNAL.keys() | {"referrals"}:
        for path in (root / kind).glob("*.yaml"):
            found |= {
                (c["system"], c["code"])
                for c in _codings(yaml.safe_load(read_definition(path)))
                if isinstance(c.get("system"), str)
            }
    for path in root.glob("questionnaires/*.json"):
        found |= {(c["system"], c["code"]) for c in _codings(json.loads(read_definition(path)))}
    return found | {(c["system"], c["code"]) for c in ENGINE_CODES}


def _input_codes(artifact: Any) -> set[tuple[str, str]]:
    """Codes the artifact itself carries and the mapping passes through: a referral's coded
    conditions (system and code as sent) and their HL7 status codes (schema defaults when
    not sent)."""
    found: set[tuple[str, str]] = set()
    for item in artifact.get("conditions", []) if isinstance(artifact, dict) else []:
        found.add((item["system"], item["code"]))
        found.add((CONDITION_CLINICAL, item.get("clinical_status", "active")))
        found.add((CONDITION_VERIFICATION, item.get("verification_status", "confirmed")))
    return found


CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"


@pytest.fixture(scope="module")
def terminology_codes() -> set[tuple[str, str]]:
    term = load_terminology()
    mapped = {
        (c["system"], c["code"])
        for table in term.concept_maps.values()
        for codings in table.targets.values()
        for c in codings
    }
    local = {(system, code) for system, codes in term.code_systems.items() for code in codes}
    return mapped | local | {pair for members in term.value_sets.values() for pair in members}


@pytest.mark.parametrize("path", MAPPED, ids=[case_id(p) for p in MAPPED])
def test_output_invariants(
    path: Path, constant_codes: set[tuple[str, str]], terminology_codes: set[tuple[str, str]]
) -> None:
    bundle = run(path)
    again = run(path)
    assert json.dumps(bundle) == json.dumps(again), "mapping is not deterministic"
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    resources = [e["resource"] for e in bundle["entry"]]
    keys = [f"{r['resourceType']}/{r['id']}" for r in resources]
    assert len(keys) == len(set(keys)), "ids are not unique"
    external = EXTERNAL.get(path.parent.name, set())
    for entry, resource in zip(bundle["entry"], resources, strict=True):
        rtype, rid = resource["resourceType"], resource["id"]
        assert entry["fullUrl"] == f"urn:uuid:{rid}"
        assert entry["request"] == {"method": "PUT", "url": f"{rtype}/{rid}"}
        get_fhir_model_class(rtype).model_validate(resource)
        assert not structure_issues(resource), structure_issues(resource)
        assert_conformant(resource)
        assert not _empty(resource), f"empty element in {rtype}"
        # dom-6: a generated narrative, valid XHTML under txt-1/txt-2 (validation.narrative)
        assert resource["text"]["status"] == "generated", rtype
        assert not narrative_issues(resource, rtype), narrative_issues(resource, rtype)
        # no ContactPoint without a value (a bare "system: phone" tells a reader nothing)
        for contact in _contact_points(resource):
            assert contact.get("value"), f"telecom without a value in {rtype}"
        if rtype == "Observation":  # bulk clients filter on it (SMART Fetch drops the rest)
            assert resource.get("category"), f"Observation {resource['code']} has no category"
        for ref in _refs(resource):
            assert ref in keys or ref.split("/")[0] in external, f"dangling {ref}"
        if rtype != "Provenance":  # R4 Provenance has no identifier element
            # Every resource has a business identifier, so a partner can conditionally create
            # it and a re-send matches it (docs/exchange.md).
            assert identifier_query(resource) is not None, f"{rtype} has no identifier"
        passed_through = _input_codes(json.loads(path.read_text()))
        for coding in _codings(resource):
            pair = (coding["system"], coding["code"])
            if coding["system"] == "http://unitsofmeasure.org":
                continue  # UCUM units are written in the mapping files, not coded concepts
            traceable = terminology_codes | constant_codes | passed_through
            assert pair in traceable, f"untraceable code {pair}"


@pytest.mark.parametrize("path", MAPPED, ids=[case_id(p) for p in MAPPED])
def test_provenance_covers_the_bundle(path: Path) -> None:
    bundle = run(path)
    resources = [e["resource"] for e in bundle["entry"]]
    provenance = [r for r in resources if r["resourceType"] == "Provenance"]
    assert len(provenance) == 1
    prov = provenance[0]
    targets = {t["reference"] for t in prov["target"]}
    assert targets == {f"{r['resourceType']}/{r['id']}" for r in resources if r is not prov}
    assert prov["recorded"] == CONTEXT.now.isoformat()
    assert prov["agent"][0]["who"]["identifier"]["value"] == CONTEXT.submitter
    assert all("#v" in p for p in prov["policy"])
    assert any(f"mappings/{path.parent.name}/" in p for p in prov["policy"])


@pytest.mark.parametrize("path", REFUSED, ids=[case_id(p) for p in REFUSED])
def test_refusals_name_fields_never_phi(path: Path) -> None:
    outcome = run(path)
    payload = json.loads(path.read_text())
    text = json.dumps(outcome["issue"])
    for value in _phi_values(payload):
        assert value not in text, f"{case_id(path)} echoes an input value"


def _leaf_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _leaf_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += _leaf_paths(value, (*prefix, index))
    return out


def _replace(node: Any, path: tuple[Any, ...], value: Any) -> Any:
    changed = copy.deepcopy(node)
    holder = changed
    for step in path[:-1]:
        holder = holder[step]
    if value is _REMOVE:
        del holder[path[-1]]
    else:
        holder[path[-1]] = value
    return changed


_REMOVE = object()


@pytest.mark.parametrize("path", MAPPED, ids=[case_id(p) for p in MAPPED])
def test_broken_fields_are_refused_never_crash(path: Path) -> None:
    """Every field at every depth removed or given a wrong type: a 422 or a Bundle, never a
    crash — the engine runs on the valid part of a refused artifact to report every problem at
    once, so it must tolerate any hole in it."""
    kind = path.parent.name
    payload = json.loads(path.read_text())
    for where in _leaf_paths(payload):
        for broken in (_REMOVE, None, 12345, "x", {"x": 1}, [None]):
            try:
                map_artifact(kind, _replace(payload, where, broken), CONTEXT)
            except Unprocessable as exc:
                assert exc.issues and all(i.expression for i in exc.issues), where


def _bundle(kind: str, case: str) -> dict[str, Any]:
    return run(GOLDEN / kind / f"{case}.input.json")


def _ids(bundle: dict[str, Any], rtype: str) -> set[str]:
    return {e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype}


def test_one_phn_is_one_patient_across_kinds_and_issuers() -> None:
    referral = _bundle("referrals", "complete")
    legacy = _bundle("referrals", "legacy-phn-system")
    (patient_id,) = _ids(referral, "Patient")
    assert _ids(legacy, "Patient") == {patient_id} == {deterministic_id("Patient", "9999999998")}
    patient = next(e["resource"] for e in legacy["entry"] if e["resource"]["id"] == patient_id)
    (phn,) = patient["identifier"]
    assert (
        phn["system"]
        == "https://fhir.infoway-inforoute.ca/NamingSystem/ca-bc-patient-healthcare-id"
    )
    assert phn["type"]["coding"][0]["code"] == "JHN"
    for kind, case in (
        ("screenings", "complete"),
        ("consents", "complete"),
        ("medication-administrations", "complete"),
        ("questionnaire-responses", "complete-phq9"),
    ):
        refs = {r for e in _bundle(kind, case)["entry"] for r in _refs(e["resource"])}
        assert f"Patient/{patient_id}" in refs, kind


def test_a_screening_points_at_its_referrals_task() -> None:
    referral = _bundle("referrals", "complete")
    screening = _bundle("screenings", "complete")
    (task,) = _ids(referral, "Task")
    (request,) = _ids(referral, "ServiceRequest")
    refs = {r for e in screening["entry"] for r in _refs(e["resource"])}
    assert f"Task/{task}" in refs and f"ServiceRequest/{request}" in refs


def test_a_changed_artifact_keeps_its_ids() -> None:
    path = GOLDEN / "referrals" / "complete.input.json"
    payload = json.loads(path.read_text())
    changed = copy.deepcopy(payload)
    changed["notes"] = "Changed synthetic note"
    changed["urgency"] = "urgent"
    first, second = run(path), map_artifact("referrals", changed, CONTEXT)
    assert [e["fullUrl"] for e in first["entry"]] == [e["fullUrl"] for e in second["entry"]]
    assert first != second


def test_privacy_consents_have_a_patient_and_a_permitted_party() -> None:
    for path in MAPPED:
        if path.parent.name != "consents":
            continue
        for entry in run(path)["entry"]:
            consent = entry["resource"]
            if consent["resourceType"] != "Consent":
                continue
            scope = {c["code"] for c in consent["scope"]["coding"]}
            assert consent.get("patient"), case_id(path)
            if "patient-privacy" in scope:
                assert consent["provision"]["actor"], case_id(path)
                assert consent["provision"]["purpose"], case_id(path)


def test_override_is_recorded_on_the_administration() -> None:
    for case, check in (("override-accepted", "out-of-range"), ("oral-with-override", "no-range")):
        bundle = _bundle("medication-administrations", case)
        (ma,) = [
            e["resource"]
            for e in bundle["entry"]
            if e["resource"]["resourceType"] == "MedicationAdministration"
        ]
        (ext,) = [e for e in ma["extension"] if e["url"].endswith("/dose-override")]
        parts = {x["url"]: x for x in ext["extension"]}
        assert parts["check"]["valueCoding"]["code"] == check
        assert parts["reason"]["valueString"] and parts["clinician"]["valueReference"]
        assert "Clinician override" in ma["note"][0]["text"]
