"""The registered functions mapping files may call (``$fn``), and the clinical checks run on an
artifact before it is mapped. A closed list: lint refuses any other name."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from fhir_kat.clinical.dose import dose_issues, mg_per_kg
from fhir_kat.clinical.protocol import ProgramProtocol
from fhir_kat.errors import Issue, issue

QUESTIONNAIRES = Path(__file__).resolve().parents[2] / "mappings" / "questionnaires"
INSTRUMENT_FILES = {"phq9": "phq-9", "gad7": "gad-7", "pcl5": "pcl-5", "bipf": "b-ipf"}


@cache
def questionnaire(instrument: str) -> dict[str, Any]:
    path = QUESTIONNAIRES / f"Questionnaire-{INSTRUMENT_FILES[instrument]}.json"
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


@cache
def all_questionnaires() -> tuple[dict[str, Any], ...]:
    return tuple(questionnaire(k) for k in INSTRUMENT_FILES)


def _answerable(q: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["linkId"]: item for item in q["item"] if not item.get("readOnly")}


def questionnaire_issues(artifact: Mapping[str, Any]) -> list[Issue]:
    """Unknown linkId, an answer outside the option set, a wrong type, a repeated item."""
    items = _answerable(questionnaire(artifact["instrument"]))
    problems = []
    seen: set[str] = set()
    for i, answer in enumerate(artifact["answers"]):
        where = f"answers[{i}]"
        link = answer["item"]
        if link not in items:
            problems.append(
                issue("value", f"item '{link}' is not in the questionnaire", f"{where}.item")
            )
            continue
        if link in seen:
            problems.append(issue("value", f"item '{link}' is answered twice", f"{where}.item"))
        seen.add(link)
        value = answer["answer"]
        if not isinstance(value, str):
            problems.append(
                issue("value", f"item '{link}' takes an answer code (a string)", f"{where}.answer")
            )
            continue
        codes = {o["valueCoding"]["code"] for o in items[link]["answerOption"]}
        if value not in codes:
            problems.append(
                issue(
                    "value", f"the answer to '{link}' is not one of its options", f"{where}.answer"
                )
            )
    if artifact.get("status") == "completed":
        missing = [
            link for link, item in items.items() if item.get("required") and link not in seen
        ]
        for link in missing:
            problems.append(issue("required", f"a completed response answers '{link}'", "answers"))
    return problems


def clinical_checks(
    kind: str, artifact: Mapping[str, Any], protocol: ProgramProtocol
) -> list[Issue]:
    if kind == "medication-administrations":
        return dose_issues(artifact, protocol)
    if kind == "questionnaire-responses":
        return questionnaire_issues(artifact)
    return []


# ---------------------------------------------------------------------------- registered


def _qr_items(_: Any, instrument: str, answers: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    q = questionnaire(instrument)
    items = _answerable(q)
    given = {a["item"]: a["answer"] for a in answers}
    out = []
    for link, item in items.items():  # questionnaire order, whatever order answers came in
        option = next(
            (o for o in item["answerOption"] if o["valueCoding"]["code"] == given.get(link)), None
        )
        if option is None:
            continue  # unanswered, or refused by questionnaire_issues before the Bundle is used
        out.append(
            {
                "linkId": link,
                "text": item["text"],
                "answer": [{"valueCoding": option["valueCoding"]}],
            }
        )
    return out


def _questionnaire_url(_: Any, instrument: str) -> str:
    q = questionnaire(instrument)
    return f"{q['url']}|{q['version']}"


def _program_identifier(ctx: Any) -> dict[str, str]:
    protocol: ProgramProtocol = ctx.protocol
    return {"system": protocol.program_org_system, "value": protocol.program_org_value}


def _program_name(ctx: Any) -> str:
    return str(ctx.protocol.program_name)


def _mg_per_kg(_: Any, dose: float | None, weight: float | None) -> float | None:
    if dose is None or weight is None:
        return None
    return mg_per_kg(dose, weight)


def _join(_: Any, separator: str, *parts: Any) -> str:
    return separator.join(str(p) for p in parts if p not in (None, ""))


def _override_note(_: Any, reason: str | None, ratio: float | None) -> str | None:
    if not reason:
        return None
    dose = f" ({ratio:g} mg/kg)" if ratio is not None else ""
    return f"Dose outside the protocol range{dose}; clinician override: {reason}"


def _encounter_status(_: Any, end: str | None) -> str:
    return "finished" if end else "in-progress"


def _program_key(ctx: Any) -> str:
    return f"{ctx.protocol.program_org_system}|{ctx.protocol.program_org_value}"


def _is_set(_: Any, value: Any) -> bool:
    return value is not None


def _ref_to(_: Any, resource_type: str, *parts: Any) -> dict[str, str] | None:
    """A reference to a resource another artifact created, by the same deterministic id its
    own mapping gives it (e.g. the Patient of a PHN, the Task of a referral identifier)."""
    from fhir_kat.mapping.engine import deterministic_id

    if any(p is None for p in parts):
        return None
    return {"reference": f"{resource_type}/{deterministic_id(resource_type, *parts)}"}


#: Vital signs the session sheet records: field, UCUM code and unit text. Their LOINC codes
#: come from ConceptMap kat-vital-sign-to-loinc (DOMAIN.md).
VITALS = (
    ("heart_rate_per_min", "/min", "beats/minute"),
    ("spo2_percent", "%", "%"),
    ("respiratory_rate_per_min", "/min", "breaths/minute"),
)


def _vital_sign_items(
    _: Any, before: Mapping[str, Any] | None, after: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """One item per measured value, before and after the session (for a ``repeat``)."""
    out = []
    for phase, vitals in (("before", before), ("after", after)):
        if not vitals:
            continue
        for fname, ucum, unit in VITALS:
            if vitals.get(fname) is not None:
                out.append(
                    {
                        "phase": phase,
                        "field": fname,
                        "ucum": ucum,
                        "unit": unit,
                        "value": vitals[fname],
                        "measured_at": vitals["measured_at"].isoformat(),
                    }
                )
    return out


def _blood_pressures(
    _: Any, before: Mapping[str, Any] | None, after: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    return [
        {
            "phase": phase,
            "systolic": v["systolic_mmhg"],
            "diastolic": v["diastolic_mmhg"],
            "measured_at": v["measured_at"].isoformat(),
        }
        for phase, v in (("before", before), ("after", after))
        if v and v.get("systolic_mmhg") is not None
    ]


def _submitter(ctx: Any) -> str:
    return str(ctx.submitter)


REGISTRY: dict[str, Callable[..., Any]] = {
    "qr_items": _qr_items,
    "questionnaire_url": _questionnaire_url,
    "program_identifier": _program_identifier,
    "program_name": _program_name,
    "mg_per_kg": _mg_per_kg,
    "join": _join,
    "override_note": _override_note,
    "encounter_status": _encounter_status,
    "submitter": _submitter,
    "program_key": _program_key,
    "is_set": _is_set,
    "ref_to": _ref_to,
    "vital_sign_items": _vital_sign_items,
    "blood_pressures": _blood_pressures,
}
