"""Every search parameter in fhir_kat/search/parameters.yaml against HL7's official R4
SearchParameter definitions (hl7.fhir.r4.examples 4.0.1): the name exists for that resource
type, the type is the official one, and each indexed path is an element the official expression
names. Internal parameters (never searchable) are not FHIR parameters and are skipped."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from fhir_kat.search import all_params
from tools.hl7_packages import ensure


@pytest.fixture(scope="module")
def official() -> dict[tuple[str, str], dict[str, Any]]:
    """(resource type, code) → the official SearchParameter."""
    folder: Path = ensure("hl7.fhir.r4.examples")
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in folder.glob("SearchParameter-*.json"):
        param = json.loads(path.read_text(encoding="utf-8"))
        for base in param.get("base", []):
            out[(base, param["code"])] = param
    return out


def _declared() -> list[tuple[str, str]]:
    return [
        (rtype, name)
        for rtype, params in all_params().items()
        for name, p in params.items()
        if not p.internal and p.definition is None
    ]


def test_our_own_parameters_are_not_r4_ones_and_say_so(
    official: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """A parameter R4 lacks is ours under our canonical, never a homonym of an official one."""
    ours = [
        (rtype, name, p)
        for rtype, params in all_params().items()
        for name, p in params.items()
        if p.definition is not None
    ]
    assert ours, "Flag?status and Flag?category are ours"
    for rtype, name, p in ours:
        assert (rtype, name) not in official, f"{rtype}?{name} is an R4 parameter"
        assert p.definition.startswith("https://fhir-kat.example.org/fhir/SearchParameter/")


@pytest.mark.parametrize(("rtype", "name"), _declared())
def test_each_parameter_is_the_official_one(
    official: dict[tuple[str, str], dict[str, Any]], rtype: str, name: str
) -> None:
    mine = all_params()[rtype][name]
    theirs = official.get((rtype, name)) or official.get(("Resource", name))
    assert theirs is not None, f"{rtype}?{name} is not an R4 search parameter"
    assert mine.type == theirs["type"], f"{rtype}?{name}"
    expression = theirs.get("expression", "")
    for path in mine.paths:
        # The first element of each indexed path appears in the official FHIRPath expression
        # (x[x] = the choice element: Observation.effective, (Observation.value as Quantity)).
        first = path[0].removesuffix("[x]")
        choice = re.match(r"^([a-z][a-z]*)([A-Z][A-Za-z]*)$", first)  # value + CodeableConcept
        names = {first} | ({choice.group(1)} if choice else set())
        assert any(
            re.search(rf"\b{re.escape(rtype)}\.{re.escape(n)}\b", expression)
            or re.search(rf"\bResource\.{re.escape(n)}\b", expression)
            for n in names
        ), f"{rtype}?{name}: {'.'.join(path)} not in {expression!r}"
