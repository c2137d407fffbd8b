"""The triage criteria as FHIR ValueSets (``mappings/terminology/criteria/``) and membership in
them, offline or through a terminology server.

Owns: loading the criterion ValueSets (``compose.include``/``exclude`` of listed concepts and of
``is-a`` filters) and ``CriterionSet.contains``. Offline, a SNOMED CT code is a member when the
ValueSet lists it or names it as an ``is-a`` root; an ICD-10 / ICD-10-CA code is a member when
it equals an ``is-a`` root or lies below it — those classifications carry their hierarchy in the
code itself (F32.3 is a kind of F32), so no release is needed. With a ``Subsumption`` oracle (a
terminology server's ``CodeSystem/$subsumes``), a SNOMED CT code below a root is a member too.
An answer the oracle cannot give is "not a member", never a guess: triage then sends the code to
a clinician as unclassified.

Must not: call HTTP itself (the oracle lives in ``fhir_kat.exchange``), store, or decide
eligibility (``fhir_kat.workflow.triage`` does).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from fhir_kat.canonical import read_definition
from fhir_kat.terminology import BASE, TerminologyError

FOLDER = Path(__file__).resolve().parents[2] / "mappings" / "terminology" / "criteria"
SNOMED = "http://snomed.info/sct"
#: Classifications whose codes carry their hierarchy (a code lies below its prefix).
ICD10 = ("http://hl7.org/fhir/sid/icd-10", "http://hl7.org/fhir/sid/icd-10-ca")


class Subsumption(Protocol):
    """A terminology server's ``$subsumes``: does ``ancestor`` subsume ``code`` in ``system``?
    ``None`` when it cannot say (unknown code, server unreachable)."""

    def subsumes(self, system: str, ancestor: str, code: str) -> bool | None: ...


def normalise_icd(code: str) -> str:
    """ICD-10 codes compare without the dot and case-blind (``f32.3`` = ``F323``)."""
    return code.replace(".", "").strip().upper()


@dataclass(frozen=True)
class _Part:
    codes: frozenset[tuple[str, str]]
    roots: frozenset[tuple[str, str]]

    def matches(self, system: str, code: str, oracle: Subsumption | None) -> bool:
        if system in ICD10:
            key = normalise_icd(code)
            return any(s == system and key.startswith(normalise_icd(r)) for s, r in self.roots)
        if (system, code) in self.codes or (system, code) in self.roots:
            return True
        if oracle is None:
            return False
        return any(
            s == system and oracle.subsumes(system, root, code) is True for s, root in self.roots
        )


@dataclass(frozen=True)
class CriterionSet:
    """One criterion ValueSet: what it includes minus what it excludes."""

    id: str
    url: str
    title: str
    include: _Part
    exclude: _Part

    def contains(
        self,
        system: str,
        code: str,
        oracle: Subsumption | None = None,
        *,
        icd_beyond_who: bool = True,
    ) -> bool:
        """Is ``system|code`` a member? ``icd_beyond_who=False`` leaves out ICD-10 codes more
        specific than WHO's four characters (a national extension, or an ICD-10-CM code sent
        under the WHO system, whose meaning this set cannot know): an automatic *inclusion* must
        not rest on them, an exclusion may."""
        if not code:
            return False
        if system in ICD10 and not icd_beyond_who and len(normalise_icd(code)) > 4:
            return False
        return self.include.matches(system, code, oracle) and not self.exclude.matches(
            system, code, None if system in ICD10 else oracle
        )

    def members(self) -> Iterable[tuple[str, str]]:
        """Every listed concept and root (for tests and documentation), excluded ones left out."""
        for system, code in sorted(self.include.codes | self.include.roots):
            if not self.exclude.matches(system, code, None):
                yield system, code


@cache
def _documents(folder: Path = FOLDER) -> tuple[dict[str, Any], ...]:
    return tuple(
        json.loads(read_definition(path)) for path in sorted(folder.glob("ValueSet-*.json"))
    )


def criterion_documents() -> list[dict[str, Any]]:
    """The criterion ValueSets as FHIR resources (terminology operations, the package)."""
    return list(_documents())


@cache
def load_criteria(folder: Path = FOLDER) -> dict[str, CriterionSet]:
    """Every criterion ValueSet of ``folder`` by id, parsed once per process."""
    found: dict[str, CriterionSet] = {}
    for doc in _documents(folder):
        if (
            doc.get("resourceType") != "ValueSet"
            or doc.get("url") != f"{BASE}/ValueSet/{doc['id']}"
        ):
            raise TerminologyError(f"{doc.get('id')}: not a ValueSet of ours")
        compose = doc.get("compose", {})
        found[doc["id"]] = CriterionSet(
            id=doc["id"],
            url=doc["url"],
            title=doc.get("title", doc["id"]),
            include=_part(doc["url"], compose.get("include", [])),
            exclude=_part(doc["url"], compose.get("exclude", [])),
        )
    return found


def _part(url: str, rules: list[dict[str, Any]]) -> _Part:
    codes: set[tuple[str, str]] = set()
    roots: set[tuple[str, str]] = set()
    for rule in rules:
        system = rule.get("system")
        if not system or rule.get("valueSet"):
            raise TerminologyError(f"ValueSet {url}: include/exclude by system only")
        for concept in rule.get("concept", []):
            codes.add((system, concept["code"]))
        for f in rule.get("filter", []):
            if f.get("property") != "concept" or f.get("op") != "is-a":
                raise TerminologyError(f"ValueSet {url}: only 'concept is-a' filters")
            roots.add((system, f["value"]))
        if system in ICD10 and rule.get("concept"):
            raise TerminologyError(f"ValueSet {url}: list ICD-10 codes as is-a roots")
    return _Part(frozenset(codes), frozenset(roots))


__all__ = [
    "ICD10",
    "SNOMED",
    "CriterionSet",
    "Subsumption",
    "criterion_documents",
    "load_criteria",
    "normalise_icd",
]
