"""Required terminology bindings, checked on every write (the R4B models check none).

Owns: walking a JSON resource along the element tree generated from HL7's own R4
StructureDefinitions (``data/required_bindings.json``, written by
``tools/gen_required_bindings.py`` from the pinned ``hl7.fhir.r4.examples`` package) and
reporting every element whose code is outside its ``required`` value set, one ``Issue`` each.
Must not: import flask or touch the store; echo any submitted value into diagnostics (a code
field may hold a name someone typed, see tests/test_security.py): an issue names the element,
the value set and what it allows.

FHIR rules applied (R4 terminologies.html, "required"):
- a ``code`` element must hold a code of the value set;
- a ``Coding`` must be one of its (system, code) pairs;
- a ``CodeableConcept`` needs at least one such coding; other codings are allowed beside it
  (translations), but text alone, or only codings outside the value set, is a violation.
The walk descends into datatypes (``Patient.name[0].use``), choice elements
(``Observation.valueQuantity.comparator``), extensions, contained resources, Bundle entries and
Parameters resources. Value sets the generator could not expand (MIME types, currencies) are
listed in the data file and not checked. Codes a code system marks ``notSelectable`` are accepted
(the package's value sets carry no expansion that would flag them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from fhir_kat.errors import Issue, issue

_DATA = "data/required_bindings.json"
_ANY_RESOURCE = "Resource"
_MAX_LISTED = 15  # value sets up to this size are spelled out in diagnostics


@dataclass(frozen=True, slots=True)
class _ValueSet:
    url: str
    codes: frozenset[str]
    pairs: frozenset[tuple[str, str]]
    allowed_codes: str  # for diagnostics: the codes (or how many there are)
    allowed_pairs: str  # the same, with their systems


@dataclass(frozen=True, slots=True)
class _Child:
    walk: str | None  # type key to descend into (None: nothing below is checked)
    binding: _ValueSet | None
    datatype: str  # the element's FHIR type for this JSON key: code, Coding, CodeableConcept...


_Tables = Mapping[str, Mapping[str, _Child]]  # type key -> JSON key -> child


@cache
def _tables() -> _Tables:
    raw = json.loads(resources.files("fhir_kat.validation").joinpath(_DATA).read_text("utf-8"))
    valuesets = {
        url: _ValueSet(
            url,
            frozenset(code for codes in systems.values() for code in codes),
            frozenset((system, code) for system, codes in systems.items() for code in codes),
            _allowed(systems, with_systems=False),
            _allowed(systems, with_systems=True),
        )
        for url, systems in raw["valueSets"].items()
    }
    walkable = {*raw["types"], _ANY_RESOURCE}
    tables: dict[str, dict[str, _Child]] = {}
    for owner, elements in raw["types"].items():
        table: dict[str, _Child] = {}
        for name, kinds in elements.items():
            bound = raw["bindings"].get(f"{owner}.{name}")
            vs = valuesets[bound["valueSet"]] if bound else None
            if name.endswith("[x]"):  # one JSON key per type: value[x] -> valueQuantity
                stem = name[:-3]
                for kind in kinds:
                    key = stem + kind[0].upper() + kind[1:]
                    table[key] = _Child(kind if kind in walkable else None, vs, kind)
            else:
                kind = kinds[0]  # non-choice elements have exactly one type
                table[name] = _Child(kind if kind in walkable else None, vs, kind)
        tables[owner] = table
    return tables


def check_required_bindings(resource: dict[str, Any]) -> list[Issue]:
    """One ``code-invalid`` issue per element outside its required value set, located with a
    FHIRPath-style expression (``Patient.name[0].use``); empty when all bound codes are valid.
    Elements of the wrong JSON type are left to the structural check."""
    problems: list[Issue] = []
    rtype = resource.get("resourceType")
    if isinstance(rtype, str):
        _walk(resource, rtype, rtype, problems, _tables())
    return problems


def _walk(node: Mapping[str, Any], tkey: str, where: str, out: list[Issue], t: _Tables) -> None:
    table = t.get(tkey)
    if table is None:
        return
    for key, value in node.items():
        child = table.get(key)
        if child is None:
            if key[:1] == "_":  # JSON's only use of "_": a primitive's id and extensions
                _each(value, f"{where}.{key[1:]}", "Element", out, t)
            continue
        if child.binding is not None:
            _each_bound(value, f"{where}.{key}", child, out)
        if child.walk is not None:
            _each(value, f"{where}.{key}", child.walk, out, t)


def _each(value: Any, where: str, tkey: str, out: list[Issue], t: _Tables) -> None:
    items = value if isinstance(value, list) else (value,)
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        at = f"{where}[{i}]" if isinstance(value, list) else where
        if tkey == _ANY_RESOURCE:
            rtype = item.get("resourceType")
            if isinstance(rtype, str):
                _walk(item, rtype, at, out, t)
        else:
            _walk(item, tkey, at, out, t)


def _each_bound(value: Any, where: str, child: _Child, out: list[Issue]) -> None:
    items = value if isinstance(value, list) else (value,)
    for i, item in enumerate(items):
        problem = _problem(item, child)
        if problem is not None:
            at = f"{where}[{i}]" if isinstance(value, list) else where
            out.append(issue("code-invalid", problem, at))


def _problem(value: Any, child: _Child) -> str | None:
    vs = child.binding
    assert vs is not None  # only called for bound elements
    if child.datatype == "CodeableConcept":
        if not isinstance(value, dict):
            return None
        codings = [c for c in value.get("coding", ()) if isinstance(c, dict)]
        if any(_pair(c) in vs.pairs for c in codings):
            return None
        if not codings:
            return (
                f"a coding from the required value set {vs.url} is needed, text alone does "
                f"not do (allowed: {vs.allowed_pairs})"
            )
        return f"no coding is from the required value set {vs.url} (allowed: {vs.allowed_pairs})"
    if child.datatype == "Coding":
        if not isinstance(value, dict) or _pair(value) in vs.pairs:
            return None
        return f"the coding is not in the required value set {vs.url} (allowed: {vs.allowed_pairs})"
    if not isinstance(value, str) or value in vs.codes:
        return None  # a wrong JSON type is the structural check's to report
    return f"the code is not in the required value set {vs.url} (allowed: {vs.allowed_codes})"


def _pair(coding: Mapping[str, Any]) -> tuple[str, str]:
    system, code = coding.get("system"), coding.get("code")
    return (system if isinstance(system, str) else "", code if isinstance(code, str) else "")


def _allowed(systems: Mapping[str, list[str]], *, with_systems: bool) -> str:
    """What a value set allows, short enough for an OperationOutcome."""
    total = sum(len(codes) for codes in systems.values())
    if total > _MAX_LISTED:
        return f"{total} codes of {', '.join(systems)}"
    if not with_systems:
        return ", ".join(sorted({code for codes in systems.values() for code in codes}))
    return "; ".join(f"{system}: {', '.join(codes)}" for system, codes in systems.items())
