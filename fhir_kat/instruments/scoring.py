"""Scoring a QuestionnaireResponse against its Questionnaire, and SDC observation-based
extraction.

Scores come from the Questionnaire itself (each answer option's ``ordinalValue``), so the
numbers live in one place. Rules for incomplete responses: PHQ-9, GAD-7 and PCL-5 are scored
only when every scored item is answered (no prorating); B-IPF is scored from the items answered
with a value ("not applicable" and skipped items leave the denominator, the NCPTSD IPF method).
Extraction follows SDC's observation-based rules: status final, effective = authored, one
Observation per answered coded item (none for skipped items), plus the total with its band and
screen result as interpretation, each ``derivedFrom`` the QuestionnaireResponse.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fhir_kat.errors import Issue, issue
from fhir_kat.instruments.definitions import Instrument

ORDINAL = "http://hl7.org/fhir/StructureDefinition/ordinalValue"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
SURVEY = {
    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
    "code": "survey",
    "display": "Survey",
}
NAMESPACE = uuid.UUID("6f1d3c52-7a0e-5b8e-9d4e-6b6174000002")


def own_identifier(resource_id: str) -> list[dict[str, str]]:
    """The business identifier of a derived resource with no natural one: its deterministic id
    as a URI (the mapping engine's ``$id: urn``), so a partner can conditionally create it."""
    return [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{resource_id}"}]


@dataclass(frozen=True)
class Score:
    total: float | None
    answered: int
    scored_items: int
    item_values: Mapping[str, float]  # linkId -> ordinal of the chosen option

    @property
    def complete(self) -> bool:
        return self.answered == self.scored_items


def _items(questionnaire: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {i["linkId"]: i for i in questionnaire.get("item", [])}


def _ordinal(option: Mapping[str, Any]) -> float | None:
    for ext in option.get("extension", []):
        if ext.get("url") == ORDINAL:
            return float(ext["valueDecimal"])
    return None


def _answer_coding(item: Mapping[str, Any]) -> Mapping[str, Any] | None:
    answers = item.get("answer") or []
    coding = answers[0].get("valueCoding") if answers else None
    return coding if isinstance(coding, Mapping) else None


def check_response(qr: Mapping[str, Any], questionnaire: Mapping[str, Any]) -> list[Issue]:
    """A FHIR QuestionnaireResponse against its Questionnaire: unknown linkId, an answer
    outside the options, a wrong answer type — one issue each, naming the item."""
    items = _items(questionnaire)
    problems = []
    for i, answered in enumerate(qr.get("item", [])):
        where = f"QuestionnaireResponse.item[{i}]"
        link = answered.get("linkId")
        item = items.get(link)
        if item is None or item.get("readOnly"):
            problems.append(
                issue(
                    "value",
                    "linkId is not an answerable item of the Questionnaire",
                    f"{where}.linkId",
                )
            )
            continue
        for j, answer in enumerate(answered.get("answer", [])):
            at = f"{where}.answer[{j}]"
            coding = answer.get("valueCoding")
            if item.get("type") == "choice" and coding is None:
                problems.append(issue("value", f"item {link} takes a valueCoding", at))
            elif coding is not None:
                allowed = {
                    (o["valueCoding"].get("system"), o["valueCoding"]["code"])
                    for o in item.get("answerOption", [])
                }
                if (coding.get("system"), coding.get("code")) not in allowed:
                    problems.append(
                        issue(
                            "value",
                            f"answer to {link} is not one of its options",
                            f"{at}.valueCoding",
                        )
                    )
    return problems


def score(qr: Mapping[str, Any], questionnaire: Mapping[str, Any], instrument: Instrument) -> Score:
    items = _items(questionnaire)
    scored = [
        link
        for link, item in items.items()
        if not item.get("readOnly")
        and any(_ordinal(o) is not None for o in item.get("answerOption", []))
    ]
    values: dict[str, float] = {}
    for answered in qr.get("item", []):
        link = answered.get("linkId")
        coding = _answer_coding(answered)
        if link not in scored or coding is None:
            continue
        option = next(
            (
                o
                for o in items[link]["answerOption"]
                if o["valueCoding"]["code"] == coding.get("code")
            ),
            None,
        )
        value = _ordinal(option) if option else None
        if value is not None:
            values[link] = value
    total: float | None = None
    if instrument.score_partial:
        if values:
            total = round(sum(values.values()) * 100 / (6 * len(values)), 1)
    elif len(values) == len(scored):
        total = sum(values.values())
    return Score(total, len(values), len(scored), values)


def extract(
    qr: Mapping[str, Any], questionnaire: Mapping[str, Any], instrument: Instrument, result: Score
) -> list[dict[str, Any]]:
    """The Observations SDC observation-based extraction yields (ids deterministic)."""
    qr_ref = f"QuestionnaireResponse/{qr['id']}"
    common: dict[str, Any] = {
        "status": "final",
        "category": [{"coding": [SURVEY]}],
        "subject": qr["subject"],
        "effectiveDateTime": qr["authored"],
        "derivedFrom": [{"reference": qr_ref}],
    }
    out = []
    items = _items(questionnaire)
    for answered in qr.get("item", []):
        link = answered.get("linkId")
        coding = _answer_coding(answered)
        item = items.get(link)
        if coding is None or item is None or not item.get("code"):
            continue  # SDC: no Observation for a skipped item
        oid = str(uuid.uuid5(NAMESPACE, f"{qr_ref}|{link}"))
        out.append(
            {
                "resourceType": "Observation",
                "id": oid,
                "identifier": own_identifier(oid),
                **common,
                "code": {"coding": [dict(c) for c in item["code"]], "text": item.get("text", link)},
                "valueCodeableConcept": {"coding": [dict(coding)]},
            }
        )
    if result.total is not None:
        band = instrument.band(result.total)
        unit = instrument.unit
        positive = instrument.positive(result.total)
        tid = str(uuid.uuid5(NAMESPACE, f"{qr_ref}|total"))
        out.append(
            {
                "resourceType": "Observation",
                "id": tid,
                "identifier": own_identifier(tid),
                **common,
                "code": {"coding": [dict(instrument.total)]},
                "valueQuantity": {
                    "value": result.total,
                    "unit": unit,
                    "system": "http://unitsofmeasure.org",
                    "code": unit,
                },
                "interpretation": [
                    {
                        "coding": [
                            {
                                "system": instrument.band_system,
                                "code": band.code,
                                "display": band.display,
                            }
                        ]
                    },
                    {
                        "coding": [
                            {
                                "system": INTERPRETATION,
                                "code": "POS" if positive else "NEG",
                                "display": "Positive" if positive else "Negative",
                            }
                        ]
                    },
                ],
                "hasMember": [{"reference": f"Observation/{o['id']}"} for o in out],
            }
        )
    return out
