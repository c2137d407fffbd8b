"""Golden pairs: ``tests/golden/<kind>/<case>.input.json`` → ``<case>.expected.json`` (the
transaction Bundle, or the OperationOutcome of a refusal), with a fixed clock and submitter.
``pytest tests/test_golden.py --update-golden`` rewrites the expected files; review the diff."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fhir_kat.clinical.protocol import load_protocol
from fhir_kat.errors import FhirError
from fhir_kat.mapping import MappingContext, map_artifact

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(GOLDEN.glob("*/*.input.json"))
CONTEXT = MappingContext(
    now=datetime(2026, 2, 1, 12, 0, tzinfo=UTC), submitter="golden-tests", protocol=load_protocol()
)


def run(path: Path) -> dict[str, Any]:
    kind = path.parent.name
    try:
        return map_artifact(kind, json.loads(path.read_text()), CONTEXT)
    except FhirError as exc:
        return {"status": exc.status, **exc.outcome()}


@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name}/{p.name[:-11]}" for p in CASES])
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


def test_every_kind_has_minimal_complete_and_refusal_cases() -> None:
    for kind in (
        "referrals",
        "screenings",
        "consents",
        "medication-administrations",
        "questionnaire-responses",
    ):
        names = [p.name for p in (GOLDEN / kind).glob("*.input.json")]
        assert any(n.startswith("refused-") for n in names), kind
        assert any(n.startswith("complete") for n in names), kind
