"""HL7 v2 referrals without the network: golden v2 → FHIR bundles (``tests/golden/v2/<case>.hl7``
→ ``<case>.bundle.json``, ``--update-golden`` rewrites them), invariants of every output, the
same referral as the native mapping (same ids, same workflow resources), the reader's rules and
the ACK's form per version."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from fhir_kat.clinical.protocol import load_protocol
from fhir_kat.mapping import MappingContext, map_artifact
from fhir_kat.search import iter_references
from fhir_kat.v2 import Header, Location, Problem, Refused, SenderContext, build_ack, locate
from fhir_kat.v2.referral import check_header, decode, parse, read_header, read_referral
from tests.support.conformance import assert_conformant
from tests.support.v2_messages import referral_message

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "v2"
CASES = sorted(GOLDEN.glob("*.hl7"))
CONTEXT = MappingContext(
    now=datetime(2026, 2, 1, 12, 0, tzinfo=UTC), submitter="golden-tests", protocol=load_protocol()
)
SENDER = SenderContext(
    name="clinic7-emr",
    organization_system="https://fhir-kat.example.org/fhir/sid/organization",
    organization_value="CLINIC-7",
    organization_name="Example Family Practice",
    timezone="America/Vancouver",
)


def read(raw: bytes, sender: SenderContext = SENDER) -> dict[str, Any]:
    message = parse(decode(raw))
    header = read_header(message)
    check_header(header, ("P",))
    return read_referral(message, header, sender).payload


def mapped(raw: bytes) -> dict[str, Any]:
    bundle: dict[str, Any] = map_artifact("v2", read(raw), CONTEXT)
    return bundle


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden(path: Path, request: pytest.FixtureRequest) -> None:
    expected = path.with_suffix(".bundle.json")
    got = mapped(path.read_bytes())
    if request.config.getoption("--update-golden"):
        expected.write_text(json.dumps(got, indent=2, ensure_ascii=False) + "\n")
    assert expected.exists(), f"no golden file; run pytest {__file__} --update-golden"
    assert got == json.loads(expected.read_text())
    _invariants(got)


def _invariants(bundle: dict[str, Any]) -> None:
    """FHIR-Converter's: valid R4, unique ids, every reference resolves, nothing empty."""
    assert_conformant(bundle)
    local = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]}
    assert len(local) == len(bundle["entry"])
    for entry in bundle["entry"]:
        for holder, path in iter_references(entry["resource"], "resource"):
            assert holder["reference"] in local, path
        assert "[]" not in json.dumps(entry) and "{}" not in json.dumps(entry)


def test_codes_are_stored_as_sent() -> None:
    bundle = mapped((GOLDEN / "v24-codes-as-sent.hl7").read_bytes())
    by_type: dict[str, list[dict[str, Any]]] = {}
    for entry in bundle["entry"]:
        by_type.setdefault(entry["resource"]["resourceType"], []).append(entry["resource"])
    codings = [c for cond in by_type["Condition"] for c in cond["code"]["coding"]]
    assert {
        "system": "http://snomed.info/sct",
        "code": "35489007",
        "display": "Depressive disorder",
    } in codings
    # I9 is not a coding system the receiver names: the code is kept, no system invented.
    assert {"code": "296.3", "display": "Major depressive disorder"} in codings
    allergy = by_type["AllergyIntolerance"][0]
    assert allergy["code"]["coding"][0]["system"] == "http://www.nlm.nih.gov/research/umls/rxnorm"
    assert allergy["category"] == ["medication"]
    patient = by_type["Patient"][0]
    assert patient["name"][0]["family"] == "O&Brien"  # \T\ unescaped
    other = next(i for i in patient["identifier"] if i["value"] == "A12345")
    assert other["system"] == "urn:oid:2.16.840.1.113883.3.999.9"
    practitioner = by_type["Practitioner"][0]
    assert practitioner["name"][0]["family"] == "Côté"  # 8859/1 per MSH-18
    assert {"system": "email", "value": "a.cote@clinic.example"} in practitioner["telecom"]
    sr = by_type["ServiceRequest"][0]
    assert sr["identifier"][0]["system"] == "urn:oid:2.16.840.1.113883.3.999.7.1"
    assert sr["priority"] == "asap"
    assert sr["reasonCode"] == [{"text": "Patient Preference"}]


def test_the_same_referral_as_the_native_mapping() -> None:
    example = json.loads((ROOT / "docs" / "examples" / "referrals.json").read_text())
    example["referrer"].pop("fhir_endpoint")  # no endpoint in a v2 referral (RRI is the route)
    native = map_artifact("referrals", example, CONTEXT)
    v2 = mapped(referral_message(example, "SAME-1").encode())

    def keyed(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
        out = {}
        for entry in bundle["entry"]:
            resource = entry["resource"]
            out[f"{resource['resourceType']}/{resource['id']}"] = resource
        return out

    native_resources, v2_resources = keyed(native), keyed(v2)
    for key, resource in native_resources.items():
        rtype = key.split("/")[0]
        if rtype in ("Task", "Practitioner"):
            assert v2_resources[key] == resource, key
        if rtype in ("Patient", "ServiceRequest", "PractitionerRole", "Organization"):
            assert key in v2_resources, key
    flags = [k for k, r in native_resources.items() if r["resourceType"] == "Observation"]
    for key in flags:  # prior treatment failure and each flag: the same Observation
        assert v2_resources[key] == native_resources[key], key


def test_mapping_files_shared_with_the_native_route_do_not_drift() -> None:
    for name in (
        "Organization-program",
        "Practitioner-referrer",
        "Task",
        "Observation-flag",
        "Observation-prior-treatment-failure",
    ):
        native = yaml.safe_load((ROOT / "mappings" / "referrals" / f"{name}.yaml").read_text())
        v2 = yaml.safe_load((ROOT / "mappings" / "v2" / f"{name}.yaml").read_text())
        assert v2 == native, name


def test_the_reader_names_every_problem_with_its_place() -> None:
    raw = referral_message(
        json.loads((ROOT / "docs" / "examples" / "referrals.json").read_text()), "X-1"
    )
    raw = raw.replace("|19840302|F|", "|1984|Q|").replace("\rPRD|RP^", "\rPRD|PP^")
    with pytest.raises(Refused) as refused:
        read(raw.encode())
    assert refused.value.ack_code == "AE"
    places = {(p.location.segment, p.location.field) for p in refused.value.problems if p.location}
    assert {("PID", 7), ("PID", 8), ("PRD", None)} <= places, refused.value.problems


def test_a_time_without_an_offset_needs_the_senders_timezone() -> None:
    raw = (GOLDEN / "eligible.hl7").read_bytes().replace(b"20260112093000-0800", b"202601120930")
    payload = read(raw)
    assert payload["authored_on"] == "2026-01-12T09:30:00-08:00"  # America/Vancouver
    no_zone = SenderContext(**{**SENDER.__dict__, "timezone": ""})
    with pytest.raises(Refused) as refused:
        read(raw, no_zone)
    assert refused.value.problems[0].code == "102"


def test_undeclared_non_ascii_is_refused_not_guessed() -> None:
    raw = (GOLDEN / "v24-codes-as-sent.hl7").read_bytes().replace(b"|8859/1", b"|")
    with pytest.raises(Refused) as refused:
        decode(raw)
    assert refused.value.problems[0].location == Location("MSH", 1, 18)


def test_locate_walks_up_to_the_nearest_known_place() -> None:
    places = {"conditions[1]": Location("DG1", 2, 3), "patient.phn": Location("PID", 1, 3, 1, 1)}
    assert locate(places, "conditions[1].codings[0].system") == Location("DG1", 2, 3)
    assert locate(places, "patient.phn") == Location("PID", 1, 3, 1, 1)
    assert locate(places, "urgency") is None


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (
            "2.5.1",
            [
                "ERR||PID^1^3^1^1|102^Data type error^HL70357|E||||bad \\S\\ PHN",
                "ERR||IN1^1|0^Message accepted^HL70357|W||||not stored",
            ],
        ),
        ("2.4", ["ERR|PID^1^3^102&Data type error&HL70357"]),
        ("2.3", ["ERR|PID^1^3^102&Data type error&HL70357"]),
    ],
)
def test_ack_form_per_version(version: str, expected: list[str]) -> None:
    header = Header(
        sending_application=("OSCAR",),
        sending_facility=("CLINIC7", "1.2.3", "ISO"),
        control_id="M-1",
        message_type="REF",
        event="I12",
        processing_id="P",
        version=version,
    )
    problems = [
        Problem("102", "bad ^ PHN", Location("PID", 1, 3, 1, 1)),
        Problem("0", "not stored", Location("IN1"), "W"),
    ]
    ack = build_ack(header, "AE", problems, now=CONTEXT.now, control_id="A-1").split("\r")
    assert ack[0].startswith("MSH|^~\\&|FHIR_KAT||OSCAR|CLINIC7^1.2.3^ISO|20260201120000+0000||")
    assert ack[0].split("|")[8] == ("ACK^I12" if version == "2.3" else "ACK^I12^ACK")
    assert ack[1] == "MSA|AE|M-1|bad \\S\\ PHN"
    assert [s for s in ack if s.startswith("ERR")] == expected
