"""Instrument definitions loaded from ``mappings/instruments/instruments.yaml``, with
configuration overrides for cut-offs, change thresholds, the B-IPF's minimum of answered domains
and the outcome measure's timeline (windows and the population counted)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from fhir_kat.canonical import read_definition

FILE = Path(__file__).resolve().parents[2] / "mappings" / "instruments" / "instruments.yaml"
OVERRIDABLE = {"positive_at", "min_drop", "min_answered"}
MEASURE_KEYS = {"baseline_days_before_start", "post_days_after_end", "population"}
POPULATIONS = ("completers", "all")


@dataclass(frozen=True)
class MeasureRules:
    """The outcome measure's timeline (``instruments.yaml`` ``measure``, overridden by
    ``[program.outcomes]``): windows in days around each participant's program start and end,
    and whether only completers or everyone who started is counted."""

    baseline_days_before_start: int = 31
    post_days_after_end: tuple[int, int] = (0, 14)
    population: str = "completers"

    def describe(self) -> str:
        low, high = self.post_days_after_end
        who = (
            "participants who completed the program (drop-outs are reported as their own stratum)"
            if self.population == "completers"
            else "every participant whose program ended, completed or not (also stratified)"
        )
        return (
            f"Baseline = the response closest before the participant's program start, at most "
            f"{self.baseline_days_before_start} days before it; post = the first response "
            f"{low} to {high} days after the program end. Program start and end: the cohort "
            "Group's member.period, else the referral Task's executionPeriod (first KaT "
            "session; completed, cancelled or failed). Counted: "
            f"{who}, in the reporting period in which their program ended. Only total scores "
            "derived from the program's QuestionnaireResponses count."
        )


@dataclass(frozen=True)
class Band:
    code: str
    display: str
    min: float


@dataclass(frozen=True)
class Instrument:
    key: str
    title: str
    panel: Mapping[str, str]
    total: Mapping[str, str]
    min: float
    max: float
    unit: str
    bands: tuple[Band, ...]
    positive_at: float
    min_drop: float | None
    milder_band: bool
    post_negative: bool
    safety: Mapping[str, Any]
    band_system: str
    questionnaire: str = ""
    #: Versions of the Questionnaire a response may name (``url|version``): the served one and
    #: earlier ones with the same items, options and scores, checked against the served one.
    questionnaire_versions: tuple[str, ...] = ()
    score_partial: bool = False
    #: Partially scored instruments (B-IPF): domains that must have a value for a total.
    min_answered: int = 1

    def band(self, score: float) -> Band:
        chosen = self.bands[0]
        for band in self.bands:
            if score >= band.min:
                chosen = band
        return chosen

    def band_index(self, score: float) -> int:
        return self.bands.index(self.band(score))

    def positive(self, score: float) -> bool:
        return score >= self.positive_at

    def improved(self, baseline: float, post: float) -> bool:
        """The program's definition (instruments.yaml, "improvement")."""
        if self.post_negative:
            return not self.positive(post)
        dropped = self.min_drop is not None and baseline - post >= self.min_drop
        milder = self.milder_band and self.band_index(post) < self.band_index(baseline)
        return dropped or milder


@dataclass(frozen=True)
class Catalogue:
    version: int
    local_system: str
    instruments: Mapping[str, Instrument]
    measure: MeasureRules = MeasureRules()

    def by_questionnaire(self, canonical: str) -> Instrument | None:
        url = canonical.split("|")[0]
        return next((i for i in self.instruments.values() if i.questionnaire == url), None)

    def by_total_code(self, system: str, code: str) -> Instrument | None:
        for inst in self.instruments.values():
            if inst.total["system"] == system and inst.total["code"] == code:
                return inst
        return None


def load_catalogue(
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    path: Path = FILE,
    *,
    outcomes: Mapping[str, Any] | None = None,
) -> Catalogue:
    """``overrides``: ``{"pcl5": {"positive_at": 31}}`` from ``[program.instruments.pcl5]``;
    ``outcomes``: the ``[program.outcomes]`` table (the measure's windows and population)."""
    data = _read(path)
    catalogue = _build(data, _freeze(overrides or {}))
    measure = _measure({**data.get("measure", {}), **(outcomes or {})})
    return Catalogue(catalogue.version, catalogue.local_system, catalogue.instruments, measure)


def _measure(raw: Mapping[str, Any]) -> MeasureRules:
    problems = [f"[program.outcomes].{k}: unknown setting" for k in sorted(set(raw) - MEASURE_KEYS)]
    before = raw.get("baseline_days_before_start", 31)
    if isinstance(before, bool) or not isinstance(before, int) or not 0 <= before <= 366:
        problems.append("[program.outcomes].baseline_days_before_start: whole days, 0-366")
    post = raw.get("post_days_after_end", [0, 14])
    if (
        not isinstance(post, list | tuple)
        or len(post) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in post)
        or not 0 <= post[0] <= post[1] <= 366
    ):
        problems.append("[program.outcomes].post_days_after_end: [first, last] whole days, 0-366")
    population = raw.get("population", "completers")
    if population not in POPULATIONS:
        problems.append(f"[program.outcomes].population: one of {', '.join(POPULATIONS)}")
    if problems:
        raise ValueError("; ".join(problems))
    return MeasureRules(before, (int(post[0]), int(post[1])), str(population))


@cache
def _read(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(read_definition(path))
    return data


def _freeze(
    overrides: Mapping[str, Mapping[str, Any]],
) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    problems = []
    for key, values in overrides.items():
        for name in values:
            if name not in OVERRIDABLE:
                problems.append(f"[program.instruments.{key}].{name}: not overridable")
    if problems:
        raise ValueError("; ".join(problems))
    return tuple((k, tuple(sorted(v.items()))) for k, v in sorted(overrides.items()))


def _build(
    data: Mapping[str, Any], overrides: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
) -> Catalogue:
    extra = {k: dict(v) for k, v in overrides}
    unknown = set(extra) - set(data["instruments"])
    if unknown:
        raise ValueError(f"unknown instruments in configuration: {sorted(unknown)}")
    instruments = {}
    for key, spec in data["instruments"].items():
        over = extra.get(key, {})
        improvement = spec.get("improvement", {})
        instruments[key] = Instrument(
            key=key,
            title=spec["title"],
            panel=spec["panel"],
            total=spec["total"],
            min=spec["min"],
            max=spec["max"],
            unit=spec["unit"],
            bands=tuple(Band(b["code"], b["display"], b["min"]) for b in spec["bands"]),
            positive_at=float(over.get("positive_at", spec["positive_at"])),
            min_drop=over.get("min_drop", improvement.get("min_drop")),
            milder_band=bool(improvement.get("milder_band", False)),
            post_negative=bool(improvement.get("post_negative", False)),
            safety=spec.get("safety", {}),
            band_system=data["band_system"],
            questionnaire=spec.get("questionnaire", ""),
            questionnaire_versions=tuple(str(v) for v in spec.get("questionnaire_versions", ())),
            score_partial=bool(spec.get("score_partial", False)),
            min_answered=int(over.get("min_answered", spec.get("min_answered", 1))),
        )
    return Catalogue(int(data["version"]), data["local_system"], instruments, MeasureRules())
