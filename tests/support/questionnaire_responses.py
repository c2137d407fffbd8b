"""QuestionnaireResponses for the instrument tests, built from the shipped Questionnaires: as an
SDC renderer (NLM LHC-Forms) exports them, or hand-built; and the expected totals from an oracle
written from DOMAIN.md, not from the scoring code under test."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator, Mapping
from typing import Any

from fhir_kat.instruments.definitions import load_catalogue
from fhir_kat.mapping.functions import questionnaire

CAT = load_catalogue()
#: instrument -> (items, top answer score) as DOMAIN.md gives them.
SCALES = {"phq9": (9, 3), "gad7": (7, 3), "pcl5": (20, 4), "bipf": (7, 6)}
TOTAL_LINK = {
    "phq9": "phq9-total",
    "gad7": "gad7-total",
    "pcl5": "pcl5-total",
    "bipf": "bipf-score",
}
NA = "na"  # B-IPF "not applicable": an answer without a score
Values = list[int | str | None]  # per item: its score, NA, or None (skipped)


#: Issue 17: a B-IPF needs at least this many domains with a score (the program's default).
BIPF_MIN_ANSWERED = 3


def oracle_total(instrument: str, values: Values) -> float | None:
    """DOMAIN.md: PHQ-9/GAD-7/PCL-5 sum every item (no total unless all are answered); B-IPF
    sum / (6 x items answered with a score) x 100, to one decimal — and (issue 17) only when
    no domain is left unanswered ("not applicable" is an answer, a skipped domain is not) and at
    least three have a score."""
    scored = [v for v in values if isinstance(v, int)]
    if instrument == "bipf":
        if any(v is None for v in values) or len(scored) < BIPF_MIN_ANSWERED:
            return None
        return round(sum(scored) * 100 / (6 * len(scored)), 1)
    return float(sum(scored)) if len(scored) == SCALES[instrument][0] else None


def random_values(rng: random.Random, instrument: str, skip: float = 0.0) -> Values:
    n, top = SCALES[instrument]
    values: Values = []
    for _ in range(n):
        if rng.random() < skip:
            values.append(None)
        elif instrument == "bipf" and rng.random() < 0.15:
            values.append(NA)
        else:
            values.append(rng.randint(0, top))
    return values


def chosen(
    q: Mapping[str, Any], instrument: str, values: Values
) -> Iterator[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """(item, the answer option with that score) for each answered item, in order."""
    items = {i["linkId"]: i for i in q["item"]}
    for n, value in enumerate(values, start=1):
        if value is None:
            continue
        item = items[f"{instrument}-{n}"]
        yield (
            item,
            next(
                o
                for o in item["answerOption"]
                if (value == NA and not o.get("extension"))
                or any(e.get("valueDecimal") == value for e in o.get("extension", []))
            ),
        )


def response(
    instrument: str,
    values: Values,
    pid: str,
    *,
    renderer: bool = True,
    total: float | str | None = "computed",
    questionnaire_ref: str | None = None,
) -> dict[str, Any]:
    """A QuestionnaireResponse as LHC-Forms exports it (``renderer``), or hand-built: no item
    text, no copied scores, no total, the canonical without a version. ``total``: "computed"
    sends what a renderer computes (nothing when it computes nothing), a number sends that."""
    q = questionnaire(instrument)
    out: list[dict[str, Any]] = []
    for item, option in chosen(q, instrument, values):
        coding = dict(option["valueCoding"])
        if renderer and option.get("extension"):
            coding["extension"] = copy.deepcopy(option["extension"])
        answered: dict[str, Any] = {"linkId": item["linkId"], "answer": [{"valueCoding": coding}]}
        if renderer:
            answered["text"] = item["text"]
        out.append(answered)
    sent = oracle_total(instrument, values) if total == "computed" and renderer else total
    if isinstance(sent, int | float):
        element = "valueDecimal" if instrument == "bipf" else "valueInteger"
        number = sent if instrument == "bipf" else int(sent)
        out.append(
            {"linkId": TOTAL_LINK[instrument], "text": "total", "answer": [{element: number}]}
        )
    qr: dict[str, Any] = {
        "resourceType": "QuestionnaireResponse",
        "status": "completed" if all(v is not None for v in values) else "in-progress",
        "questionnaire": questionnaire_ref
        or (f"{q['url']}|{q['version']}" if renderer else q["url"]),
        "subject": {"reference": f"Patient/{pid}"},
        "authored": "2026-03-02T09:30:00.123Z",
        "item": out,
    }
    if renderer:
        qr["meta"] = {"tag": [{"code": "lformsVersion: 40.1.3"}]}
        qr["author"] = {"reference": f"Patient/{pid}"}
        qr["source"] = {"reference": f"Patient/{pid}"}
    return qr
