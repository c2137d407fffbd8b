"""The FHIR terminology operations on the service's own content: ``ValueSet/$expand``,
``ValueSet/$validate-code``, ``CodeSystem/$lookup`` and ``ConceptMap/$translate``.

Owns: reading an operation's parameters (a closed set per operation, each checked: unknown or
repeated ones are a 400 naming them), answering from the CodeSystems, ValueSets and ConceptMaps
of ``mappings/terminology/`` (and the triage criterion ValueSets), and building the ``Parameters``
or expanded ``ValueSet`` the operation returns. An operation on something that is not ours is a
404 naming it: there is no terminology server behind this one, and a code outside our content is
never answered by a guess.

Must not: import flask, store, call HTTP, or know who asks (the blueprint checks the caller).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fhir_kat.errors import BadRequest, Issue, NotFound, Unprocessable, issue
from fhir_kat.terminology import Terminology, load_terminology, safe_code
from fhir_kat.terminology.criteria import CriterionSet, load_criteria

#: Operation -> parameter -> (value kinds accepted, may repeat). Kinds: "str" (any FHIR
#: primitive sent as a string), "int", "bool", "Coding", "CodeableConcept".
SIGNATURES: dict[str, dict[str, tuple[tuple[str, ...], bool]]] = {
    "expand": {
        "url": (("str",), False),
        "valueSetVersion": (("str",), False),
        "filter": (("str",), False),
        "offset": (("int",), False),
        "count": (("int",), False),
        "activeOnly": (("bool",), False),
        "includeDesignations": (("bool",), False),
        "displayLanguage": (("str",), False),
    },
    "validate-code": {
        "url": (("str",), False),
        "valueSetVersion": (("str",), False),
        "code": (("str",), False),
        "system": (("str",), False),
        "systemVersion": (("str",), False),
        "display": (("str",), False),
        "coding": (("Coding",), False),
        "codeableConcept": (("CodeableConcept",), False),
        "abstract": (("bool",), False),
        "displayLanguage": (("str",), False),
    },
    "lookup": {
        "code": (("str",), False),
        "system": (("str",), False),
        "version": (("str",), False),
        "coding": (("Coding",), False),
        "displayLanguage": (("str",), False),
        "property": (("str",), True),
    },
    "translate": {
        "url": (("str",), False),
        "conceptMapVersion": (("str",), False),
        "code": (("str",), False),
        "system": (("str",), False),
        "version": (("str",), False),
        "source": (("str",), False),
        "coding": (("Coding",), False),
        "codeableConcept": (("CodeableConcept",), False),
        "target": (("str",), False),
        "targetsystem": (("str",), False),
        "reverse": (("bool",), False),
    },
}
#: A page of an expansion holds at most this many codes (our ValueSets are far smaller).
MAX_COUNT = 1000
_FORMAT = "_format"  # the REST layer's own parameter, allowed on every GET


@dataclass
class Params:
    """An operation's parameters after checking: name -> values, in the order sent."""

    operation: str
    values: dict[str, list[Any]] = field(default_factory=dict)

    def one(self, name: str) -> Any:
        found = self.values.get(name)
        return found[0] if found else None

    def text(self, name: str) -> str | None:
        value = self.one(name)
        return value if isinstance(value, str) else None


def params_from_query(operation: str, pairs: Iterable[tuple[str, str]]) -> Params:
    """A GET's query string: primitives only (Coding and CodeableConcept need a POST)."""
    raw: list[tuple[str, Any, str]] = [
        (name, value, "str") for name, value in pairs if name != _FORMAT
    ]
    return _checked(operation, raw)


def params_from_body(operation: str, body: Any) -> Params:
    """A POST's ``Parameters`` resource (``value[x]`` per parameter)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise BadRequest(issue("invalid", "POST a Parameters resource", "Parameters"))
    raw: list[tuple[str, Any, str]] = []
    problems: list[Issue] = []
    for i, p in enumerate(body.get("parameter") or []):
        where = f"Parameters.parameter[{i}]"
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            problems.append(issue("structure", "a parameter needs a name", where))
            continue
        keys = [k for k in p if k.startswith("value")]
        if len(keys) != 1 or "resource" in p or "part" in p:
            problems.append(
                issue("structure", f"parameter {p['name']}: send exactly one value[x]", where)
            )
            continue
        kind = keys[0][len("value") :]
        value = p[keys[0]]
        if kind in ("Coding", "CodeableConcept"):
            if not isinstance(value, dict):
                problems.append(issue("structure", f"{keys[0]} must be an object", where))
                continue
            raw.append((p["name"], value, kind))
        elif kind == "Boolean":
            raw.append((p["name"], value, "bool"))
        elif kind in ("Integer", "UnsignedInt", "PositiveInt"):
            raw.append((p["name"], value, "int"))
        else:
            raw.append((p["name"], value, "str" if isinstance(value, str) else "?"))
    if problems:
        raise BadRequest(problems)
    return _checked(operation, raw)


def _checked(operation: str, raw: list[tuple[str, Any, str]]) -> Params:
    signature = SIGNATURES[operation]
    problems: list[Issue] = []
    out = Params(operation)
    for name, value, kind in raw:
        if name not in signature:
            problems.append(issue("not-supported", f"${operation} has no parameter {name}", name))
            continue
        kinds, repeats = signature[name]
        converted = _convert(value, kind, kinds)
        if converted is None:
            problems.append(issue("invalid", f"{name} must be a {' or '.join(kinds)}", name))
            continue
        if name in out.values and not repeats:
            problems.append(issue("invalid", f"{name} may be given only once", name))
            continue
        out.values.setdefault(name, []).append(converted)
    if problems:
        raise BadRequest(problems)
    count = out.one("count")
    if count is not None and not 0 <= count <= MAX_COUNT:
        raise BadRequest(issue("invalid", f"count must be between 0 and {MAX_COUNT}", "count"))
    if (out.one("offset") or 0) < 0:
        raise BadRequest(issue("invalid", "offset must not be negative", "offset"))
    return out


def _convert(value: Any, kind: str, accepted: tuple[str, ...]) -> Any:
    """``value`` as the kind the parameter takes, or None when it cannot be one. A GET sends
    every value as a string; a POST sends them typed."""
    if kind in ("Coding", "CodeableConcept"):
        return value if kind in accepted else None
    if "bool" in accepted:
        if isinstance(value, bool):
            return value
        if kind == "str" and value in ("true", "false"):
            return value == "true"
        return None
    if "int" in accepted:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind == "str" and isinstance(value, str) and value.isdigit():
            return int(value)
        return None
    return value if isinstance(value, str) and value else None


# ---------------------------------------------------------------------------------- lookups


def _resource(terminology: Terminology, rtype: str, url: str) -> dict[str, Any] | None:
    return next(
        (r for r in terminology.resources if r["resourceType"] == rtype and r["url"] == url),
        None,
    )


def resource_by_id(rtype: str, rid: str) -> dict[str, Any]:
    """One of our terminology resources by its id (instance-level operations), else 404."""
    found = next(
        (r for r in _all_resources() if r["resourceType"] == rtype and r["id"] == rid), None
    )
    if found is None:
        raise NotFound(issue("not-found", f"{rtype}/{rid} is not one of this service's", rtype))
    return found


def _all_resources() -> list[dict[str, Any]]:
    return [*load_terminology().resources, *_criterion_documents()]


def _criterion_documents() -> list[dict[str, Any]]:
    from fhir_kat.terminology.criteria import criterion_documents

    return criterion_documents()


def _criterion(url: str) -> CriterionSet | None:
    return next((c for c in load_criteria().values() if c.url == url), None)


def _split_canonical(url: str) -> tuple[str, str | None]:
    base, _, version = url.partition("|")
    return base, version or None


def _check_version(resource: dict[str, Any], wanted: str | None, where: str) -> None:
    if wanted is not None and str(resource.get("version", "")) != wanted:
        raise NotFound(
            issue(
                "not-found",
                f"{resource['resourceType']} {resource['url']} has no version {wanted}",
                where,
            )
        )


def _value_set(params: Params, instance: dict[str, Any] | None) -> dict[str, Any]:
    """The ValueSet the operation is about: the instance, or ``url`` (with ``|version``)."""
    url = params.text("url")
    if instance is not None:
        if url is not None and _split_canonical(url)[0] != instance["url"]:
            raise BadRequest(issue("invalid", "url names another ValueSet than the id", "url"))
        resource = instance
    else:
        if url is None:
            raise BadRequest(issue("required", "name the ValueSet: url", "url"))
        base, version = _split_canonical(url)
        found = next(
            (r for r in _all_resources() if r["resourceType"] == "ValueSet" and r["url"] == base),
            None,
        )
        if found is None:
            raise NotFound(issue("not-found", f"ValueSet {base} is not one of ours", "url"))
        _check_version(found, version, "url")
        resource = found
    _check_version(resource, params.text("valueSetVersion"), "valueSetVersion")
    return resource


# ---------------------------------------------------------------------------------- $expand


def expand(params: Params, now: datetime, instance: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ValueSet with an ``expansion``: every member (system, code, display) in a stable
    order, narrowed by ``filter`` (case-blind, on code and display) and paged by
    ``offset``/``count``. A ValueSet defined by ``is-a`` filters on an external code system
    (the triage criteria on SNOMED CT) cannot be expanded without that code system: 422."""
    resource = _value_set(params, instance)
    terminology = load_terminology()
    members = terminology.value_sets.get(resource["url"])
    if members is None:
        raise Unprocessable(
            issue(
                "too-costly",
                f"ValueSet {resource['url']} includes concepts by is-a filters on "
                "an external code system: it cannot be expanded here "
                "(use $validate-code for one code)",
                "url",
            )
        )
    text_filter = (params.text("filter") or "").casefold()
    rows = []
    for system, code in sorted(members):
        display = _display(terminology, resource, system, code)
        if text_filter and text_filter not in f"{code} {display or ''}".casefold():
            continue
        rows.append({"system": system, "code": code, **({"display": display} if display else {})})
    offset = params.one("offset") or 0
    count = params.one("count")
    page = rows[offset : offset + count if count is not None else None]
    expansion: dict[str, Any] = {
        # Same ValueSet version and parameters -> same identifier: the expansion is a function
        # of them alone.
        "identifier": "urn:uuid:"
        + str(
            uuid.uuid5(
                uuid.NAMESPACE_URL,
                f"{resource['url']}|{resource.get('version', '')}|{text_filter}|{offset}|{count}",
            )
        ),
        "timestamp": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "total": len(rows),
    }
    if offset or count is not None:
        expansion["offset"] = offset
    used = [
        {"name": n, ("valueInteger" if isinstance(v, int) else "valueString"): v}
        for n, v in (("filter", params.text("filter")), ("offset", offset), ("count", count))
        if v is not None and (n != "offset" or offset or count is not None)
    ]
    if used:
        expansion["parameter"] = used
    if page:
        expansion["contains"] = page
    out = {k: v for k, v in resource.items() if k not in ("compose", "text")}
    out["expansion"] = expansion
    return out


def _display(
    terminology: Terminology, value_set: dict[str, Any], system: str, code: str
) -> str | None:
    """A member's display: the ValueSet's own (for concepts it lists), else the CodeSystem's."""
    for include in value_set.get("compose", {}).get("include", []):
        if include.get("system") != system:
            continue
        for concept in include.get("concept", []):
            if concept.get("code") == code and concept.get("display"):
                return str(concept["display"])
    return terminology.display(system, code) or None


# ---------------------------------------------------------------------------------- $validate-code


def _codings(params: Params, where: str = "code") -> list[tuple[str | None, str, str | None, str]]:
    """The (system, code, display, expression) the caller asks about: ``code`` (+ ``system``,
    ``display``), ``coding``, or every coding of ``codeableConcept`` — exactly one of them."""
    given: list[str] = [n for n in ("code", "coding", "codeableConcept") if n in params.values]
    if len(given) != 1:
        raise BadRequest(
            issue(
                "required" if not given else "invalid",
                "send exactly one of code (with system), coding or codeableConcept",
                *(given or [where]),
            )
        )
    if given[0] == "code":
        return [(params.text("system"), params.text("code") or "", params.text("display"), "code")]
    if given[0] == "coding":
        coding = params.one("coding")
        return [_coding(coding, "coding")]
    concept = params.one("codeableConcept")
    codings = concept.get("coding") if isinstance(concept.get("coding"), list) else []
    if not codings:
        raise BadRequest(issue("required", "codeableConcept has no coding", "codeableConcept"))
    return [_coding(c, f"codeableConcept.coding[{i}]") for i, c in enumerate(codings)]


def _coding(coding: Any, where: str) -> tuple[str | None, str, str | None, str]:
    if not isinstance(coding, dict) or not isinstance(coding.get("code"), str):
        raise BadRequest(issue("required", f"{where} needs a code", where))
    system = coding.get("system")
    display = coding.get("display")
    return (
        system if isinstance(system, str) else None,
        coding["code"],
        display if isinstance(display, str) else None,
        where,
    )


def validate_code(params: Params, instance: dict[str, Any] | None = None) -> dict[str, Any]:
    """``result`` true when a coding is a member of the ValueSet (with ``display``); false
    with a ``message`` saying why. A code without ``system`` is checked only when exactly one
    system of the ValueSet has it. A display that differs from ours makes the result false (the
    display is the meaning the sender read)."""
    resource = _value_set(params, instance)
    terminology = load_terminology()
    members = terminology.value_sets.get(resource["url"])
    criterion = _criterion(resource["url"]) if members is None else None
    messages: list[str] = []
    for system, code, display, _ in _codings(params):
        if system is None and members is not None:
            systems = sorted({s for s, c in members if c == code})
            if len(systems) != 1:
                messages.append(
                    f"code '{safe_code(code)}' without a system is "
                    + ("ambiguous" if systems else "not in")
                    + f" ValueSet {resource['url']}"
                )
                continue
            system = systems[0]
        if system is None:
            messages.append(f"code '{safe_code(code)}' needs a system")
            continue
        if members is not None:
            member = (system, code) in members
        else:
            member = criterion is not None and criterion.contains(system, code)
        if not member:
            why = (
                " (a SNOMED CT descendant of an is-a root needs a terminology server)"
                if criterion is not None
                else ""
            )
            messages.append(
                f"code '{safe_code(code)}' of {system} is not in ValueSet {resource['url']}{why}"
            )
            continue
        ours = _display(terminology, resource, system, code)
        if display is not None and ours is not None and display != ours:
            messages.append(f"display for '{safe_code(code)}' should be '{ours}', not the one sent")
            continue
        out = [{"name": "result", "valueBoolean": True}]
        if ours:
            out.append({"name": "display", "valueString": ours})
        return {"resourceType": "Parameters", "parameter": out}
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "result", "valueBoolean": False},
            {"name": "message", "valueString": "; ".join(messages)},
        ],
    }


# ---------------------------------------------------------------------------------- $lookup


def lookup(params: Params, instance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Name, version, display, definition and designations of a code of one of our
    CodeSystems; an unknown code or system is a 404 naming it."""
    if "coding" in params.values and "code" in params.values:
        raise BadRequest(issue("invalid", "send code (with system) or coding, not both", "code"))
    if "coding" in params.values:
        system, code, _, where = _coding(params.one("coding"), "coding")
    else:
        system, where = params.text("system"), "code"
        sent = params.text("code")
        if sent is None:
            raise BadRequest(issue("required", "send code (with system) or coding", "code"))
        code = sent
    if instance is not None:
        if system is not None and system != instance["url"]:
            raise BadRequest(issue("invalid", "system names another CodeSystem", "system"))
        system = instance["url"]
    if system is None:
        raise BadRequest(issue("required", "name the CodeSystem: system", "system"))
    resource = next(
        (r for r in _all_resources() if r["resourceType"] == "CodeSystem" and r["url"] == system),
        None,
    )
    if resource is None:
        raise NotFound(issue("not-found", f"CodeSystem {system} is not one of ours", "system"))
    _check_version(resource, params.text("version"), "version")
    concept = _find_concept(resource.get("concept", []), code)
    if concept is None:
        raise NotFound(
            issue("code-invalid", f"code '{safe_code(code)}' is not in CodeSystem {system}", where)
        )
    out: list[dict[str, Any]] = [{"name": "name", "valueString": resource.get("name", "")}]
    if resource.get("version"):
        out.append({"name": "version", "valueString": str(resource["version"])})
    if concept.get("display"):
        out.append({"name": "display", "valueString": concept["display"]})
    if concept.get("definition"):
        out.append({"name": "definition", "valueString": concept["definition"]})
    for designation in concept.get("designation", []):
        parts = [{"name": "value", "valueString": designation.get("value", "")}]
        if designation.get("language"):
            parts.insert(0, {"name": "language", "valueCode": designation["language"]})
        if designation.get("use"):
            parts.insert(0, {"name": "use", "valueCoding": designation["use"]})
        out.append({"name": "designation", "part": parts})
    wanted = set(params.values.get("property", []))
    for prop in concept.get("property", []):
        if wanted and prop.get("code") not in wanted:
            continue
        value = {k: v for k, v in prop.items() if k.startswith("value")}
        out.append(
            {
                "name": "property",
                "part": [{"name": "code", "valueCode": prop["code"]}, {"name": "value", **value}],
            }
        )
    return {"resourceType": "Parameters", "parameter": out}


def _find_concept(concepts: list[dict[str, Any]], code: str) -> dict[str, Any] | None:
    for concept in concepts:
        if concept.get("code") == code:
            return concept
        nested = _find_concept(concept.get("concept", []), code)
        if nested is not None:
            return nested
    return None


# ---------------------------------------------------------------------------------- $translate


def translate(params: Params, instance: dict[str, Any] | None = None) -> dict[str, Any]:
    """The targets a ConceptMap of ours gives a source coding: ``result`` true with one
    ``match`` per target (equivalence and concept), or false with the map's own comment on why
    the code deliberately has none. Only forward translation: ``reverse`` is refused."""
    if params.one("reverse"):
        raise BadRequest(issue("not-supported", "reverse translation is not supported", "reverse"))
    terminology = load_terminology()
    resource = _concept_map(terminology, params, instance)
    table = terminology.maps[resource["url"]]
    source = params.text("source")
    if source is not None and source != table.source_value_set:
        raise NotFound(
            issue("not-found", f"ConceptMap {resource['url']} does not map from {source}", "source")
        )
    target = params.text("target")
    target_vs = resource.get("targetUri") or resource.get("targetCanonical")
    if target is not None and target != target_vs:
        raise NotFound(
            issue("not-found", f"ConceptMap {resource['url']} does not map to {target}", "target")
        )
    wanted_system = params.text("targetsystem")
    matches: list[dict[str, Any]] = []
    messages: list[str] = []
    for system, code, _, _where in _codings(params):
        if system is None:
            if len(table.source_systems) != 1:
                raise BadRequest(issue("required", "name the source system", "system"))
            system = table.source_systems[0]
        if system not in table.source_systems:
            messages.append(f"ConceptMap {resource['url']} does not map from {system}")
            continue
        found = explained = False
        for group in resource["group"]:
            if group["source"] != system:
                continue
            if wanted_system is not None and group["target"] != wanted_system:
                continue
            for element in group["element"]:
                if element["code"] != code:
                    continue
                for t in element.get("target", []):
                    if "code" not in t or t.get("equivalence") in ("unmatched", "disjoint"):
                        messages.append(
                            f"code '{safe_code(code)}' has no target in {resource['url']}"
                            + (f": {t['comment']}" if t.get("comment") else "")
                        )
                        explained = True
                        continue
                    found = True
                    concept = {"system": group["target"], "code": t["code"]}
                    if t.get("display"):
                        concept["display"] = t["display"]
                    matches.append(
                        {
                            "name": "match",
                            "part": [
                                {"name": "equivalence", "valueCode": t.get("equivalence", "")},
                                {"name": "concept", "valueCoding": concept},
                                {"name": "source", "valueUri": resource["url"]},
                            ],
                        }
                    )
        if not found and not explained:
            messages.append(f"code '{safe_code(code)}' has no mapping in {resource['url']}")
    out: list[dict[str, Any]] = [{"name": "result", "valueBoolean": bool(matches)}]
    if not matches:
        out.append({"name": "message", "valueString": "; ".join(messages)})
    return {"resourceType": "Parameters", "parameter": out + matches}


def _concept_map(
    terminology: Terminology, params: Params, instance: dict[str, Any] | None
) -> dict[str, Any]:
    url = params.text("url")
    if instance is not None:
        if url is not None and _split_canonical(url)[0] != instance["url"]:
            raise BadRequest(issue("invalid", "url names another ConceptMap than the id", "url"))
        resource = instance
    else:
        if url is None:
            # A map chosen by source and target alone would be a guess between maps: name it.
            raise BadRequest(issue("required", "name the ConceptMap: url", "url"))
        base, version = _split_canonical(url)
        found = _resource(terminology, "ConceptMap", base)
        if found is None:
            raise NotFound(issue("not-found", f"ConceptMap {base} is not one of ours", "url"))
        _check_version(found, version, "url")
        resource = found
    _check_version(resource, params.text("conceptMapVersion"), "conceptMapVersion")
    return resource


__all__ = [
    "SIGNATURES",
    "Params",
    "expand",
    "lookup",
    "params_from_body",
    "params_from_query",
    "resource_by_id",
    "translate",
    "validate_code",
]
