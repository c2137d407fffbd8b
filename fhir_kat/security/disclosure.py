"""Small-cell protection for aggregate reports leaving the program.

Owns: ``suppress_small_cells``, applied to every MeasureReport a party outside the program
receives (``$evaluate-measure`` for the health authority): a count of fewer than
``min_cell`` people (but more than none) is withheld, so is a count from which such a cell
follows by subtraction, and every figure computed over a withheld cell (the score, the means).
Must not: compute the measure (``instruments.outcomes``) or decide who receives it.
"""

from __future__ import annotations

import copy
from typing import Any

POPULATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/measure-population"
#: A withheld value (R4 data-absent-reason "masked": withheld for privacy).
MASKED = {
    "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
    "valueCode": "masked",
}
#: (whole, part) population pairs: ``whole - part`` is itself a group of people.
NESTED = (("initial-population", "denominator"), ("denominator", "numerator"))
#: Group extensions that are figures over the denominator's people.
PER_PERSON_FIGURES = ("mean-baseline", "mean-post")


def suppress_small_cells(report: dict[str, Any], min_cell: int) -> dict[str, Any]:
    """A copy of ``report`` with every small cell withheld (``min_cell`` ≤ 1: unchanged)."""
    if min_cell <= 1:
        return report
    out = copy.deepcopy(report)
    for group in out.get("group", []):
        _suppress_group(group, min_cell)
    return out


def _small(count: int | None, min_cell: int) -> bool:
    return count is not None and 0 < count < min_cell


def _suppress_group(group: dict[str, Any], min_cell: int) -> None:
    populations = group.get("population", [])
    by_code = {_code(p): p for p in populations}
    withheld = {code for code, p in by_code.items() if _small(p.get("count"), min_cell)}
    changed = True
    while changed:  # withholding one count can expose another through a difference
        changed = False
        for whole, part in NESTED:
            if whole not in by_code or part not in by_code or {whole, part} & withheld:
                continue  # a withheld whole leaves no difference to read off
            rest = by_code[whole].get("count", 0) - by_code[part].get("count", 0)
            if _small(rest, min_cell):
                withheld.add(part)
                changed = True
    for code in withheld:
        population = by_code[code]
        population.pop("count", None)
        population["extension"] = [*population.get("extension", []), dict(MASKED)]
    if {"numerator", "denominator"} & withheld:
        group.pop("measureScore", None)
    denominator = by_code.get("denominator", {}).get("count")
    if "denominator" in withheld or _small(denominator, min_cell):
        kept = [
            e
            for e in group.get("extension", [])
            if not any(e.get("url", "").endswith(f"/{name}") for name in PER_PERSON_FIGURES)
        ]
        if kept:
            group["extension"] = kept
        else:
            group.pop("extension", None)


def _code(population: dict[str, Any]) -> str:
    for coding in population.get("code", {}).get("coding", []):
        if coding.get("system") == POPULATION_SYSTEM:
            return str(coding.get("code"))
    return ""
