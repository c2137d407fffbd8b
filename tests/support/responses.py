"""QuestionnaireResponses for the program's instruments with chosen item values, so tests can
write scores the way the program does (the server extracts the totals) instead of typing total
Observations by hand."""

from __future__ import annotations

from typing import Any

from fhir_kat.mapping.functions import questionnaire

URLS = {
    "phq9": "https://fhir-kat.example.org/fhir/Questionnaire/phq-9",
    "gad7": "https://fhir-kat.example.org/fhir/Questionnaire/gad-7",
    "pcl5": "https://fhir-kat.example.org/fhir/Questionnaire/pcl-5",
    "bipf": "https://fhir-kat.example.org/fhir/Questionnaire/b-ipf",
}
NOT_APPLICABLE = "n/a"


def _scored(instrument: str) -> list[dict[str, Any]]:
    return [
        item
        for item in questionnaire(instrument)["item"]
        if any(
            "valueDecimal" in e
            for o in item.get("answerOption", [])
            for e in o.get("extension", [])
        )
    ]


def _ordinal(option: dict[str, Any]) -> int | None:
    for e in option.get("extension", []):
        if "valueDecimal" in e:
            return int(e["valueDecimal"])
    return None


def spread(instrument: str, total: int) -> list[int]:
    """Item values summing to ``total``, filled item by item (PHQ-9 item 9 last, so a total
    below 25 never raises the suicidal-ideation flag)."""
    items = _scored(instrument)
    top = max(_ordinal(o) or 0 for o in items[0]["answerOption"])
    values = [0] * len(items)
    left = total
    for i in range(len(items)):
        values[i] = min(top, left)
        left -= values[i]
    if left:
        raise ValueError(f"{instrument} cannot total {total}")
    return values


def response(
    instrument: str,
    patient: str,
    authored: str,
    *,
    total: int | None = None,
    values: list[int | str | None] | None = None,
    status: str = "completed",
    rid: str | None = None,
) -> dict[str, Any]:
    """A QuestionnaireResponse for ``instrument`` with ``values`` per scored item (an int, the
    ``NOT_APPLICABLE`` marker, or None = left unanswered), or ``total`` spread over the items."""
    chosen: list[int | str | None] = list(values) if values is not None else []
    if values is None:
        chosen = list(spread(instrument, total or 0))
    items = []
    for item, value in zip(_scored(instrument), chosen, strict=False):
        if value is None:
            continue
        option = next(
            o
            for o in item["answerOption"]
            if (value == NOT_APPLICABLE and _ordinal(o) is None) or _ordinal(o) == value
        )
        items.append({"linkId": item["linkId"], "answer": [{"valueCoding": option["valueCoding"]}]})
    qr: dict[str, Any] = {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": URLS[instrument],
        "status": status,
        "subject": {"reference": f"Patient/{patient}"},
        "authored": authored,
        "item": items,
    }
    if rid:
        qr["id"] = rid
    return qr
