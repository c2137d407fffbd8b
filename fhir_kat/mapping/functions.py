"""The registered functions mapping files may call (``$fn``), and the clinical checks run on an
artifact before its resources are built.

Owns: ``REGISTRY`` — a closed list (lint refuses any other name); each function is pure, takes
the ``MappingContext`` first, and tolerates missing inputs (None) because the engine also runs on
the valid part of a refused artifact to report every problem at once. Must not: read the clock
(``ctx.now`` only), store, call HTTP, or create codes (codes come from mapping files and
``mappings/terminology/``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from datetime import date, datetime
from functools import cache
from pathlib import Path
from typing import Any

from fhir_kat.canonical import read_definition
from fhir_kat.clinical.dose import assess, dose_issues, schedule_deviation
from fhir_kat.clinical.protocol import ProgramProtocol
from fhir_kat.errors import Issue, issue
from fhir_kat.instruments.definitions import Instrument, load_catalogue
from fhir_kat.instruments.scoring import score, takes_answers, total_issue
from fhir_kat.terminology import safe_code

QUESTIONNAIRES = Path(__file__).resolve().parents[2] / "mappings" / "questionnaires"
#: The artifact's ``instrument`` -> the file (and id) of the Questionnaire it answers.
INSTRUMENT_FILES = {"phq9": "phq-9", "gad7": "gad-7", "pcl5": "pcl-5", "bipf": "b-ipf"}
#: The FHIR answer element of a numeric item (the only non-choice items: the totals).
_NUMBER_ANSWERS = {"integer": "valueInteger", "decimal": "valueDecimal"}
#: Answer types the artifact may carry per item type (JSON types; bool is not an int here).
_ANSWER_TYPES: dict[str, tuple[type, ...]] = {
    "choice": (str,),
    "string": (str,),
    "text": (str,),
    "integer": (int,),
    "decimal": (int, float),
    "boolean": (bool,),
}


@cache
def questionnaire(instrument: str) -> dict[str, Any]:
    path = QUESTIONNAIRES / f"Questionnaire-{INSTRUMENT_FILES[instrument]}.json"
    loaded: dict[str, Any] = json.loads(read_definition(path))
    return loaded


@cache
def all_questionnaires() -> tuple[dict[str, Any], ...]:
    return tuple(questionnaire(k) for k in INSTRUMENT_FILES)


@cache
def _items(instrument: str) -> dict[str, dict[str, Any]]:
    """linkId -> item, for every item of the instrument's Questionnaire."""
    return {item["linkId"]: item for item in questionnaire(instrument)["item"]}


@cache
def _instrument(instrument: str) -> Instrument:
    # Totals depend only on the Questionnaire and the scoring rule, never on the configurable
    # cut-offs, so the shipped catalogue computes exactly the total the service stores.
    return load_catalogue().instruments[instrument]


def _type_ok(value: Any, item_type: str) -> bool:
    if isinstance(value, bool) and item_type != "boolean":
        return False  # JSON true is not the integer 1 here
    return isinstance(value, _ANSWER_TYPES.get(item_type, (str,)))


def questionnaire_issues(artifact: Mapping[str, Any], invalid: Collection[str] = ()) -> list[Issue]:
    """Unknown linkId, an answer to an item that takes none, an answer of the wrong type or
    outside the item's options, an item answered twice, a required item missing from a
    completed response, a total that differs from the service's — each naming the item. The
    total (the read-only calculated item) may be sent; it is compared with the service's own
    (``instruments.scoring.total_issue``, the rule FHIR responses meet too)."""
    instrument = artifact.get("instrument")
    if instrument not in INSTRUMENT_FILES:
        return []
    items, definition = _items(instrument), _instrument(instrument)
    problems = []
    seen: set[str] = set()
    totals: list[tuple[int, str, float]] = []  # (answers index, linkId, value)
    whole = True  # every answer passed the schema: only then can missing items be named
    for i, answer in enumerate(artifact.get("answers") or []):
        if answer is None or "item" not in answer or "answer" not in answer:
            whole = False
            continue  # this answer's own schema problem is already reported
        where = f"answers[{i}]"
        link = answer["item"]
        if link not in items:
            problems.append(
                issue(
                    "value",
                    f"item '{safe_code(link)}' is not in the questionnaire",
                    f"{where}.item",
                )
            )
            continue
        if link in seen:
            problems.append(issue("duplicate", f"item '{link}' is answered twice", f"{where}.item"))
        seen.add(link)
        value, item = answer["answer"], items[link]
        if not takes_answers(item, definition):
            problems.append(issue("value", f"item '{link}' takes no answer", f"{where}.item"))
            continue
        if not _type_ok(value, item["type"]):
            expected = "an answer code (a string)" if item["type"] == "choice" else item["type"]
            problems.append(issue("value", f"item '{link}' takes {expected}", f"{where}.answer"))
            continue
        if item.get("readOnly"):
            totals.append((i, link, float(value)))
            continue
        options = {o["valueCoding"]["code"] for o in item.get("answerOption", [])}
        if item["type"] == "choice" and value not in options:
            problems.append(
                issue(
                    "code-invalid",
                    f"the answer to '{link}' is not one of its options",
                    f"{where}.answer",
                )
            )
    if artifact.get("status") == "completed" and whole and "answers" not in invalid:
        for link, item in items.items():
            if item.get("required") and link not in seen:
                problems.append(
                    issue("required", f"a completed response answers '{link}'", "answers")
                )
    if totals and not problems and "answers" not in invalid:
        qr = {"item": _qr_items(None, instrument, artifact.get("answers"))}
        result = score(qr, questionnaire(instrument), definition)
        for i, link, sent in totals:
            found = total_issue(link, sent, result, definition, f"answers[{i}].answer")
            if found is not None:
                problems.append(found)
    return problems


def clinical_checks(
    kind: str,
    artifact: Mapping[str, Any],
    protocol: ProgramProtocol,
    invalid: Collection[str] = (),
) -> list[Issue]:
    """The rules beyond the schema that refuse an artifact. ``invalid`` names fields that
    already failed validation (rules depending on them are skipped, not reported twice)."""
    if kind == "medication-administrations":
        return dose_issues(artifact, protocol, invalid=invalid)
    if kind == "questionnaire-responses":
        return questionnaire_issues(artifact, invalid)
    return []


# ---------------------------------------------------------------------------- registered


def _qr_items(_: Any, instrument: str | None, answers: list[Any] | None) -> list[dict[str, Any]]:
    """The answered items in the Questionnaire's order, each with the option's full Coding (a
    sent total as the number it is, checked against the service's by questionnaire_issues)."""
    if instrument not in INSTRUMENT_FILES:
        return []
    given = {a["item"]: a["answer"] for a in answers or [] if a and "item" in a and "answer" in a}
    out = []
    for link, item in _items(instrument).items():
        if link not in given or not takes_answers(item, _instrument(instrument)):
            continue
        answer: dict[str, Any]
        if item["type"] in _NUMBER_ANSWERS:
            if not _type_ok(given[link], item["type"]):
                continue  # refused by questionnaire_issues before the Bundle is used
            answer = {_NUMBER_ANSWERS[item["type"]]: given[link]}
        else:
            option = next(
                (
                    o
                    for o in item.get("answerOption", [])
                    if o["valueCoding"]["code"] == given[link]
                ),
                None,
            )
            if option is None:
                continue  # refused by questionnaire_issues before the Bundle is used
            answer = {"valueCoding": option["valueCoding"]}
        out.append({"linkId": link, "text": item["text"], "answer": [answer]})
    return out


def _questionnaire_url(_: Any, instrument: str | None) -> str | None:
    if instrument not in INSTRUMENT_FILES:
        return None
    q = questionnaire(instrument)
    return f"{q['url']}|{q['version']}"


def _program_identifier(ctx: Any) -> dict[str, str]:
    protocol: ProgramProtocol = ctx.protocol
    return {"system": protocol.program_org_system, "value": protocol.program_org_value}


def _program_name(ctx: Any) -> str:
    return str(ctx.protocol.program_name)


def _program_key(ctx: Any) -> str:
    return f"{ctx.protocol.program_org_system}|{ctx.protocol.program_org_value}"


def _dose_fields(route: Any, dose: Any, weight: Any) -> dict[str, Any]:
    return {"route": route, "dose_mg": dose, "body_weight_kg": weight}


def _mg_per_kg(ctx: Any, route: Any, dose: Any, weight: Any) -> float | None:
    return assess(_dose_fields(route, dose, weight), ctx.protocol).mg_per_kg


def _dose_check(ctx: Any, route: Any, dose: Any, weight: Any) -> str | None:
    """Why the dose needed an override (a code of kat-dose-check), None when it did not."""
    verdict = assess(_dose_fields(route, dose, weight), ctx.protocol)
    return verdict.verdict if verdict.needs_override else None


def _override_note(ctx: Any, route: Any, dose: Any, weight: Any, reason: Any) -> str | None:
    """The human-readable record of a clinician override, naming the protocol version."""
    if not reason:
        return None
    verdict = assess(_dose_fields(route, dose, weight), ctx.protocol)
    given = f"; given {verdict.mg_per_kg:g} mg/kg" if verdict.mg_per_kg is not None else ""
    if verdict.verdict == "out-of-range" and verdict.range is not None:
        why = f"Dose outside the protocol range {verdict.range.text()} for {route}{given}"
    elif verdict.verdict == "no-range":
        why = f"No protocol dose range is configured for {route}{given}"
    else:
        return None  # refused by dose_issues: an override without a reason to override
    return f"{why}. Protocol {ctx.protocol.reference}. Clinician override: {reason}"


def _schedule_deviation(ctx: Any, number: Any, route: Any) -> str | None:
    """What the protocol's schedule says where the session departs from it (None if not)."""
    return schedule_deviation({"session_number": number, "route": route}, ctx.protocol)


def _deviation_note(ctx: Any, number: Any, route: Any, reason: Any) -> str | None:
    """The human-readable record of a schedule deviation, naming the protocol version."""
    planned = _schedule_deviation(ctx, number, route)
    if not reason or planned is None:
        return None
    return f"Given off the protocol schedule: {planned}. Reason: {reason}"


def _first(_: Any, *values: Any) -> Any:
    """The first value given (not None): a schedule deviation's reason or clinician from
    ``schedule_deviation``, else from the clinician override that covers it."""
    return next((v for v in values if v is not None), None)


def _value_set_coding(_: Any, value_set: str, code: Any) -> dict[str, str] | None:
    """The Coding of ``code`` as a ValueSet of ``mappings/terminology/`` lists it (system and
    display from the file): for codes of an external code system the program uses by name,
    such as the R4 adverse-event seriousness, severity and outcome."""
    if code is None:
        return None
    from fhir_kat.terminology import load_terminology

    for doc in load_terminology().resources:
        if doc["resourceType"] != "ValueSet" or doc["id"] != value_set:
            continue
        for include in doc["compose"]["include"]:
            for concept in include.get("concept", []):
                if concept["code"] == code:
                    return {
                        "system": include["system"],
                        "code": code,
                        **({"display": concept["display"]} if concept.get("display") else {}),
                    }
    return None  # not in the ValueSet: validate_artifact has refused the artifact already


def _protocol_reference(ctx: Any) -> str:
    return str(ctx.protocol.reference)


def _join(_: Any, separator: str, *parts: Any) -> str:
    return separator.join(str(p) for p in parts if p not in (None, ""))


def _encounter_status(_: Any, end: Any) -> str:
    return "finished" if end else "in-progress"


def _is_set(_: Any, value: Any) -> bool:
    return value is not None


def _ref_to(ctx: Any, resource_type: str, *parts: Any) -> dict[str, str] | None:
    """A reference to a resource another artifact creates, by the same deterministic id its own
    mapping gives it (the Patient of a PHN, the Task of a referral identifier)."""
    from fhir_kat.mapping.engine import deterministic_id

    if any(p is None for p in parts):
        return None
    rid = deterministic_id(resource_type, *parts, namespace=ctx.id_namespace)
    return {"reference": f"{resource_type}/{rid}"}


def _instant(value: Any) -> Any:
    return value.isoformat() if isinstance(value, (datetime, date)) else value


#: Vital signs the session sheet records besides blood pressure: field, UCUM code, unit text.
#: Their LOINC codes come from ConceptMap kat-vital-sign-to-loinc (DOMAIN.md).
VITALS = (
    ("heart_rate_per_min", "/min", "beats/minute"),
    ("spo2_percent", "%", "%"),
    ("respiratory_rate_per_min", "/min", "breaths/minute"),
)


def _vital_sign_items(_: Any, before: Any, after: Any) -> list[dict[str, Any]]:
    """One item per measured value, before and after the session (for a ``repeat``)."""
    out = []
    for phase, vitals in (("before", before), ("after", after)):
        if not isinstance(vitals, Mapping) or vitals.get("measured_at") is None:
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
                        "measured_at": _instant(vitals["measured_at"]),
                    }
                )
    return out


def _blood_pressures(_: Any, before: Any, after: Any) -> list[dict[str, Any]]:
    return [
        {
            "phase": phase,
            "systolic": v["systolic_mmhg"],
            "diastolic": v["diastolic_mmhg"],
            "measured_at": _instant(v["measured_at"]),
        }
        for phase, v in (("before", before), ("after", after))
        if isinstance(v, Mapping)
        and v.get("measured_at") is not None
        and v.get("systolic_mmhg") is not None
        and v.get("diastolic_mmhg") is not None
    ]


REGISTRY: dict[str, Callable[..., Any]] = {
    "qr_items": _qr_items,
    "questionnaire_url": _questionnaire_url,
    "program_identifier": _program_identifier,
    "program_name": _program_name,
    "program_key": _program_key,
    "protocol_reference": _protocol_reference,
    "mg_per_kg": _mg_per_kg,
    "dose_check": _dose_check,
    "override_note": _override_note,
    "schedule_deviation": _schedule_deviation,
    "deviation_note": _deviation_note,
    "first": _first,
    "value_set_coding": _value_set_coding,
    "join": _join,
    "encounter_status": _encounter_status,
    "is_set": _is_set,
    "ref_to": _ref_to,
    "vital_sign_items": _vital_sign_items,
    "blood_pressures": _blood_pressures,
}
