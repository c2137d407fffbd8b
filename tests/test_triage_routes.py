"""Triage of the codes issue 17 names (and the same classes beyond them), on all three entry
routes — native JSON, a FHIR transaction, ``$process-message`` — against a golden file.

``tests/golden/triage/issue-17-codes.input.json`` holds each case as a change to the example
referral (PTSD, treatment-resistant depression, prior treatment failure); the expected file holds
the Task's ``status``, ``businessStatus`` and ``statusReason``, which must be the same on every
route. ``pytest tests/test_triage_routes.py --update-golden`` rewrites it; review the diff like
code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from tests.conftest import client_as
from tests.test_messaging import as_message, outcome, process, referral, task_of, transform

GOLDEN = Path(__file__).parent / "golden" / "triage"
CASES: dict[str, dict[str, Any]] = json.loads((GOLDEN / "issue-17-codes.input.json").read_text())
EXPECTED = GOLDEN / "issue-17-codes.expected.json"


def test_the_issue_codes_on_all_three_routes(app: Flask, request: pytest.FixtureRequest) -> None:
    staff, referrer = client_as(app, "staff"), client_as(app, "referrer")
    got: dict[str, dict[str, Any]] = {}
    for n, (name, change) in enumerate(CASES.items()):
        native = referral(change, f"N-{n}", own_patient=True)
        r = staff.post(
            "/api/v1/referrals", data=json.dumps(native), content_type="application/json"
        )
        assert r.status_code == 201, (name, r.get_json())
        rest = transform(staff, referral(change, f"T-{n}", own_patient=True))
        r = referrer.post("/fhir", data=json.dumps(rest), content_type="application/fhir+json")
        assert r.status_code == 200, (name, r.get_json())
        message = as_message(transform(staff, referral(change, f"M-{n}", own_patient=True)))
        r = process(referrer, message)
        header = r.get_json()["entry"][0]["resource"]
        assert header["response"]["code"] == "ok", (name, r.get_json())
        results = {route: outcome(task_of(staff, f"{route}-{n}")) for route in ("N", "T", "M")}
        assert results["N"] == results["T"] == results["M"], (name, results)
        status, business, reason = results["N"]
        got[name] = {"status": status, "businessStatus": business, "statusReason": reason}
    if request.config.getoption("--update-golden"):
        EXPECTED.write_text(json.dumps(got, indent=2, ensure_ascii=False) + "\n")
    assert got == json.loads(EXPECTED.read_text())


def test_the_golden_outcomes_follow_the_issue() -> None:
    """What the issue asks of each case, independently of the recorded reasons."""
    expected = json.loads(EXPECTED.read_text())
    rejected = {
        "schizophrenia-58214004",
        "alzheimers-26929004",
        "alcoholic-cirrhosis-420054005",
        "aneurysm-432119003",
        "aneurysm-icd-I71.4",
        "depression-psychotic-F32.3",
        "recurrent-depression-psychotic-F33.3",
        "alcohol-withdrawal-delirium-F10.4",
        "substance-psychosis-F19.5",
        "atherosclerotic-heart-disease-I25.1",
        "intracerebral-haemorrhage-I61",
        "cirrhosis-K74.6",
        "pregnancy-O09",
        "pregnant-state-Z33",
        "heart-failure-uncontrolled",
        "resolved-intracerebral-haemorrhage",
    }
    eligible = {
        "only-depressive-disorder-35489007",
        "only-recurrent-major-depression-66344007",
        "only-chronic-ptsd-313182004",
        "tobacco-dependence-F17.2",
        "heart-failure-controlled",
        "resolved-delirium",
        "age-18-on-the-day",
    }
    for name, result in expected.items():
        want = "rejected" if name in rejected else "received" if name in eligible else "on-hold"
        assert result["status"] == want, name
    assert set(expected) == set(CASES)
    assert "SNOMED CT 999999999999" in expected["unknown-snomed-code"]["statusReason"]
    assert "ICD-10 L40.0" in expected["unclassified-icd-code"]["statusReason"]
    assert "SNOMED CT 25501002" in expected["only-social-phobia-25501002"]["statusReason"]
