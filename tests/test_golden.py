"""Golden pairs: ``tests/golden/<kind>/<case>.input.json`` → ``<case>.expected.json`` (the
transaction Bundle, or the OperationOutcome of a refusal with its HTTP status), with a fixed clock,
submitter and protocol.

Case names say what they are: ``minimal*``, ``complete*``, other accepted variants, and
``refused-*`` (each must be a 422 whose every issue has an ``expression``).

``pytest tests/test_golden.py --update-golden`` rewrites the expected files; review the diff like
code. (The option is registered in ``tests/conftest.py``; see ``tests/golden/README.md``.)
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fhir_kat.artifacts import KINDS
from fhir_kat.clinical.protocol import load_protocol
from fhir_kat.errors import FhirError
from fhir_kat.mapping import MappingContext, map_artifact

GOLDEN = Path(__file__).parent / "golden"
#: Artifact kinds only (``golden/triage/`` belongs to tests/test_triage_routes.py).
CASES = sorted(p for p in GOLDEN.glob("*/*.input.json") if p.parent.name in KINDS)
CONTEXT = MappingContext(
    now=datetime(2026, 2, 1, 12, 0, tzinfo=UTC), submitter="golden-tests", protocol=load_protocol()
)
#: Refusals every kind must have a golden case for.
REQUIRED_REFUSALS = ("refused-unknown-field", "refused-several-errors")


def case_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name.removesuffix('.input.json')}"


def run(path: Path) -> dict[str, Any]:
    kind = path.parent.name
    try:
        return map_artifact(kind, json.loads(path.read_text()), CONTEXT)
    except FhirError as exc:
        return {"status": exc.status, **exc.outcome()}


@pytest.mark.parametrize("path", CASES, ids=[case_id(p) for p in CASES])
def test_golden(path: Path, request: pytest.FixtureRequest) -> None:
    expected_path = path.with_name(path.name.replace(".input.", ".expected."))
    got = run(path)
    if request.config.getoption("--update-golden"):
        expected_path.write_text(json.dumps(got, indent=2, ensure_ascii=False) + "\n")
    assert expected_path.exists(), f"no golden file; run pytest {__file__} --update-golden"
    assert got == json.loads(expected_path.read_text())
    refused = path.name.startswith("refused-")
    assert ("status" in got) == refused, "refusal cases are named refused-*"
    if refused:
        assert got["status"] == 422 and got["issue"]
        assert all(i.get("expression") for i in got["issue"])
        assert all(i["severity"] == "error" for i in got["issue"])


def test_every_expected_file_has_an_input() -> None:
    for expected in GOLDEN.glob("*/*.expected.json"):
        assert expected.with_name(expected.name.replace(".expected.", ".input.")).exists(), expected


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_minimal_complete_and_refusal_cases(kind: str) -> None:
    names = [p.name.removesuffix(".input.json") for p in (GOLDEN / kind).glob("*.input.json")]
    assert any(n.startswith("minimal") for n in names), kind
    assert any(n.startswith("complete") for n in names), kind
    for refusal in REQUIRED_REFUSALS:
        assert refusal in names, (kind, refusal)


def test_the_clinical_refusals_the_issue_names_are_covered() -> None:
    names = {case_id(p) for p in CASES}
    for case in (
        "referrals/refused-unmapped-codes",
        "referrals/refused-phn-check-digit",
        "medication-administrations/refused-dose-out-of-range",
        "medication-administrations/override-accepted",
        "medication-administrations/refused-missing-weight",
        "medication-administrations/refused-oral-without-override",
        "medication-administrations/refused-override-inside-range",
        "medication-administrations/refused-unknown-adverse-event",
        "questionnaire-responses/refused-unknown-item",
        "questionnaire-responses/refused-answer-outside-options",
        "questionnaire-responses/refused-wrong-type",
    ):
        assert case in names, case


def test_several_errors_are_reported_together() -> None:
    """Schema problems first, then codes, clinical rules and ConceptMaps — in one outcome."""
    got = run(GOLDEN / "medication-administrations" / "refused-several-errors.input.json")
    codes = [i["code"] for i in got["issue"]]
    assert {"value", "required", "code-invalid"} <= set(codes)
    assert codes.index("code-invalid") > codes.index("value")
    expressions = [e for i in got["issue"] for e in i["expression"]]
    assert "body_weight_kg" in expressions  # the dose rule, beside the schema problems
    assert "adverse_events[1].kind" in expressions  # the terminology problem, too
