"""FHIR resources the safety tests write: a PHQ-9 QuestionnaireResponse from answer values and
an AdverseEvent by program kind and R4 seriousness (synthetic)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fhir_kat.canonical import read_definition

QUESTIONNAIRES = Path(__file__).resolve().parents[2] / "mappings" / "questionnaires"
AE_KINDS = "https://fhir-kat.example.org/fhir/CodeSystem/kat-adverse-event"
SERIOUSNESS = "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness"


def phq9_response(values: list[int | None], rid: str, when: str, subject: str) -> dict[str, Any]:
    """Items 1-9 answered with the option of each value (None: skipped)."""
    q = json.loads(read_definition(QUESTIONNAIRES / "Questionnaire-phq-9.json"))
    items = {i["linkId"]: i for i in q["item"]}
    answered = [
        {
            "linkId": f"phq9-{n + 1}",
            "answer": [{"valueCoding": items[f"phq9-{n + 1}"]["answerOption"][v]["valueCoding"]}],
        }
        for n, v in enumerate(values)
        if v is not None
    ]
    return {
        "resourceType": "QuestionnaireResponse",
        "id": rid,
        "questionnaire": f"{q['url']}|{q['version']}",
        "status": "completed",
        "subject": {"reference": subject},
        "authored": when,
        "item": answered,
    }


def adverse_event(
    kind: str | None, seriousness: str | None, subject: str, **extra: Any
) -> dict[str, Any]:
    """An actual AdverseEvent coded with a program kind (None: text only) and a seriousness
    code of the R4 CodeSystem (None: not stated)."""
    ae: dict[str, Any] = {
        "resourceType": "AdverseEvent",
        "actuality": "actual",
        "subject": {"reference": subject},
        "date": "2026-02-13T20:00:00-08:00",
        "event": {"text": "synthetic"},
    }
    if kind:
        ae["event"]["coding"] = [{"system": AE_KINDS, "code": kind}]
    if seriousness:
        ae["seriousness"] = {"coding": [{"system": SERIOUSNESS, "code": seriousness}]}
    return {**ae, **extra}
