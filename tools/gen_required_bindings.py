"""Generate ``fhir_kat/validation/data/required_bindings.json`` from HL7's R4 definitions.

Reads the official StructureDefinitions, ValueSets and CodeSystems in ``hl7.fhir.r4.examples``
4.0.1 and writes, for every type the supported resources can reach, the children needed to walk
an instance and every element bound with strength ``required`` to a value set we can expand
from the package. Value sets that cannot be expanded here (external code systems such as
BCP-47 languages, MIME types, UCUM; filter-based includes) are listed under ``unexpandable``.

    python tools/gen_required_bindings.py          # rewrite the data file
    python tools/gen_required_bindings.py --check  # exit 1 if it differs (the tests do this)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fhir_kat.validation.resource import SUPPORTED_TYPES
from tools.hl7_packages import ensure

OUT = (
    Path(__file__).resolve().parents[1]
    / "fhir_kat"
    / "validation"
    / "data"
    / "required_bindings.json"
)
#: Resource types walked: the stored ones plus those the service emits or nests.
ROOTS = sorted(
    set(SUPPORTED_TYPES) | {"Bundle", "OperationOutcome", "CapabilityStatement", "Parameters"}
)
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
}
TEXT_TYPES = {"http://hl7.org/fhirpath/System.String"}


def load(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    sds, vss, css = {}, {}, {}
    for path in folder.glob("*.json"):
        prefix = path.name.split("-", 1)[0]
        if prefix not in ("StructureDefinition", "ValueSet", "CodeSystem"):
            continue
        doc = json.loads(path.read_text(encoding="utf-8"))
        if (
            doc.get("resourceType") == "StructureDefinition"
            and doc.get("derivation") != "constraint"
        ):
            if doc.get("kind") in ("resource", "complex-type"):
                sds[doc["type"]] = doc
        elif doc.get("resourceType") == "ValueSet":
            vss[doc["url"]] = doc
        elif doc.get("resourceType") == "CodeSystem":
            css[doc["url"]] = doc
    return sds, vss, css


def _concepts(concepts: list[dict[str, Any]]) -> list[str]:
    out = []
    for c in concepts:
        out.append(c["code"])
        out.extend(_concepts(c.get("concept", [])))
    return out


def expand(
    url: str, vss: dict[str, Any], css: dict[str, Any], seen: frozenset[str] = frozenset()
) -> set[tuple[str, str]] | None:
    vs = vss.get(url.split("|")[0])
    if vs is None or url in seen:
        return None
    codes: set[tuple[str, str]] = set()
    compose = vs.get("compose", {})
    for include in compose.get("include", []):
        if include.get("filter"):
            return None
        for other in include.get("valueSet", []):
            sub = expand(other, vss, css, seen | {url})
            if sub is None:
                return None
            codes |= sub
        system = include.get("system")
        if not system:
            continue
        if include.get("concept"):
            codes |= {(system, c["code"]) for c in include["concept"]}
        else:
            cs = css.get(system)
            if cs is None or cs.get("content") not in ("complete", None) or not cs.get("concept"):
                return None
            codes |= {(system, code) for code in _concepts(cs["concept"])}
    for exclude in compose.get("exclude", []):
        system = exclude.get("system")
        codes -= {(system, c["code"]) for c in exclude.get("concept", [])}
    return codes or None


def build() -> dict[str, Any]:
    sds, vss, css = load(ensure("hl7.fhir.r4.examples"))
    types: dict[str, dict[str, Any]] = {}
    valuesets: dict[str, Any] = {}
    unexpandable: set[str] = set()
    queue = list(ROOTS)
    done: set[str] = set()
    while queue:
        tname = queue.pop()
        if tname in done or tname not in sds:
            continue
        done.add(tname)
        elements = sds[tname]["snapshot"]["element"]
        by_path = {e["path"]: e for e in elements}
        for element in elements:
            path = element["path"]
            parent, _, name = path.rpartition(".")
            if not parent:
                continue
            owner = parent if parent != tname else tname
            if "contentReference" in element:
                target = element["contentReference"].lstrip("#")
                child_types = [target]
            else:
                child_types = []
                for t in element.get("type", []):
                    code = t["code"]
                    if code in TEXT_TYPES:
                        code = "string"
                    if code in ("BackboneElement", "Element") and any(
                        p.startswith(path + ".") for p in by_path
                    ):
                        child_types.append(path)
                    else:
                        child_types.append(code)
                        if code not in PRIMITIVES and code not in done:
                            queue.append(code)
            spec: dict[str, Any] = {"t": child_types}
            binding = element.get("binding", {})
            if binding.get("strength") == "required" and binding.get("valueSet"):
                url = binding["valueSet"]
                key = url.split("|")[0]
                if key not in valuesets and key not in unexpandable:
                    codes = expand(url, vss, css)
                    if codes is None:
                        unexpandable.add(key)
                    else:
                        valuesets[key] = sorted([s, c] for s, c in codes)
                if key in valuesets:
                    spec["vs"] = key
            types.setdefault(owner, {})[name] = spec
    return {
        "generatedFrom": "hl7.fhir.r4.examples@4.0.1",
        "generator": "tools/gen_required_bindings.py",
        "roots": ROOTS,
        "types": _prune(types),
        "valueSets": dict(sorted(valuesets.items())),
        "unexpandable": sorted(unexpandable),
    }


def _prune(types: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Keep only children that are bound, or lead to a type that (transitively) has a binding
    or holds resources: the walker never descends where nothing can be checked."""
    useful = set(ROOTS) | {"Resource"}
    changed = True
    while changed:
        changed = False
        for tname, children in types.items():
            if tname in useful:
                continue
            if any("vs" in spec or set(spec["t"]) & useful for spec in children.values()):
                useful.add(tname)
                changed = True
    out: dict[str, dict[str, Any]] = {}
    for tname in sorted(types):
        if tname not in useful:
            continue
        kept = {
            name: {
                "t": [t for t in spec["t"] if t in useful],
                **({"vs": spec["vs"]} if "vs" in spec else {}),
            }
            for name, spec in sorted(types[tname].items())
            if "vs" in spec or set(spec["t"]) & useful
        }
        if kept:
            out[tname] = kept
    return out


def render() -> str:
    return json.dumps(build(), sort_keys=True, separators=(",", ":")) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current != text:
            print(
                f"{OUT} is out of date: run python tools/gen_required_bindings.py", file=sys.stderr
            )
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
