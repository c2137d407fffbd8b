"""The program's profiles (``mappings/profiles/*.yaml``, ADR 0022): which of them a resource
falls under, whether it conforms, and each one as a FHIR StructureDefinition.

Owns: loading the profile files (a closed set of constraints: ``min``, ``max``, ``fixed``,
``pattern``, ``binding`` to one of our ValueSets), ``select`` (the profile the service declares
on what it writes: the first whose ``applies`` patterns the resource matches), ``check`` (one
``Issue`` per violation, naming the profile and the element), ``declare`` (add the selected
profile to ``meta.profile`` when the resource conforms) and ``structure_definition`` (the
differential; with the R4 base definition, the snapshot too).

Must not: store, call HTTP or import flask. It does not guess: a resource matching no
profile is left as it is, and one that declares a profile of ours is held to it exactly.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from fhir_kat.canonical import read_definition
from fhir_kat.errors import Issue, issue
from fhir_kat.terminology import BASE, load_terminology, safe_code

FOLDER = Path(__file__).resolve().parents[2] / "mappings" / "profiles"
#: Where our StructureDefinitions live: ``<canonical base>/StructureDefinition/<id>``.
SD_BASE = f"{BASE}/StructureDefinition"
CORE = "http://hl7.org/fhir/StructureDefinition"
_KEYS = {"min", "max", "fixed", "pattern", "binding", "short", "slice"}
_TOP = {"id", "version", "type", "title", "description", "applies", "elements"}
_STRENGTHS = ("required", "extensible", "preferred", "example")
# Primitive FHIR types a ``fixed`` value of ours may have, by Python type.
_FIXED_TYPES = {bool: "Boolean", int: "Integer", str: "Code"}


class ProfileError(ValueError):
    """A profile file this module cannot interpret (a packaging error)."""


@dataclass(frozen=True)
class Constraint:
    path: str
    min: int | None = None
    max: str | None = None
    fixed: Any = None
    pattern: Any = None
    binding: Mapping[str, str] | None = None
    short: str | None = None
    #: A repeating element's pattern as a named slice: at least ``min`` repetitions contain
    #: the pattern, the others may be anything (a pattern without a slice binds every one).
    slice: str | None = None


@dataclass(frozen=True)
class Profile:
    id: str
    version: str
    type: str
    title: str
    description: str
    applies: tuple[tuple[str, Any], ...]
    constraints: tuple[Constraint, ...]
    file: str

    @property
    def url(self) -> str:
        return f"{SD_BASE}/{self.id}"

    def matches(self, resource: Mapping[str, Any]) -> bool:
        """Does the resource fall under this profile (its ``applies`` patterns)?"""
        if resource.get("resourceType") != self.type:
            return False
        return all(
            any(_contains(v, pattern) for v in values_at(resource, path))
            for path, pattern in self.applies
        )

    def check(self, resource: Mapping[str, Any]) -> list[Issue]:
        """Every violation of this profile, one issue each, naming profile and element."""
        if resource.get("resourceType") != self.type:
            return [
                issue(
                    "structure",
                    f"profile {self.id} is for {self.type}, not {resource.get('resourceType')}",
                    "resourceType",
                )
            ]
        problems: list[Issue] = []
        for c in self.constraints:
            problems += self._check_one(resource, c)
        return problems

    def _check_one(self, resource: Mapping[str, Any], c: Constraint) -> list[Issue]:
        out: list[Issue] = []
        parent_path, _, leaf = c.path.rpartition(".")
        for parent, where in _instances(resource, parent_path):
            values = _children(parent, leaf)
            at = f"{where}.{leaf}"
            if c.slice is not None:
                matching = [v for v in values if _contains(v, c.pattern)]
                if len(matching) < (c.min or 0):
                    out.append(
                        self._issue(
                            "required",
                            f"{c.path} needs a repetition containing {json.dumps(c.pattern)} "
                            f"(slice {c.slice})",
                            at,
                        )
                    )
                continue
            if c.min is not None and len(values) < c.min:
                out.append(self._issue("required", f"{c.path} is required (min {c.min})", at))
            if c.max is not None and c.max != "*" and len(values) > int(c.max):
                out.append(self._issue("structure", f"{c.path} allows at most {c.max}", at))
            for value in values:
                if c.fixed is not None and value != c.fixed:
                    out.append(self._issue("value", f"{c.path} must be {c.fixed!r}", at))
                if c.pattern is not None and not _contains(value, c.pattern):
                    out.append(
                        self._issue("value", f"{c.path} must contain {json.dumps(c.pattern)}", at)
                    )
                if c.binding is not None and c.binding["strength"] == "required":
                    out += self._check_binding(value, c, at)
        return out

    def _check_binding(self, value: Any, c: Constraint, at: str) -> list[Issue]:
        assert c.binding is not None
        vs = c.binding["valueSet"]
        terminology = load_terminology()
        codings = (
            [(None, value)]
            if isinstance(value, str)
            else [
                (cd.get("system"), cd.get("code"))
                for cd in (value.get("coding", []) if isinstance(value, dict) else [])
                if isinstance(cd, dict)
            ]
        )
        if any(
            isinstance(code, str) and terminology.validate_code(vs, system, code)
            for system, code in codings
        ):
            return []
        shown = ", ".join(safe_code(str(code)) for _, code in codings) or "no code"
        return [self._issue("code-invalid", f"{c.path} ({shown}) is not in ValueSet {vs}", at)]

    def _issue(self, code: str, text: str, at: str) -> Issue:
        return issue(code, f"profile {self.id}: {text}", at)


# ---------------------------------------------------------------------------------- paths


def values_at(resource: Mapping[str, Any], path: str) -> list[Any]:
    """The values at an element path (``Observation.category.coding``), lists flattened."""
    parts = path.split(".")[1:]
    current: list[Any] = [resource]
    for part in parts:
        current = [v for node in current for v in _children(node, part)]
    return current


def _instances(resource: Mapping[str, Any], path: str) -> Iterator[tuple[Any, str]]:
    """Each instance of the element at ``path`` with a FHIRPath-like location."""
    parts = path.split(".")
    current: list[tuple[Any, str]] = [(resource, parts[0])]
    for part in parts[1:]:
        found: list[tuple[Any, str]] = []
        for node, where in current:
            values = _children(node, part)
            name = part.replace("[x]", "")
            found += [
                (v, f"{where}.{name}[{i}]" if len(values) > 1 else f"{where}.{name}")
                for i, v in enumerate(values)
            ]
        current = found
    yield from current


def _children(node: Any, name: str) -> list[Any]:
    if not isinstance(node, dict):
        return []
    if name.endswith("[x]"):
        stem = name[:-3]
        keys = [k for k in node if k.startswith(stem) and k[len(stem) : len(stem) + 1].isupper()]
        values = [node[k] for k in keys]
    else:
        values = [node[name]] if name in node else []
    flat: list[Any] = []
    for v in values:
        flat += v if isinstance(v, list) else [v]
    return flat


def _contains(value: Any, pattern: Any) -> bool:
    """FHIR pattern matching: every element of the pattern is in the value (a list in the
    pattern: each of its items matches some item of the value)."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(
            k in value and _contains(value[k], p) for k, p in pattern.items()
        )
    if isinstance(pattern, list):
        items = value if isinstance(value, list) else [value]
        return all(any(_contains(v, p) for v in items) for p in pattern)
    return bool(value == pattern)


# ---------------------------------------------------------------------------------- loading


@cache
def load_profiles(folder: Path = FOLDER) -> tuple[Profile, ...]:
    """Every profile of ``folder``, in file order, checked for what this module interprets."""
    found: list[Profile] = []
    for path in sorted(folder.glob("*.yaml")):
        spec = yaml.safe_load(read_definition(path))
        found.append(_profile(spec, path.name))
    ids = [p.id for p in found]
    if len(set(ids)) != len(ids):
        raise ProfileError(f"duplicate profile ids in {folder}")
    return tuple(found)


def _profile(spec: Any, name: str) -> Profile:
    if not isinstance(spec, dict) or set(spec) - _TOP or not _TOP - {"applies"} <= set(spec):
        raise ProfileError(f"{name}: needs exactly {sorted(_TOP)}")
    if f"{spec['id']}.yaml" != name:
        raise ProfileError(f"{name}: id {spec['id']} must be the file name")
    rtype = spec["type"]
    constraints = []
    for path, rules in spec["elements"].items():
        if not str(path).startswith(f"{rtype}.") or not isinstance(rules, dict):
            raise ProfileError(f"{name}: {path} is not an element of {rtype}")
        if set(rules) - _KEYS:
            raise ProfileError(f"{name}: {path}: unknown {sorted(set(rules) - _KEYS)}")
        binding = rules.get("binding")
        if binding is not None:
            if binding.get("strength") not in _STRENGTHS:
                raise ProfileError(f"{name}: {path}: binding strength")
            if binding["valueSet"] not in load_terminology().value_sets:
                raise ProfileError(f"{name}: {path}: {binding['valueSet']} is not ours")
        constraints.append(
            Constraint(
                path=path,
                min=rules.get("min"),
                max=str(rules["max"]) if "max" in rules else None,
                fixed=rules.get("fixed"),
                pattern=rules.get("pattern"),
                binding=binding,
                short=rules.get("short"),
                slice=rules.get("slice"),
            )
        )
        if constraints[-1].slice is not None and constraints[-1].pattern is None:
            raise ProfileError(f"{name}: {path}: a slice needs a pattern")
    return Profile(
        id=spec["id"],
        version=str(spec["version"]),
        type=rtype,
        title=spec["title"],
        description=spec["description"],
        applies=tuple((spec.get("applies") or {}).items()),
        constraints=tuple(constraints),
        file=name,
    )


def by_url() -> dict[str, Profile]:
    return {p.url: p for p in load_profiles()}


def select(resource: Mapping[str, Any]) -> Profile | None:
    """The profile the service declares on this resource when it writes it (None: none)."""
    return next((p for p in load_profiles() if p.matches(resource)), None)


def declared(resource: Mapping[str, Any]) -> list[str]:
    """The profiles of ours the resource declares in ``meta.profile`` (with ``|version``)."""
    meta = resource.get("meta")
    listed = meta.get("profile", []) if isinstance(meta, dict) else []
    return [p for p in listed if isinstance(p, str) and p.startswith(f"{SD_BASE}/")]


def check_declared(resource: Mapping[str, Any]) -> list[Issue]:
    """Every violation of every profile of ours the resource declares; an unknown one is a
    problem too (a profile we do not publish cannot be claimed)."""
    known = by_url()
    problems: list[Issue] = []
    for claimed in declared(resource):
        url, _, version = claimed.partition("|")
        profile = known.get(url)
        if profile is None:
            problems.append(issue("not-found", f"profile {url} is not one of ours", "meta.profile"))
        elif version and version != profile.version:
            problems.append(
                issue("not-found", f"profile {url} has no version {version}", "meta.profile")
            )
        else:
            problems += profile.check(resource)
    return problems


def declare(resource: dict[str, Any]) -> Profile | None:
    """Add the selected profile to ``meta.profile`` when the resource conforms to it (and
    declares none of ours yet). A resource that falls under a profile but does not conform is
    left undeclared: what the service accepts is not narrowed here (outbound never vetoes
    inbound), and ``tests/test_profiles.py`` holds every resource the service itself writes to
    its profile."""
    profile = select(resource)
    if profile is None or declared(resource) or profile.check(resource):
        return None
    meta = resource.setdefault("meta", {})
    profiles = [p for p in meta.get("profile", []) if p != profile.url]
    meta["profile"] = [*profiles, profile.url]
    return profile


# ------------------------------------------------------------------ StructureDefinition


def structure_definition(
    profile: Profile, base: Mapping[str, Any] | None = None, *, date: str | None = None
) -> dict[str, Any]:
    """The profile as an R4 StructureDefinition: the differential always; the snapshot too
    when ``base`` (the R4 StructureDefinition of ``profile.type``) is given."""
    differential = [e for c in profile.constraints for e in _elements(c)]
    sd: dict[str, Any] = {
        "resourceType": "StructureDefinition",
        "id": profile.id,
        "url": profile.url,
        "version": profile.version,
        "name": "".join(part.title() for part in re.split(r"[-_]", profile.id)),
        "title": profile.title,
        "status": "active",
        "publisher": "fhir_kat",
        "description": profile.description.strip(),
        "fhirVersion": "4.0.1",
        "kind": "resource",
        "abstract": False,
        "type": profile.type,
        "baseDefinition": f"{CORE}/{profile.type}",
        "derivation": "constraint",
        "differential": {"element": differential},
    }
    if date:
        sd["date"] = date
    if base is not None:
        sd["snapshot"] = {"element": snapshot(profile, base)}
    return sd


def _elements(c: Constraint) -> list[dict[str, Any]]:
    """The differential elements of one constraint: the element, or — for a slice — the
    sliced element (discriminated by pattern) and the slice."""
    if c.slice is None:
        return [_element(c)]
    sliced = {
        "id": c.path,
        "path": c.path,
        "slicing": {"discriminator": [{"type": "pattern", "path": "$this"}], "rules": "open"},
        "mustSupport": True,
    }
    if c.min is not None:
        sliced["min"] = c.min
    return [sliced, _element(c, slice_name=c.slice)]


def _element(c: Constraint, *, slice_name: str | None = None) -> dict[str, Any]:
    element_id = f"{c.path}:{slice_name}" if slice_name else c.path
    element: dict[str, Any] = {"id": element_id, "path": c.path, "mustSupport": True}
    if slice_name:
        element["sliceName"] = slice_name
        element["max"] = "1"
    if c.short:
        element["short"] = c.short
    if c.min is not None:
        element["min"] = c.min
    if c.max is not None and not slice_name:
        element["max"] = c.max
    if c.fixed is not None:
        element[f"fixed{_fixed_type(c)}"] = c.fixed
    if c.pattern is not None:
        element[f"pattern{_pattern_type(c)}"] = c.pattern
        if c.path.endswith("[x]"):
            # eld-7: a pattern needs one type, so the choice is narrowed to the pattern's.
            element["type"] = [{"code": _pattern_type(c)}]
    if c.binding is not None:
        element["binding"] = {"strength": c.binding["strength"], "valueSet": c.binding["valueSet"]}
    return element


def _fixed_type(c: Constraint) -> str:
    if isinstance(c.fixed, bool):
        return "Boolean"
    if isinstance(c.fixed, str) and c.fixed.startswith(("http://", "https://")):
        return "Canonical" if c.path.endswith(".measure") else "Uri"
    return _FIXED_TYPES[type(c.fixed)]


def _pattern_type(c: Constraint) -> str:
    if isinstance(c.pattern, dict) and "coding" in c.pattern:
        return "CodeableConcept"
    if isinstance(c.pattern, dict) and "system" in c.pattern and "code" in c.pattern:
        return "Coding"
    raise ProfileError(f"{c.path}: a pattern must be a CodeableConcept or a Coding")


def snapshot(profile: Profile, base: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The base definition's snapshot with the profile's constraints applied to the elements
    they name; a slice is inserted after its element's subtree (a copy of the element and its
    children, ids ``<path>:<slice>...``)."""
    elements: list[dict[str, Any]] = copy.deepcopy(base["snapshot"]["element"])
    for c in profile.constraints:
        index = next((i for i, e in enumerate(elements) if e["id"] == c.path), None)
        if index is None:
            raise ProfileError(f"{profile.id}: {c.path} is not an element of {profile.type}")
        constrained = _elements(c)
        _apply(elements[index], constrained[0])
        if c.slice is None:
            continue
        end = index + 1
        while end < len(elements) and elements[end]["id"].startswith(f"{c.path}."):
            end += 1
        subtree = copy.deepcopy(elements[index:end])
        subtree[0].pop("slicing", None)
        for e in subtree:
            e["id"] = f"{c.path}:{c.slice}" + e["id"][len(c.path) :]
        _apply(subtree[0], constrained[1])
        subtree[0]["min"] = c.min or 0
        elements[end:end] = subtree
    return elements


def _apply(target: dict[str, Any], constrained: Mapping[str, Any]) -> None:
    for key, value in constrained.items():
        if key not in ("id", "path"):
            target[key] = value


__all__ = [
    "FOLDER",
    "SD_BASE",
    "Constraint",
    "Profile",
    "ProfileError",
    "by_url",
    "check_declared",
    "declare",
    "declared",
    "load_profiles",
    "select",
    "structure_definition",
    "values_at",
]
