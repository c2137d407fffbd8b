"""The program-outcome measure (the paper's headline table), as arithmetic over total scores.

Per instrument and participant: baseline = the earliest response in the period, post = the
latest one after it. initial-population = participants positive at baseline; denominator = those
of them with a post response; numerator = those improved (the instrument's definition). Mean
baseline and post scores of the denominator (the paper's Figure 2) come with each group.
Participants missing either response are left out of that instrument's figures. One pass, O(n).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from fhir_kat.instruments.definitions import Catalogue, Instrument

MEASURE_ID = "kat-program-outcomes"
MEASURE_URL = "https://fhir-kat.example.org/fhir/Measure/kat-program-outcomes"
POPULATION = "http://terminology.hl7.org/CodeSystem/measure-population"


class ScorePoint(NamedTuple):
    """One total score. A named tuple: immutable, and five times cheaper to build than a frozen
    dataclass (the measure builds one per score read)."""

    patient: str
    when: datetime
    score: float


@dataclass(frozen=True)
class GroupResult:
    instrument: Instrument
    initial_population: int
    denominator: int
    numerator: int
    mean_baseline: float | None
    mean_post: float | None

    @property
    def score(self) -> float | None:
        return self.numerator / self.denominator if self.denominator else None


class Fold:
    """Each participant's baseline (earliest response) and post (latest) so far, fed one
    score at a time in write order: of equal times the first written counts."""

    def __init__(self) -> None:
        self.first: dict[str, ScorePoint] = {}
        self.last: dict[str, ScorePoint] = {}

    def add(self, p: ScorePoint) -> None:
        f = self.first.get(p.patient)
        if f is None or p.when < f.when:
            self.first[p.patient] = p
        latest = self.last.get(p.patient)
        if latest is None or p.when > latest.when:
            self.last[p.patient] = p


def evaluate(instrument: Instrument, points: Iterable[ScorePoint]) -> GroupResult:
    fold = Fold()
    for p in points:
        fold.add(p)
    return evaluate_fold(instrument, fold)


def evaluate_fold(instrument: Instrument, fold: Fold) -> GroupResult:
    first, last = fold.first, fold.last
    initial = denominator = numerator = 0
    baseline_sum = post_sum = 0.0
    for patient, baseline in first.items():
        if not instrument.positive(baseline.score):
            continue
        initial += 1
        post = last[patient]
        if post.when <= baseline.when:
            continue  # no response after baseline: left out, as in the paper
        denominator += 1
        baseline_sum += baseline.score
        post_sum += post.score
        if instrument.improved(baseline.score, post.score):
            numerator += 1
    return GroupResult(
        instrument,
        initial,
        denominator,
        numerator,
        round(baseline_sum / denominator, 2) if denominator else None,
        round(post_sum / denominator, 2) if denominator else None,
    )


def _definition(inst: Instrument) -> str:
    if inst.post_negative:
        improved = f"screening negative (below {inst.positive_at:g}) on the post response"
    else:
        parts = []
        if inst.min_drop is not None:
            parts.append(f"a drop of at least {inst.min_drop:g} points")
        if inst.milder_band:
            parts.append("a move into a milder severity band")
        improved = " or ".join(parts)
    return (
        f"{inst.title}: initial population = participants whose baseline (earliest response in "
        f"the period) is at or above {inst.positive_at:g}; denominator = those with a post "
        f"response (the latest one after baseline); numerator = those improved: {improved}. "
        "Participants missing either response are excluded."
    )


def measure_resource(catalogue: Catalogue) -> dict[str, object]:
    """The Measure, generated from the same definitions the evaluation uses."""
    return {
        "resourceType": "Measure",
        "id": MEASURE_ID,
        "url": MEASURE_URL,
        "version": str(catalogue.version),
        "name": "KatProgramOutcomes",
        "title": "Ketamine-assisted therapy program outcomes",
        "status": "active",
        "description": "Share of participants screening positive at baseline who improved by "
        "the program's definitions (Dames, Kryskow & Watler 2022), per instrument.",
        "scoring": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/measure-scoring",
                    "code": "proportion",
                }
            ]
        },
        "type": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/measure-type",
                        "code": "outcome",
                    }
                ]
            }
        ],
        "improvementNotation": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/measure-improvement-notation",
                    "code": "increase",
                }
            ]
        },
        "group": [
            {
                "code": {"coding": [dict(inst.panel)]},
                "description": _definition(inst),
                "population": [
                    {
                        "code": {"coding": [{"system": POPULATION, "code": code}]},
                        "description": text,
                        # The data the population is drawn from, as a FHIR query; the rule
                        # itself is the group's description (this server evaluates it).
                        "criteria": {
                            "language": "application/x-fhir-query",
                            "expression": f"Observation?code={inst.total['system']}|"
                            f"{inst.total['code']}&status=final,amended,corrected",
                            "description": text,
                        },
                    }
                    for code, text in (
                        ("initial-population", f"positive {inst.title} at baseline"),
                        ("denominator", "initial population with a post response"),
                        ("numerator", "denominator improved"),
                    )
                ],
            }
            for inst in catalogue.instruments.values()
        ],
    }


def measure_report(
    results: Iterable[GroupResult],
    *,
    period_start: str,
    period_end: str,
    date: str,
    subject: str | None,
) -> dict[str, object]:
    groups = []
    for r in results:
        group: dict[str, object] = {
            "code": {"coding": [dict(r.instrument.panel)]},
            "population": [
                {"code": {"coding": [{"system": POPULATION, "code": code}]}, "count": count}
                for code, count in (
                    ("initial-population", r.initial_population),
                    ("denominator", r.denominator),
                    ("numerator", r.numerator),
                )
            ],
            "stratifier": [],
        }
        if r.score is not None:
            group["measureScore"] = {"value": round(r.score, 4)}
        means = [
            (label, value)
            for label, value in (("mean-baseline", r.mean_baseline), ("mean-post", r.mean_post))
            if value is not None
        ]
        group.pop("stratifier")
        if means:
            group["extension"] = [
                {
                    "url": f"https://fhir-kat.example.org/fhir/StructureDefinition/{label}",
                    "valueQuantity": {"value": value, "unit": r.instrument.unit},
                }
                for label, value in means
            ]
        groups.append(group)
    report: dict[str, object] = {
        "resourceType": "MeasureReport",
        "status": "complete",
        "type": "summary",
        "measure": MEASURE_URL,
        "date": date,
        "period": {"start": period_start, "end": period_end},
        "group": groups,
    }
    if subject:
        report["subject"] = {"reference": subject}
    return report
