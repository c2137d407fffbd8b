"""Generate ``fhir_kat/validation/data/required_bindings.json`` from HL7's own R4 definitions.

Owns: deriving, from the StructureDefinitions, ValueSets and CodeSystems of the pinned
``hl7.fhir.r4.examples`` 4.0.1 package (``tools.hl7_packages``), the table the service uses at
run time to check required bindings (``fhir_kat.validation.bindings``). Must not: hand-edit or
hand-add codes; the service never imports this module (it needs npm), only its output.

What the file holds (keys sorted, so a regeneration is byte-identical):

- ``roots``: the resource types walked (``SUPPORTED`` plus ``Parameters``); ``Element`` is
  walked too, for the ``_birthDate`` objects that carry a primitive's extensions.
- ``types``: the element tree needed to walk an instance: type key -> element name -> the
  type keys of its values. A type key is a datatype name (``HumanName``) or, for a
  BackboneElement, its element path (``Patient.contact``); a ``contentReference`` points at the
  path it reuses (``Questionnaire.item.item`` -> ``Questionnaire.item``). Names ending in
  ``[x]`` are choice elements (JSON ``valueQuantity`` for ``value[x]`` of type Quantity).
  ``Resource`` means "any resource, walk it by its resourceType". The tree is pruned to the
  branches that can reach a required binding or a nested resource.
- ``bindings``: element path -> ``{"type": [...], "valueSet": canonical}`` for every element
  bound with strength ``required`` to a value set expanded here.
- ``valueSets``: canonical -> ``{system: [codes]}``, the expansion (for a ``code`` element the
  codes count; for Coding and CodeableConcept the (system, code) pairs).
- ``unexpandable``: canonical -> reason and bound elements, for required value sets the package
  cannot expand (external code systems such as BCP-47 languages, MIME types, UCUM; property
  filters). Those bindings are not checked at run time.

    python tools/gen_required_bindings.py          # rewrite the data file
    python tools/gen_required_bindings.py --check  # exit 1 if the committed file differs
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``tools`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.hl7_packages import PACKAGES, ensure

OUT = (
    Path(__file__).resolve().parents[1]
    / "fhir_kat"
    / "validation"
    / "data"
    / "required_bindings.json"
)
PACKAGE = "hl7.fhir.r4.examples"

#: The resource types the service stores, emits or nests (Bundle, OperationOutcome,
#: CapabilityStatement).
SUPPORTED: tuple[str, ...] = (
    "Appointment",
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Endpoint",
    "Condition",
    "ServiceRequest",
    "Task",
    "Observation",
    "Consent",
    "DocumentReference",
    "Encounter",
    "Medication",
    "MedicationAdministration",
    "AdverseEvent",
    "AllergyIntolerance",
    "Questionnaire",
    "QuestionnaireResponse",
    "Provenance",
    "Flag",
    "Group",
    "Measure",
    "MeasureReport",
    "Subscription",
    "AuditEvent",
    "Composition",
    "ClinicalImpression",
    "Communication",
    "Bundle",
    "OperationOutcome",
    "CapabilityStatement",
)
#: Walked too: the body of the operations the service accepts ($evaluate-measure, $extract).
ROOTS: tuple[str, ...] = (*SUPPORTED, "Parameters")

#: FHIRPath system types HL7 uses for ``id``, ``Extension.url`` and the like.
SYSTEM_TYPES = {
    "http://hl7.org/fhirpath/System.String": "string",
    "http://hl7.org/fhirpath/System.Boolean": "boolean",
    "http://hl7.org/fhirpath/System.Integer": "integer",
    "http://hl7.org/fhirpath/System.Decimal": "decimal",
    "http://hl7.org/fhirpath/System.Date": "date",
    "http://hl7.org/fhirpath/System.DateTime": "dateTime",
    "http://hl7.org/fhirpath/System.Time": "time",
}
ANY_RESOURCE = "Resource"


@dataclass
class Definitions:
    types: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> StructureDefinition
    primitives: set[str] = field(default_factory=set)
    valuesets: dict[str, dict[str, Any]] = field(default_factory=dict)  # canonical -> ValueSet
    codesystems: dict[str, dict[str, Any]] = field(default_factory=dict)


def load(folder: Path) -> Definitions:
    """The base definitions (specializations, not profiles) and all terminology resources."""
    defs = Definitions()
    for path in sorted(folder.glob("*.json")):
        prefix = path.name.split("-", 1)[0]
        if prefix not in ("StructureDefinition", "ValueSet", "CodeSystem"):
            continue
        doc = json.loads(path.read_text(encoding="utf-8"))
        rtype = doc.get("resourceType")
        if rtype == "StructureDefinition":
            if doc.get("derivation") == "constraint" or "snapshot" not in doc:
                continue  # profiles and extensions: the instance is checked against the base
            if doc.get("kind") == "primitive-type":
                defs.primitives.add(doc["type"])
            elif doc.get("kind") in ("resource", "complex-type"):
                defs.types[doc["type"]] = doc
        elif rtype == "ValueSet":
            defs.valuesets.setdefault(doc["url"], doc)
        elif rtype == "CodeSystem":
            defs.codesystems.setdefault(doc["url"], doc)
    return defs


class Unexpandable(Exception):
    pass


def _all_codes(concepts: Iterable[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for concept in concepts:
        out.append(concept["code"])
        out.extend(_all_codes(concept.get("concept", [])))  # nested (hierarchical) concepts
    return out


def expand(url: str, defs: Definitions, seen: frozenset[str] = frozenset()) -> set[tuple[str, str]]:
    """(system, code) pairs of a ValueSet, from its ``compose`` (FHIR R4 valueset.html,
    "Value Set Expansion": each include is the intersection of its system part and its value
    sets; the includes are united; excludes removed). Raises ``Unexpandable``."""
    canonical = url.split("|", 1)[0]
    if canonical in seen:
        raise Unexpandable(f"value set {canonical} includes itself")
    vs = defs.valuesets.get(canonical)
    if vs is None:
        raise Unexpandable(f"value set {canonical} is not in the package")
    compose = vs.get("compose")
    if not compose:
        raise Unexpandable(f"value set {canonical} has no compose")
    codes: set[tuple[str, str]] = set()
    for include in compose.get("include", []):
        codes |= _include(include, defs, seen | {canonical})
    for exclude in compose.get("exclude", []):
        codes -= _include(exclude, defs, seen | {canonical})
    if not codes:
        raise Unexpandable(f"value set {canonical} expands to nothing here")
    return codes


def _include(
    include: dict[str, Any], defs: Definitions, seen: frozenset[str]
) -> set[tuple[str, str]]:
    parts: list[set[tuple[str, str]]] = []
    system = include.get("system")
    if include.get("filter"):
        raise Unexpandable(f"property filter on {system} (needs a terminology server)")
    if system:
        if include.get("concept"):
            parts.append({(system, c["code"]) for c in include["concept"]})
        else:
            cs = defs.codesystems.get(system)
            if cs is None:
                raise Unexpandable(f"code system {system} is not in the package")
            if cs.get("content") != "complete":
                raise Unexpandable(f"code system {system} has content {cs.get('content')!r}")
            parts.append({(system, code) for code in _all_codes(cs.get("concept", []))})
    for other in include.get("valueSet", []):
        parts.append(expand(other, defs, seen))
    if not parts:
        return set()
    result = parts[0]
    for part in parts[1:]:
        result &= part
    return result


def _type_codes(element: dict[str, Any], has_children: bool) -> list[str]:
    if "contentReference" in element:
        return [element["contentReference"].lstrip("#")]
    out = []
    for t in element.get("type", []):
        code = SYSTEM_TYPES.get(t["code"], t["code"])
        if code in ("BackboneElement", "Element") and has_children:
            out.append(element["path"])  # the element defines its own children
        else:
            out.append(code)
    return out


def build() -> dict[str, Any]:
    defs = load(ensure(PACKAGE))
    missing = [r for r in ROOTS if r not in defs.types]
    if missing:
        raise SystemExit(f"no StructureDefinition for {missing} in {PACKAGE}")
    tree: dict[str, dict[str, list[str]]] = {}
    bindings: dict[str, dict[str, Any]] = {}
    expansions: dict[str, set[tuple[str, str]]] = {}
    unexpandable: dict[str, dict[str, Any]] = {}
    # Element: the type of a primitive's "_birthDate" object (its id and extensions).
    queue, done = [*ROOTS, "Element"], set()
    while queue:
        tname = queue.pop()
        if tname in done:
            continue
        done.add(tname)
        elements = defs.types[tname]["snapshot"]["element"]
        parents = {e["path"].rpartition(".")[0] for e in elements}
        for element in elements:
            path = element["path"]
            owner, _, name = path.rpartition(".")
            if not owner:
                continue
            kinds = _type_codes(element, path in parents)
            tree.setdefault(owner, {})[name] = kinds
            for kind in kinds:
                if kind in defs.types and kind not in done:
                    queue.append(kind)
            binding = element.get("binding", {})
            if binding.get("strength") != "required" or not binding.get("valueSet"):
                continue
            canonical = binding["valueSet"].split("|", 1)[0]
            if canonical not in expansions and canonical not in unexpandable:
                try:
                    expansions[canonical] = expand(canonical, defs)
                except Unexpandable as exc:
                    unexpandable[canonical] = {"reason": str(exc), "elements": []}
            if canonical in expansions:
                bindings[path] = {"type": kinds, "valueSet": canonical}
            else:
                unexpandable[canonical]["elements"].append(path)
    pruned = _prune(tree, set(bindings))
    kept_bindings = {p: b for p, b in bindings.items() if p.rpartition(".")[0] in pruned}
    used = {b["valueSet"] for b in kept_bindings.values()}
    for entry in unexpandable.values():
        entry["elements"] = sorted(p for p in entry["elements"] if p.rpartition(".")[0] in pruned)
    return {
        "about": "Generated by tools/gen_required_bindings.py; do not edit. See its docstring.",
        "source": PACKAGES[PACKAGE].spec,
        "roots": sorted(ROOTS),
        "types": pruned,
        "bindings": kept_bindings,
        "valueSets": {url: _by_system(expansions[url]) for url in used},
        "unexpandable": {url: e for url, e in unexpandable.items() if e["elements"]},
    }


def _by_system(pairs: set[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for system, code in sorted(pairs):
        out.setdefault(system, []).append(code)
    return out


def _prune(tree: dict[str, dict[str, list[str]]], bound: set[str]) -> dict[str, Any]:
    """Only the elements that are bound, or lead (through any depth of types) to a bound
    element or to a nested resource: the walker never descends where nothing is checked."""
    useful = {ANY_RESOURCE}
    changed = True
    while changed:
        changed = False
        for owner, children in tree.items():
            if owner in useful:
                continue
            if any(
                f"{owner}.{name}" in bound or set(kinds) & useful
                for name, kinds in children.items()
            ):
                useful.add(owner)
                changed = True
    out: dict[str, Any] = {}
    for owner in sorted(tree):
        if owner not in useful:
            continue
        kept = {}
        for name, kinds in tree[owner].items():
            if f"{owner}.{name}" in bound:
                kept[name] = kinds  # all types: a bound choice needs its primitive type names
            elif set(kinds) & useful:
                kept[name] = [k for k in kinds if k in useful]
        if kept:
            out[owner] = kept
    return out


def render() -> str:
    # One value per line: compact, yet a regeneration diff shows exactly what moved.
    return json.dumps(build(), sort_keys=True, indent=0, separators=(",", ":")) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv[1:]:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is stale: run python tools/gen_required_bindings.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
