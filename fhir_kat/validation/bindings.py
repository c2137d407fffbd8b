"""Required terminology bindings, checked on every write (the R4B models check none).

Owns: walking a JSON resource along the element table generated from HL7's own R4
StructureDefinitions (``data/required_bindings.json``, by ``tools/gen_required_bindings.py``)
and reporting each element whose code is outside its required value set. Must not: echo the
submitted value (a name typed into a code field is PHI); issues name the element and value set.

FHIR rules applied: a ``code`` must be in the value set; a ``Coding`` must be one of its
(system, code) pairs; a ``CodeableConcept`` needs at least one such coding (text alone, or only
codings from other systems, does not satisfy a required binding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from fhir_kat.errors import Issue, issue


@dataclass(frozen=True)
class _Child:
    types: tuple[str, ...]
    valueset: str | None


@dataclass(frozen=True)
class _Tables:
    children: dict[str, dict[str, _Child]]  # type -> JSON key -> child (choice keys expanded)
    codes: dict[str, frozenset[str]]  # value set -> codes (for ``code`` elements)
    pairs: dict[str, frozenset[tuple[str, str]]]  # value set -> (system, code)


@cache
def _tables() -> _Tables:
    raw = json.loads(
        resources.files("fhir_kat.validation")
        .joinpath("data/required_bindings.json")
        .read_text("utf-8")
    )
    children: dict[str, dict[str, _Child]] = {}
    for tname, elements in raw["types"].items():
        table: dict[str, _Child] = {}
        for name, spec in elements.items():
            types = tuple(spec["t"])
            valueset = spec.get("vs")
            if name.endswith("[x]"):
                stem = name[:-3]
                for t in types:
                    table[stem + t[0].upper() + t[1:]] = _Child((t,), valueset)
                if valueset:  # a bound choice of primitive code types
                    table[stem + "Code"] = _Child((), valueset)
            else:
                table[name] = _Child(types, valueset)
        children[tname] = table
    pairs = {vs: frozenset((s, c) for s, c in codes) for vs, codes in raw["valueSets"].items()}
    codes = {vs: frozenset(c for _, c in values) for vs, values in pairs.items()}
    return _Tables(children, codes, pairs)


def check_required_bindings(resource: dict[str, Any]) -> list[Issue]:
    problems: list[Issue] = []
    rtype = resource.get("resourceType")
    if isinstance(rtype, str):
        _walk(resource, rtype, rtype, problems, _tables())
    return problems


def _walk(node: dict[str, Any], tname: str, path: str, out: list[Issue], t: _Tables) -> None:
    table = t.children.get(tname)
    if table is None:
        return
    for key, value in node.items():
        child = table.get(key)
        if child is None:
            continue
        if isinstance(value, list):
            for i, item in enumerate(value):
                _check(item, child, f"{path}.{key}[{i}]", out, t)
        else:
            _check(value, child, f"{path}.{key}", out, t)


def _check(value: Any, child: _Child, path: str, out: list[Issue], t: _Tables) -> None:
    if child.valueset is not None:
        problem = _binding_problem(value, child, t)
        if problem:
            out.append(
                issue("code-invalid", f"{problem} (required value set {child.valueset})", path)
            )
    if not isinstance(value, dict):
        return
    for tname in child.types:
        if tname == "Resource":
            rtype = value.get("resourceType")
            if isinstance(rtype, str):
                _walk(value, rtype, path, out, t)
        else:
            _walk(value, tname, path, out, t)


def _binding_problem(value: Any, child: _Child, t: _Tables) -> str | None:
    vs = child.valueset
    assert vs is not None
    if isinstance(value, str):
        return None if value in t.codes[vs] else "the code is not allowed"
    if not isinstance(value, dict):
        return None  # wrong JSON type: the structural check reports it
    if "coding" in value or "text" in value:  # CodeableConcept
        codings = value.get("coding", [])
        if any(_pair(c) in t.pairs[vs] for c in codings if isinstance(c, dict)):
            return None
        return "no coding from the value set"
    if "code" in value or "system" in value:  # Coding
        if _pair(value) in t.pairs[vs]:
            return None
        return "the coding is not in the value set"
    return None


def _pair(coding: dict[str, Any]) -> tuple[str, str]:
    return (str(coding.get("system", "")), str(coding.get("code", "")))
