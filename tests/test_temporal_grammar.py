"""R4's date, dateTime and instant grammar on every door (``validation.temporal``): any element of
those types anywhere in a resource — found by type from the R4B models, so also in extensions,
primitive extensions, nested items, contained resources and a Bundle's own elements — and the
date values of search and ``$export``. The property: for a random UTC offset at a random
element, the FHIR door and the native door (the artifacts' schemas) give the same verdict, the
one R4 gives (accepted exactly when the offset is Z or within ±14:00), and a refusal names the
element and never echoes the value."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_kat.artifacts import validate_artifact
from fhir_kat.search import parse_date_range
from fhir_kat.validation.resource import validate_resource
from fhir_kat.validation.temporal import GRAMMAR, temporal_issues
from tests.conftest import client_as

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
FHIR = "application/fhir+json"
MOMENT = "2026-03-04T05:06:07"
OBSERVATION = {"resourceType": "Observation", "status": "final", "code": {"text": "synthetic"}}
EXT = "https://fhir-kat.example.org/fhir/StructureDefinition/test"


def _obs(**elements: Any) -> dict[str, Any]:
    return {**OBSERVATION, **elements}


#: Element positions of every kind the walk must reach: (expected path, resource builder).
POSITIONS: dict[str, Callable[[str], dict[str, Any]]] = {
    "Observation.effectiveDateTime": lambda v: _obs(effectiveDateTime=v),
    "Observation.issued": lambda v: _obs(issued=v),
    "Observation.effectivePeriod.end": lambda v: _obs(effectivePeriod={"end": v}),
    "Observation.component[0].valueDateTime": lambda v: _obs(
        component=[{"code": {"text": "c"}, "valueDateTime": v}]
    ),
    "Observation.extension[0].valueDateTime": lambda v: _obs(
        extension=[{"url": EXT, "valueDateTime": v}]
    ),
    "Observation.meta.lastUpdated": lambda v: _obs(meta={"lastUpdated": v}),
    "Observation.contained[0].deceasedDateTime": lambda v: _obs(
        contained=[{"resourceType": "Patient", "id": "p1", "deceasedDateTime": v}]
    ),
    "Patient._birthDate.extension[0].valueDateTime": lambda v: {
        "resourceType": "Patient",
        "_birthDate": {"extension": [{"url": EXT, "valueDateTime": v}]},
    },
    "QuestionnaireResponse.item[0].item[0].answer[0].valueDateTime": lambda v: {
        "resourceType": "QuestionnaireResponse",
        "status": "completed",
        "item": [{"linkId": "g", "item": [{"linkId": "a", "answer": [{"valueDateTime": v}]}]}],
    },
    "Task.executionPeriod.start": lambda v: {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "executionPeriod": {"start": v},
    },
}
#: The Bundle's own elements (its entries' resources are checked one by one as written).
BUNDLE_POSITIONS: dict[str, Callable[[str], dict[str, Any]]] = {
    "Bundle.timestamp": lambda v: {"resourceType": "Bundle", "type": "batch", "timestamp": v},
    "Bundle.entry[0].request.ifModifiedSince": lambda v: {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": "Patient", "ifModifiedSince": v}}],
    },
    "Bundle.entry[0].response.lastModified": lambda v: {
        "resourceType": "Bundle",
        "type": "batch-response",
        "entry": [{"response": {"status": "200", "lastModified": v}}],
    },
}
#: Native artifacts' date-times: (kind, field).
NATIVE = [
    ("referrals", "authored_on"),
    ("consents", "signed_at"),
    ("screenings", "date"),
    ("medication-administrations", "start"),
    ("adverse-events", "reported_at"),
    ("questionnaire-responses", "authored"),
]


def _native(kind: str, name: str, value: str) -> list[str]:
    artifact = json.loads((EXAMPLES / f"{kind}.json").read_text())
    artifact[name] = value
    return [e for i in validate_artifact(kind, artifact).issues for e in i.expression]


def _offset(sign: str, hours: int, minutes: int) -> str:
    return f"{sign}{hours:02d}:{minutes:02d}"


def _fits(sign: str, hours: int, minutes: int) -> bool:
    return hours < 14 or (hours == 14 and minutes == 0)


offsets = st.tuples(st.sampled_from("+-"), st.integers(0, 23), st.integers(0, 59))


@settings(max_examples=300, deadline=None)  # no timing in tests (GUIDE)
@given(
    offset=offsets,
    position=st.sampled_from(sorted(POSITIONS)),
    bundle_position=st.sampled_from(sorted(BUNDLE_POSITIONS)),
    native=st.sampled_from(NATIVE),
    fraction=st.sampled_from(["", ".5", ".123456789"]),
)
def test_both_doors_agree_with_r4_on_any_offset_anywhere(
    offset: tuple[str, int, int],
    position: str,
    bundle_position: str,
    native: tuple[str, str],
    fraction: str,
) -> None:
    value = f"{MOMENT}{fraction}{_offset(*offset)}"
    fits = _fits(*offset)
    fhir = validate_resource(POSITIONS[position](value))
    assert [i.expression[0] for i in fhir] == ([] if fits else [position])
    shell = temporal_issues(
        BUNDLE_POSITIONS[bundle_position](value), "Bundle", skip_entry_resources=True
    )
    assert [i.expression[0] for i in shell] == ([] if fits else [bundle_position])
    for found in (*fhir, *shell):
        assert value not in found.diagnostics and _offset(*offset) not in found.diagnostics
    kind, name = native
    assert (name in _native(kind, name, value)) is (not fits)
    # The search door (date parameters, $export's _since) reads the same values alike.
    assert (parse_date_range(value) is not None) is fits


def test_z_and_the_edges_of_the_range() -> None:
    for value, fits in [
        (f"{MOMENT}Z", True),
        (f"{MOMENT}+14:00", True),
        (f"{MOMENT}-14:00", True),
        (f"{MOMENT}+14:01", False),
        (f"{MOMENT}-14:30", False),
        (f"{MOMENT}+00:00", True),
    ]:
        issues = validate_resource(_obs(effectiveDateTime=value))
        assert (issues == []) is fits, value
        assert (_native("referrals", "authored_on", value) == []) is fits, value


def test_the_grammar_is_r4s_for_each_type() -> None:
    """Each type's forms (R4 datatypes.html), on the element of that type."""
    cases = {
        "date": (["2026", "2026-03", "2026-03-04"], ["2026-3-4", "0000", f"{MOMENT}Z", "2026\n"]),
        "dateTime": (
            ["2026", "2026-03-04", f"{MOMENT}Z", f"{MOMENT}.5+05:30", "2026-03-04T23:59:60Z"],
            [MOMENT, "2026-03-04T05:06Z", "2026-03-04T24:00:00Z", f"{MOMENT}+0530"],
        ),
        "instant": ([f"{MOMENT}Z", f"{MOMENT}.001-08:00"], ["2026-03-04", MOMENT]),
    }
    for kind, (good, bad) in cases.items():
        for value in good:
            assert GRAMMAR[kind].fullmatch(value), (kind, value)
        for value in bad:
            assert not GRAMMAR[kind].fullmatch(value), (kind, value)
    element = {
        "date": lambda v: {"resourceType": "Patient", "birthDate": v},
        "dateTime": lambda v: _obs(effectiveDateTime=v),
        "instant": lambda v: _obs(issued=v),
    }
    for kind, (good, bad) in cases.items():
        for value in good:
            if kind == "date" or "T23:59:60" not in value:  # a leap second: Python has none
                assert validate_resource(element[kind](value)) == [], (kind, value)
        for value in bad:
            assert validate_resource(element[kind](value)) != [], (kind, value)


BAD = f"{MOMENT}+15:00"


def test_a_bundle_s_own_elements_and_date_parameters_are_refused_over_http(app: Flask) -> None:
    staff = client_as(app, "staff")
    for btype in ("transaction", "batch"):
        bundle = copy.deepcopy(BUNDLE_POSITIONS["Bundle.timestamp"](BAD))
        bundle["type"] = btype
        bundle["entry"] = [
            {
                "fullUrl": "urn:uuid:0c9f5a6e-1d2b-4c3a-8e7f-6a5b4c3d2e1f",
                "resource": {"resourceType": "Patient", "gender": "unknown"},
                "request": {"method": "POST", "url": "Patient"},
            }
        ]
        r = staff.post("/fhir", data=json.dumps(bundle), content_type=FHIR)
        assert r.status_code == 400, r.get_json()
        [problem] = r.get_json()["issue"]
        assert problem["expression"] == ["Bundle.timestamp"] and BAD not in json.dumps(problem)
    assert staff.get("/fhir/Patient").get_json()["total"] == 0  # nothing stored
    r = staff.post(
        "/fhir",
        data=json.dumps(BUNDLE_POSITIONS["Bundle.entry[0].request.ifModifiedSince"](BAD)),
        content_type=FHIR,
    )
    assert r.status_code == 400
    assert r.get_json()["issue"][0]["expression"] == ["Bundle.entry[0].request.ifModifiedSince"]
    message = {
        "resourceType": "Bundle",
        "id": "m-1",
        "type": "message",
        "timestamp": BAD,
        "entry": [
            {
                "fullUrl": "urn:uuid:3e2d1c0b-9a8f-4e7d-8c6b-5a4f3e2d1c0b",
                "resource": {
                    "resourceType": "MessageHeader",
                    "id": "h-1",
                    "eventCoding": {"system": "urn:example", "code": "x"},
                    "source": {"endpoint": "urn:example"},
                },
            }
        ],
    }
    r = staff.post("/fhir/$process-message", data=json.dumps(message), content_type=FHIR)
    assert r.status_code == 400, r.get_json()
    assert r.get_json()["issue"][0]["expression"] == ["Bundle.timestamp"]
    for query in (f"Observation?date=ge{BAD}", f"Patient?_lastUpdated=lt{BAD}"):
        r = staff.get("/fhir/" + query.replace("+", "%2B"))
        assert r.status_code == 400, query
