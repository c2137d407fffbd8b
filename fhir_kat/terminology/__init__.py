"""Terminology as FHIR resources: the CodeSystems, ValueSets and ConceptMaps in
``mappings/terminology/``.

Owns: loading them once (cached, checked for what this module can interpret) and answering
``translate`` (ConceptMap), ``validate_code`` (ValueSet) and ``display`` (CodeSystem). An
unmapped code is an ``UnmappedCode`` naming the code and the map — never passed through, never
defaulted. Must not: store, call HTTP (there is no terminology server here), or know about
artifacts or mapping files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from fhir_kat.canonical import canonical_base, identifier_base, read_definition

FOLDER = Path(__file__).resolve().parents[2] / "mappings" / "terminology"
#: Canonical base of every CodeSystem, ValueSet and ConceptMap of ours (ADR 0002): the
#: deployment's, configured (ADR 0021).
BASE = canonical_base()
#: Base of the identifier systems the service assigns (``f"{IDENTIFIERS}/consents"``).
IDENTIFIERS = identifier_base()

# A value is echoed in a diagnostic only when it looks like one of our codes: one case only
# (local codes are kebab-case, v3 codes upper case; a name is mixed case) and fewer than six
# digits (a PHN, a birth date or a phone number has more).
_CODE_LIKE = re.compile(r"^(?:[a-z0-9][a-z0-9._-]{0,39}|[A-Z0-9][A-Z0-9._-]{0,39})$")
_MAX_DIGITS = 5


def safe_code(code: str) -> str:
    """The code as it may appear in a diagnostic. Codes are named in errors (so the sender can
    fix them), but a misplaced name, PHN or free text must not be echoed: anything that does not
    look like a code becomes ``<value>``."""
    if _CODE_LIKE.match(code) and sum(c.isdigit() for c in code) <= _MAX_DIGITS:
        return code
    return "<value>"


def canonical(kind: str, name: str) -> str:
    """``kat-route`` → ``<canonical base>/CodeSystem/kat-route``; a full URL is
    returned unchanged."""
    return name if name.startswith(("http://", "https://")) else f"{BASE}/{kind}/{name}"


class UnmappedCode(LookupError):
    """A code a ConceptMap does not map (or a ValueSet does not contain)."""

    def __init__(self, code: str, resource: str, comment: str = "", *, kind: str = "ConceptMap"):
        what = "has no mapping in" if kind == "ConceptMap" else "is not in"
        text = f"code '{safe_code(code)}' {what} {kind} {resource}"
        super().__init__(f"{text}: {comment}" if comment else text)
        self.code, self.resource, self.comment = code, resource, comment


class TerminologyError(ValueError):
    """A terminology file this module cannot interpret (a packaging error, not a user error)."""


@dataclass(frozen=True)
class ConceptMapTable:
    url: str
    source_value_set: str | None
    #: (source system, code) -> target codings (system, code, display)
    targets: dict[tuple[str, str], tuple[dict[str, str], ...]]
    #: (source system, code) -> the map's comment why it has no target
    unmatched: dict[tuple[str, str], str]
    source_systems: tuple[str, ...]


@dataclass(frozen=True)
class Terminology:
    code_systems: dict[str, dict[str, str]]  # url -> code -> display
    value_sets: dict[str, frozenset[tuple[str, str]]]  # url -> expansion (system, code)
    maps: dict[str, ConceptMapTable]
    resources: tuple[dict[str, Any], ...]
    files: dict[str, str]  # canonical url -> file name (for lint and provenance)

    # ------------------------------------------------------------------ CodeSystem
    def display(self, system: str, code: str) -> str | None:
        return self.code_systems.get(system, {}).get(code)

    def has_code(self, system: str, code: str) -> bool:
        return code in self.code_systems.get(system, {})

    # ------------------------------------------------------------------ ValueSet
    def value_set(self, name: str) -> frozenset[tuple[str, str]]:
        url = canonical("ValueSet", name)
        if url not in self.value_sets:
            raise KeyError(f"no ValueSet {url}")
        return self.value_sets[url]

    def value_set_codes(self, name: str) -> list[str]:
        """The codes of an enumerable ValueSet, sorted (JSON Schema ``enum``, docs)."""
        return sorted({code for _, code in self.value_set(name)})

    def validate_code(self, value_set: str, system: str | None, code: str) -> bool:
        """Is ``code`` (of ``system``; any system when None) in the ValueSet's expansion?"""
        members = self.value_set(value_set)
        if system is None:
            return any(c == code for _, c in members)
        return (system, code) in members

    def system_of(self, value_set: str, code: str) -> str | None:
        """The system a bare code of this ValueSet belongs to (None when not a member)."""
        return next((s for s, c in sorted(self.value_set(value_set)) if c == code), None)

    # ------------------------------------------------------------------ ConceptMap
    def concept_map(self, name: str) -> ConceptMapTable:
        url = canonical("ConceptMap", name)
        if url not in self.maps:
            raise KeyError(f"no ConceptMap {url}")
        return self.maps[url]

    @property
    def concept_maps(self) -> dict[str, ConceptMapTable]:
        return self.maps

    def translate(
        self, concept_map: str, code: str, *, system: str | None = None, optional: bool = False
    ) -> list[dict[str, str]]:
        """Target codings for ``code`` (of ``system``; the map's only source system when None).

        ``[]`` only when ``optional`` and the map itself says the code is deliberately unmatched
        (e.g. ICD-10 for treatment-resistant depression). Anything else unmapped raises."""
        table = self.concept_map(concept_map)
        if system is None:
            if len(table.source_systems) != 1:
                raise TerminologyError(f"ConceptMap {table.url} has several sources: name one")
            system = table.source_systems[0]
        key = (system, code)
        targets = table.targets.get(key)
        if targets:
            return [dict(c) for c in targets]
        if optional and key in table.unmatched:
            return []
        raise UnmappedCode(code, table.url, table.unmatched.get(key, ""))


@cache
def load_terminology(folder: Path = FOLDER) -> Terminology:
    """Every terminology file of ``folder``, parsed once per process."""
    code_systems: dict[str, dict[str, str]] = {}
    docs: list[dict[str, Any]] = []
    files: dict[str, str] = {}
    for path in sorted(folder.glob("*.json")):
        doc = json.loads(read_definition(path))
        if doc.get("resourceType") not in ("CodeSystem", "ValueSet", "ConceptMap"):
            raise TerminologyError(f"{path.name}: not a CodeSystem, ValueSet or ConceptMap")
        if doc["url"] in files:
            raise TerminologyError(f"{path.name}: {doc['url']} is also in {files[doc['url']]}")
        files[doc["url"]] = path.name
        docs.append(doc)
        if doc["resourceType"] == "CodeSystem":
            code_systems[doc["url"]] = {c["code"]: c.get("display", "") for c in doc["concept"]}
    value_sets = {
        d["url"]: _value_set_expansion(d, code_systems)
        for d in docs
        if d["resourceType"] == "ValueSet"
    }
    maps = {d["url"]: _concept_map(d) for d in docs if d["resourceType"] == "ConceptMap"}
    return Terminology(code_systems, value_sets, maps, tuple(docs), files)


def _value_set_expansion(
    doc: dict[str, Any], code_systems: dict[str, dict[str, str]]
) -> frozenset[tuple[str, str]]:
    """The expansion of a ValueSet this module can compute without a terminology server:
    ``include`` of listed concepts of any system, or of a whole CodeSystem of ours."""
    compose = doc.get("compose", {})
    if compose.get("exclude"):
        raise TerminologyError(f"ValueSet {doc['url']}: exclude is not supported")
    members: set[tuple[str, str]] = set()
    for include in compose.get("include", []):
        if include.get("filter") or include.get("valueSet") or "system" not in include:
            raise TerminologyError(
                f"ValueSet {doc['url']}: only include by system (and concept) is supported"
            )
        system = include["system"]
        if include.get("concept"):
            members |= {(system, c["code"]) for c in include["concept"]}
        elif system in code_systems:
            members |= {(system, code) for code in code_systems[system]}
        else:
            # A whole external code system (all of SNOMED CT) cannot be expanded here.
            raise TerminologyError(f"ValueSet {doc['url']}: cannot expand all of {system}")
    return frozenset(members)


def _concept_map(doc: dict[str, Any]) -> ConceptMapTable:
    targets: dict[tuple[str, str], list[dict[str, str]]] = {}
    unmatched: dict[tuple[str, str], str] = {}
    sources: list[str] = []
    for group in doc["group"]:
        source = group["source"]
        if source not in sources:
            sources.append(source)
        for element in group["element"]:
            key = (source, element["code"])
            for target in element.get("target", []):
                # "unmatched" (R4 ConceptMapEquivalence) says, with a comment, why a code
                # deliberately has no target; "disjoint" would be a wrong mapping to use.
                if target.get("equivalence") in ("unmatched", "disjoint") or "code" not in target:
                    unmatched[key] = target.get("comment", "")
                    continue
                coding = {"system": group["target"], "code": target["code"]}
                if target.get("display"):
                    coding["display"] = target["display"]
                targets.setdefault(key, []).append(coding)
    return ConceptMapTable(
        url=doc["url"],
        source_value_set=doc.get("sourceUri") or doc.get("sourceCanonical"),
        targets={k: tuple(v) for k, v in targets.items()},
        unmatched=unmatched,
        source_systems=tuple(sources),
    )


def translate(concept_map_url: str, system: str, code: str) -> list[dict[str, str]]:
    """The target Codings of ``system|code`` in a ConceptMap of ours; ``UnmappedCode`` (naming
    the code and the map) when it has none."""
    return load_terminology().translate(concept_map_url, code, system=system)


def validate_code(valueset_url: str, system: str, code: str) -> bool:
    """Is ``system|code`` in a ValueSet of ours?"""
    return load_terminology().validate_code(valueset_url, system, code)


__all__ = [
    "BASE",
    "IDENTIFIERS",
    "ConceptMapTable",
    "Terminology",
    "TerminologyError",
    "UnmappedCode",
    "canonical",
    "load_terminology",
    "safe_code",
    "translate",
    "validate_code",
]
