"""The program-outcome measure (the paper's headline table), as arithmetic over total scores on
each participant's program timeline.

Per instrument and participant (Dames, Kryskow & Watler 2022; windows in ``instruments.yaml``
``measure``, overridable): baseline = the response closest before the program start within the
baseline window; post = the first response after the program end within the post window — so a
mid-program response, a drop-out's early improvement or a six-month follow-up never stands in
for either. initial-population = participants positive at baseline; denominator = those of them
with a post response; numerator = those improved (the instrument's definition). Counted:
completers by default (the paper's 94 completed the program), in the period their program
ended; drop-outs are always reported as their own stratum. Mean baseline and post scores of the
denominator (the paper's Figure 2) come with each group. Participants missing either response
are left out of that instrument's figures. Must not: read the store or the clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

from fhir_kat.instruments.definitions import Catalogue, Instrument, MeasureRules
from fhir_kat.terminology import BASE

MEASURE_ID = "kat-program-outcomes"
MEASURE_URL = f"{BASE}/Measure/kat-program-outcomes"
POPULATION = "http://terminology.hl7.org/CodeSystem/measure-population"
STRATIFIER_SYSTEM = f"{BASE}/CodeSystem/kat-measure-stratum"
#: The stratifier every group carries: who completed the program and who dropped out.
COMPLETION = "program-completion"
STRATA = ("completed", "dropped-out")


class ScorePoint(NamedTuple):
    """One total score. A named tuple: immutable, and five times cheaper to build than a frozen
    dataclass (the measure builds one per score read)."""

    patient: str
    when: datetime
    score: float


@dataclass(frozen=True)
class Timeline:
    """A participant's program: start and end as the naive-UTC ranges their FHIR values imply
    (a date covers its whole day), and whether it was completed. ``end`` None = ongoing."""

    start: tuple[datetime, datetime]
    end: tuple[datetime, datetime] | None
    completed: bool

    @property
    def stratum(self) -> str:
        return "completed" if self.completed else "dropped-out"


@dataclass(frozen=True)
class Counts:
    initial_population: int
    denominator: int
    numerator: int
    mean_baseline: float | None
    mean_post: float | None

    @property
    def score(self) -> float | None:
        return self.numerator / self.denominator if self.denominator else None


@dataclass(frozen=True)
class GroupResult:
    instrument: Instrument
    initial_population: int
    denominator: int
    numerator: int
    mean_baseline: float | None
    mean_post: float | None
    #: The same counts per stratum of ``COMPLETION`` (completed, dropped-out).
    strata: Mapping[str, Counts] = field(default_factory=dict)

    @property
    def score(self) -> float | None:
        return self.numerator / self.denominator if self.denominator else None


#: A participant's baseline window and post window (None bounds: no end, no post).
Windows = tuple[datetime, datetime, datetime | None, datetime | None]


def _windows(timelines: Mapping[str, Timeline], rules: MeasureRules) -> dict[str, Windows]:
    before = timedelta(days=rules.baseline_days_before_start)
    first, last = (timedelta(days=d) for d in rules.post_days_after_end)
    return {
        patient: (
            t.start[0] - before,
            t.start[1],
            t.end[0] + first if t.end else None,
            t.end[1] + last if t.end else None,
        )
        for patient, t in timelines.items()
    }


windows = _windows


class Fold:
    """Each participant's baseline and post score so far, fed one score at a time in write
    order: only scores inside the participant's windows are kept, the best of each (of equal
    times the first written wins) — one pass, constant memory per participant."""

    def __init__(
        self,
        timelines: Mapping[str, Timeline],
        rules: MeasureRules,
        *,
        windows: Mapping[str, Windows] | None = None,
    ) -> None:
        """``windows``: ``windows(timelines, rules)`` computed once for several folds."""
        self.windows = windows if windows is not None else _windows(timelines, rules)
        self.baseline: dict[str, ScorePoint] = {}
        self.post: dict[str, ScorePoint] = {}

    def add(self, p: ScorePoint) -> None:
        window = self.windows.get(p.patient)
        if window is None:
            return
        b_low, b_high, p_low, p_high = window
        when = p.when
        if b_low <= when <= b_high:
            best = self.baseline.get(p.patient)
            if best is None or when > best.when:
                self.baseline[p.patient] = p
        if p_low is not None and p_high is not None and p_low <= when <= p_high:
            best = self.post.get(p.patient)
            if best is None or when < best.when:
                self.post[p.patient] = p


def baseline_of(
    points: Iterable[ScorePoint], tl: Timeline, rules: MeasureRules
) -> ScorePoint | None:
    """The response closest before the program start, within the baseline window (a response
    on the day the program starts counts when the start is a date)."""
    fold = Fold({"p": tl}, rules)
    for p in points:
        fold.add(ScorePoint("p", p.when, p.score))
    return fold.baseline.get("p")


def post_of(points: Iterable[ScorePoint], tl: Timeline, rules: MeasureRules) -> ScorePoint | None:
    """The first response after the program end, within the post window."""
    fold = Fold({"p": tl}, rules)
    for p in points:
        fold.add(ScorePoint("p", p.when, p.score))
    return fold.post.get("p")


def read_range(
    timelines: Iterable[Timeline], rules: MeasureRules
) -> tuple[datetime, datetime] | None:
    """The span of scores the counted timelines can use (None when none can)."""
    spans = [
        (
            t.start[0] - timedelta(days=rules.baseline_days_before_start),
            t.end[1] + timedelta(days=rules.post_days_after_end[1]),
        )
        for t in timelines
        if t.end is not None
    ]
    if not spans:
        return None
    return min(s[0] for s in spans), max(s[1] for s in spans)


def counted(
    timelines: Mapping[str, Timeline], low: datetime, high: datetime
) -> dict[str, Timeline]:
    """The participants whose program ended in the reporting period [low, high]."""
    return {p: t for p, t in timelines.items() if t.end is not None and low <= t.end[0] <= high}


def evaluate_fold(
    instrument: Instrument,
    fold: Fold,
    timelines: Mapping[str, Timeline],
    rules: MeasureRules,
) -> GroupResult:
    """The group of one instrument over ``timelines`` (already the participants counted in the
    period; ``fold`` fed with their scores under the same ``rules``): per stratum, and the
    headline counts of the population the rules count."""
    tallies = {s: [0, 0, 0, 0.0, 0.0] for s in STRATA}
    for patient in sorted(fold.baseline):  # a fixed order: the same sums, the same means
        tl = timelines.get(patient)
        baseline = fold.baseline[patient]
        if tl is None or not instrument.positive(baseline.score):
            continue
        tally = tallies[tl.stratum]
        tally[0] += 1
        post = fold.post.get(patient)
        if post is None:
            continue  # no post response: left out, as in the paper
        tally[1] += 1
        tally[3] += baseline.score
        tally[4] += post.score
        if instrument.improved(baseline.score, post.score):
            tally[2] += 1
    strata = {s: _counts(*tallies[s]) for s in STRATA}
    included = ("completed",) if rules.population == "completers" else STRATA
    total = [sum(tallies[s][i] for s in included) for i in range(5)]
    headline = _counts(*total)
    return GroupResult(
        instrument,
        headline.initial_population,
        headline.denominator,
        headline.numerator,
        headline.mean_baseline,
        headline.mean_post,
        strata,
    )


def _counts(initial: float, denominator: float, numerator: float, b: float, p: float) -> Counts:
    d = int(denominator)
    return Counts(
        int(initial),
        d,
        int(numerator),
        round(b / d, 2) if d else None,
        round(p / d, 2) if d else None,
    )


def _improved_text(inst: Instrument) -> str:
    if inst.post_negative:
        return f"screening negative (below {inst.positive_at:g}) on the post response"
    parts = []
    if inst.min_drop is not None:
        parts.append(f"a drop of at least {inst.min_drop:g} points")
    if inst.milder_band:
        parts.append("a move into a milder severity band")
    return " or ".join(parts)


def _definition(inst: Instrument, rules: MeasureRules) -> str:
    partial = (
        f" A {inst.title} total needs every domain answered or marked not applicable and at "
        f"least {inst.min_answered} answered with a value."
        if inst.score_partial
        else f" A {inst.title} total needs every item answered (no prorating)."
    )
    interpretation = (
        " The paper gives no milder category for B-IPF: the drop threshold is the program's "
        "per-participant interpretation of its 5-point change."
        if inst.score_partial and not inst.milder_band
        else ""
    )
    return (
        f"{inst.title}: initial population = participants whose baseline is at or above "
        f"{inst.positive_at:g}; denominator = those with a post response; numerator = those "
        f"improved: {_improved_text(inst)}.{interpretation}{partial} {rules.describe()} "
        "Participants missing either response are excluded."
    )


def measure_resource(catalogue: Catalogue) -> dict[str, object]:
    """The Measure, generated from the same definitions the evaluation uses."""
    rules = catalogue.measure
    return {
        "resourceType": "Measure",
        "id": MEASURE_ID,
        "url": MEASURE_URL,
        "version": str(catalogue.version),
        "name": "KatProgramOutcomes",
        "title": "Ketamine-assisted therapy program outcomes",
        "status": "active",
        "description": "Share of participants screening positive at baseline who improved by "
        "the program's definitions (Dames, Kryskow & Watler 2022), per instrument. "
        + rules.describe(),
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
                "description": _definition(inst, rules),
                "population": [
                    {
                        "code": {"coding": [{"system": POPULATION, "code": code}]},
                        "description": text,
                        # The data the population is drawn from, as a FHIR query; the rule
                        # itself is the group's description (this server evaluates it).
                        "criteria": {
                            "language": "application/x-fhir-query",
                            "expression": f"Observation?code={inst.total['system']}|"
                            f"{inst.total['code']}&status=final,amended,corrected"
                            "&derived-from:missing=false",
                            "description": text,
                        },
                    }
                    for code, text in (
                        ("initial-population", f"positive {inst.title} at baseline"),
                        ("denominator", "initial population with a post response"),
                        ("numerator", "denominator improved"),
                    )
                ],
                "stratifier": [
                    {
                        "code": {"coding": [{"system": STRATIFIER_SYSTEM, "code": COMPLETION}]},
                        "description": "completed: the referral ended completed; dropped-out: "
                        "it ended cancelled or failed (or the cohort membership became "
                        "inactive). The same populations per stratum.",
                        "criteria": {
                            "language": "application/x-fhir-query",
                            "expression": "Task?code=http://hl7.org/fhir/CodeSystem/task-code|"
                            "fulfill&status=completed,cancelled,failed",
                        },
                    }
                ],
            }
            for inst in catalogue.instruments.values()
        ],
    }


def _populations(counts: Counts | GroupResult) -> list[dict[str, object]]:
    return [
        {"code": {"coding": [{"system": POPULATION, "code": code}]}, "count": count}
        for code, count in (
            ("initial-population", counts.initial_population),
            ("denominator", counts.denominator),
            ("numerator", counts.numerator),
        )
    ]


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
            "population": _populations(r),
        }
        if r.score is not None:
            group["measureScore"] = {"value": round(r.score, 4)}
        means = [
            (label, value)
            for label, value in (("mean-baseline", r.mean_baseline), ("mean-post", r.mean_post))
            if value is not None
        ]
        if means:
            group["extension"] = [
                {
                    "url": f"{BASE}/StructureDefinition/{label}",
                    "valueQuantity": {"value": value, "unit": r.instrument.unit},
                }
                for label, value in means
            ]
        if r.strata:
            strata = []
            for name, counts in r.strata.items():
                stratum: dict[str, object] = {
                    "value": {"coding": [{"system": STRATIFIER_SYSTEM, "code": name}]},
                    "population": _populations(counts),
                }
                if counts.score is not None:
                    stratum["measureScore"] = {"value": round(counts.score, 4)}
                strata.append(stratum)
            group["stratifier"] = [
                {
                    "code": [{"coding": [{"system": STRATIFIER_SYSTEM, "code": COMPLETION}]}],
                    "stratum": strata,
                }
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
