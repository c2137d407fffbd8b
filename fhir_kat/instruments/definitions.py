"""Instrument definitions loaded from ``mappings/instruments/instruments.yaml``, with
configuration overrides for cut-offs and change thresholds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

FILE = Path(__file__).resolve().parents[2] / "mappings" / "instruments" / "instruments.yaml"
OVERRIDABLE = {"positive_at", "min_drop"}


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

    def by_questionnaire(self, canonical: str) -> Instrument | None:
        url = canonical.split("|")[0]
        return next((i for i in self.instruments.values() if i.questionnaire == url), None)

    def by_total_code(self, system: str, code: str) -> Instrument | None:
        for inst in self.instruments.values():
            if inst.total["system"] == system and inst.total["code"] == code:
                return inst
        return None


def load_catalogue(
    overrides: Mapping[str, Mapping[str, Any]] | None = None, path: Path = FILE
) -> Catalogue:
    """``overrides``: ``{"pcl5": {"positive_at": 31}}`` from ``[program.instruments.pcl5]``."""
    return _build(_read(path), _freeze(overrides or {}))


@cache
def _read(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
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
        )
    return Catalogue(int(data["version"]), data["local_system"], instruments)
