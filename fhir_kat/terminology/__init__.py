"""Terminology as FHIR resources: the ConceptMaps and CodeSystems in ``mappings/terminology/``.

Owns: loading them once and answering ``translate`` and ``lookup``. An unmapped code is an
error naming the code and the map — never passed through, never defaulted. Must not: store,
call HTTP, or know about artifacts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

FOLDER = Path(__file__).resolve().parents[2] / "mappings" / "terminology"
BASE = "https://fhir-kat.example.org/fhir"


def safe_code(code: str) -> str:
    """Codes are named in errors (the issue asks for it), but a misplaced free-text value must
    not be echoed: anything that does not look like a code becomes <value>."""
    return (
        code if len(code) <= 40 and code.replace("-", "").replace(".", "").isalnum() else "<value>"
    )


class UnmappedCode(LookupError):
    def __init__(self, code: str, concept_map: str, comment: str = "") -> None:
        text = f"code '{safe_code(code)}' has no mapping in ConceptMap {concept_map}"
        super().__init__(f"{text}: {comment}" if comment else text)
        self.code, self.concept_map = code, concept_map


@dataclass(frozen=True)
class Terminology:
    code_systems: dict[str, dict[str, str]]  # url -> code -> display
    concept_maps: dict[str, dict[str, list[dict[str, str]]]]  # url -> code -> targets
    unmatched: dict[str, dict[str, str]]  # url -> code -> comment
    value_sets: dict[str, frozenset[tuple[str, str]]]  # url -> (system, code), enumerated only
    resources: tuple[dict[str, Any], ...]

    def display(self, system: str, code: str) -> str | None:
        return self.code_systems.get(system, {}).get(code)

    def value_set_codes(self, name: str) -> list[str]:
        url = name if name.startswith("http") else f"{BASE}/ValueSet/{name}"
        return sorted(code for _, code in self.value_sets[url])

    def has_code(self, system: str, code: str) -> bool:
        return code in self.code_systems.get(system, {})

    def translate(
        self, concept_map: str, code: str, *, optional: bool = False
    ) -> list[dict[str, str]]:
        """Target codings for ``code``; ``[]`` only when ``optional`` and the map says unmatched."""
        url = concept_map if concept_map.startswith("http") else f"{BASE}/ConceptMap/{concept_map}"
        if url not in self.concept_maps:
            raise KeyError(f"no ConceptMap {url}")
        targets = self.concept_maps[url].get(code)
        if targets:
            return targets
        if optional and code in self.unmatched[url]:
            return []
        raise UnmappedCode(code, url, self.unmatched[url].get(code, ""))


@cache
def load_terminology(folder: Path = FOLDER) -> Terminology:
    code_systems: dict[str, dict[str, str]] = {}
    maps: dict[str, dict[str, list[dict[str, str]]]] = {}
    unmatched: dict[str, dict[str, str]] = {}
    value_sets: dict[str, frozenset[tuple[str, str]]] = {}
    docs = []
    for path in sorted(folder.glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        docs.append(doc)
        if doc["resourceType"] == "ValueSet":
            value_sets[doc["url"]] = frozenset(
                (inc["system"], c["code"])
                for inc in doc["compose"]["include"]
                for c in inc.get("concept", [])
            )
        elif doc["resourceType"] == "CodeSystem":
            code_systems[doc["url"]] = {c["code"]: c.get("display", "") for c in doc["concept"]}
        elif doc["resourceType"] == "ConceptMap":
            table: dict[str, list[dict[str, str]]] = {}
            misses: dict[str, str] = {}
            for group in doc["group"]:
                for element in group["element"]:
                    for target in element.get("target", []):
                        if target.get("equivalence") == "unmatched" or "code" not in target:
                            misses[element["code"]] = target.get("comment", "")
                            continue
                        coding = {"system": group["target"], "code": target["code"]}
                        if target.get("display"):
                            coding["display"] = target["display"]
                        table.setdefault(element["code"], []).append(coding)
            maps[doc["url"]] = table
            unmatched[doc["url"]] = misses
    return Terminology(code_systems, maps, unmatched, value_sets, tuple(docs))
