"""The mapping engine.

A mapping file describes one target resource (or one per item of a list with ``repeat``)::

    version: 1
    resourceType: Condition
    repeat: diagnoses                 # optional: one resource per item; ``item.*`` paths
    when: {$path: reason}             # optional: only when truthy
    id: [Condition, {$path: source_id}, {$path: item.code}]   # uuid5 of these parts
    resource:                         # a template: plain values are constants
      subject: {$ref: Patient}
      code: {coding: {$map: {map: kat-diagnosis-to-snomed, code: {$path: item.code}}}}

The operations are a closed set — ``$path``, ``$const``, ``$fn`` (a registered function),
``$map`` (ConceptMap lookup), ``$cs`` (a code of one of our CodeSystems, display included),
``$ref`` (reference to another target's deterministic id), ``$each`` (repeat over a list) and
``$if`` (condition). Empty values (None, "", [], {}) are dropped, so no output ever carries an
empty element. An unmapped code is recorded as an issue naming the code's field and the
ConceptMap; all issues of an artifact are raised together.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from fhir_kat.artifacts import SCHEMAS, load_artifact
from fhir_kat.clinical.protocol import ProgramProtocol
from fhir_kat.errors import Issue, Unprocessable, issue
from fhir_kat.mapping import functions
from fhir_kat.terminology import UnmappedCode, load_terminology, safe_code

ROOT = Path(__file__).resolve().parents[2] / "mappings"
#: Namespace of every deterministic id (uuid5); changing it changes every id: never do that.
NAMESPACE = uuid.UUID("6f1d3c52-7a0e-5b8e-9d4e-6b6174000001")
OPS = ("$path", "$const", "$fn", "$map", "$cs", "$ref", "$each", "$if")
BASE = "https://fhir-kat.example.org/fhir"
_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
#: The codes the engine itself writes (into each Provenance).
ACTIVITY = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
    "code": "CREATE",
    "display": "create",
}
AUTHOR = {"system": _PARTICIPANT, "code": "author", "display": "Author"}
ASSEMBLER = {"system": _PARTICIPANT, "code": "assembler", "display": "Assembler"}
ENGINE_CODES = (ACTIVITY, AUTHOR, ASSEMBLER)


@dataclass(frozen=True)
class MappingContext:
    now: datetime
    submitter: str
    protocol: ProgramProtocol


@dataclass(frozen=True)
class Target:
    name: str  # file stem, e.g. "Condition-diagnosis"
    file: str  # "mappings/referrals/Condition-diagnosis.yaml"
    version: int
    resource_type: str
    id_parts: tuple[Any, ...]
    repeat: Any  # a list's field path, or an operation producing a list (e.g. $fn)
    when: Any
    template: Any


@dataclass
class _Env:
    kind: str
    artifact: Mapping[str, Any]
    ctx: MappingContext
    ids: dict[str, list[str]]
    issues: list[Issue] = field(default_factory=list)
    item: Any = None
    item_path: str = ""
    index: int = 0


@cache
def targets(kind: str) -> tuple[Target, ...]:
    folder = ROOT / kind
    out = []
    for path in sorted(folder.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        out.append(
            Target(
                name=path.stem,
                file=f"mappings/{kind}/{path.name}",
                version=int(spec["version"]),
                resource_type=spec["resourceType"],
                id_parts=tuple(spec["id"]),
                repeat=spec.get("repeat"),
                when=spec.get("when"),
                template=spec["resource"],
            )
        )
    return tuple(out)


def mapping_versions() -> dict[str, int]:
    return {t.file: t.version for kind in SCHEMAS for t in targets(kind)}


def map_artifact(kind: str, payload: Mapping[str, Any], ctx: MappingContext) -> dict[str, Any]:
    """The FHIR transaction Bundle an artifact becomes (PUT entries with deterministic ids)."""
    if kind not in SCHEMAS:
        raise Unprocessable(issue("not-supported", f"unknown artifact kind {kind}", "kind"))
    artifact = load_artifact(kind, dict(payload))
    problems = functions.clinical_checks(kind, artifact, ctx.protocol)
    env = _Env(kind, artifact, ctx, {})
    plan = [(t, items) for t in targets(kind) for items in [_instances(t, env)] if items]
    for target, items in plan:
        env.ids[target.name] = [_id(target, env, item, i) for i, item in items]
    entries = []
    for target, items in plan:
        for (i, item), rid in zip(items, env.ids[target.name], strict=True):
            _bind(env, target, item, i)
            resource = {"resourceType": target.resource_type, "id": rid}
            body = _prune(_eval(target.template, env))
            if isinstance(body, dict):
                resource.update(body)
            entries.append(resource)
    problems += env.issues
    entries = _dedupe(entries, problems)
    if problems:
        raise Unprocessable(problems)
    entries.append(_provenance(kind, artifact, entries, ctx, [t for t, _ in plan]))
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{r['id']}",
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in entries
        ],
    }


def _dedupe(entries: list[dict[str, Any]], problems: list[Issue]) -> list[dict[str, Any]]:
    """Two targets may describe the same resource (the administering clinician who is also the
    overriding one): identical copies merge; differing ones are a conflict in the artifact."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    out = []
    for resource in entries:
        key = (resource["resourceType"], resource["id"])
        if key in seen:
            if seen[key] != resource:
                problems.append(
                    issue(
                        "business-rule", f"two different {key[0]} records share one identifier", "$"
                    )
                )
            continue
        seen[key] = resource
        out.append(resource)
    return out


def _instances(target: Target, env: _Env) -> list[tuple[int, Any]]:
    if target.repeat:
        if isinstance(target.repeat, str):
            items = _lookup(env.artifact, target.repeat)
        else:
            _bind(env, target, None, 0)
            items = _eval(target.repeat, env)
        candidates = list(enumerate(items or []))
    else:
        candidates = [(0, None)]
    out = []
    for i, item in candidates:
        _bind(env, target, item, i)
        if target.when is None or _truthy(_eval(target.when, env)):
            out.append((i, item))
    return out


def _bind(env: _Env, target: Target, item: Any, index: int) -> None:
    env.item = item
    env.index = index
    env.item_path = f"{target.repeat}[{index}]" if isinstance(target.repeat, str) else ""


def deterministic_id(*parts: Any) -> str:
    """uuid5 of business identifiers: the same artifact always yields the same ids."""
    return str(uuid.uuid5(NAMESPACE, "|".join(str(p) for p in parts)))


def _id(target: Target, env: _Env, item: Any, index: int) -> str:
    _bind(env, target, item, index)
    return deterministic_id(*[_eval(p, env) for p in target.id_parts])


def _truthy(value: Any) -> bool:
    return value not in (None, False, "", [], {})


def _lookup(data: Any, path: str) -> Any:
    node = data
    for part in path.split("."):
        if isinstance(node, Mapping):
            node = node.get(part)
        else:
            return None
    return node


def _path(env: _Env, path: str) -> Any:
    if path == "item":
        return env.item
    if path.startswith("item."):
        return _lookup(env.item, path[5:])
    if path == "$index":
        return env.index
    return _lookup(env.artifact, path)


def _field_path(env: _Env, path: str) -> str:
    """Where a value came from, in the artifact's error-path convention."""
    if path.startswith("item.") and env.item_path:
        return f"{env.item_path}.{path[5:]}"
    return path


def _fhir(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return value


def _eval(node: Any, env: _Env) -> Any:
    if isinstance(node, list):
        out = []
        for child in node:
            value = _eval(child, env)
            if (
                isinstance(child, dict)
                and child.keys() & {"$each", "$ref", "$map"}
                and isinstance(value, list)
            ):
                out.extend(value)  # a list-valued op splices into the surrounding list
            else:
                out.append(value)
        return out
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        ((key, arg),) = node.items()
        if key.startswith("$"):
            return _op(key, arg, env)
    return {key: _eval(value, env) for key, value in node.items()}


def _op(op: str, arg: Any, env: _Env) -> Any:
    if op == "$path":
        return _fhir(_path(env, arg))
    if op == "$const":
        return arg
    if op == "$fn":
        ((name, args),) = arg.items()
        values = [_eval(a, env) for a in (args if isinstance(args, list) else [args])]
        return functions.REGISTRY[name](env.ctx, *values)
    if op == "$map":
        code = _eval(arg["code"], env)
        if code is None:
            return None
        try:
            codings = load_terminology().translate(
                arg["map"], str(code), optional=arg.get("optional", False)
            )
        except UnmappedCode as exc:
            where = arg["code"].get("$path", "") if isinstance(arg["code"], dict) else ""
            env.issues.append(issue("code-invalid", str(exc), _field_path(env, where)))
            return None
        if arg.get("as") == "code":
            return codings[0]["code"] if codings else None
        return [dict(c) for c in codings]
    if op == "$cs":
        system = f"{BASE}/CodeSystem/{arg['system']}"
        code = _eval(arg["code"], env)
        if code is None:
            return None
        display = load_terminology().display(system, str(code))
        if display is None:
            where = arg["code"].get("$path", "") if isinstance(arg["code"], dict) else ""
            env.issues.append(
                issue(
                    "code-invalid",
                    f"code '{safe_code(str(code))}' is not in CodeSystem {system}",
                    _field_path(env, where),
                )
            )
            return None
        return {"system": system, "code": code, "display": display}
    if op == "$ref":
        name, many = (arg[:-3], True) if arg.endswith("[*]") else (arg, False)
        rtype = next(t.resource_type for t in targets(env.kind) if t.name == name)
        # A target whose ``when`` was false has no ids: the reference is simply absent.
        refs = [{"reference": f"{rtype}/{i}"} for i in env.ids.get(name, [])]
        if many:
            return refs
        return refs[0] if refs else None
    if op == "$each":
        items = _path(env, arg["in"]) or []
        saved = (env.item, env.item_path, env.index)
        out = []
        for i, item in enumerate(items):
            env.item, env.item_path, env.index = item, f"{_field_path(env, arg['in'])}[{i}]", i
            out.append(_eval(arg["do"], env))
        env.item, env.item_path, env.index = saved
        return out
    if op == "$if":
        branch = arg["then"] if _truthy(_eval(arg["test"], env)) else arg.get("else")
        return _eval(branch, env) if branch is not None else None
    raise ValueError(f"unknown mapping operation {op}")


def _prune(value: Any) -> Any:
    if isinstance(value, dict):
        pruned = {k: _prune(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in (None, "", [], {})}
    if isinstance(value, list):
        items = [_prune(v) for v in value]
        return [v for v in items if v not in (None, "", [], {})]
    return value


def _provenance(
    kind: str,
    artifact: Mapping[str, Any],
    resources: list[dict[str, Any]],
    ctx: MappingContext,
    used: list[Target],
) -> dict[str, Any]:
    """One Provenance per mapped artifact: what it produced, from which mapping versions, for
    which submitting client (FHIR-Converter's habit)."""
    source = str(artifact["source_id"])
    return {
        "resourceType": "Provenance",
        "id": str(uuid.uuid5(NAMESPACE, f"Provenance|{kind}|{source}")),
        "target": [{"reference": f"{r['resourceType']}/{r['id']}"} for r in resources],
        "recorded": ctx.now.isoformat(),
        "activity": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                    "code": "CREATE",
                    "display": "create",
                }
            ]
        },
        "agent": [
            {
                "type": {"coding": [dict(AUTHOR)]},
                "who": {"identifier": {"system": "urn:fhir-kat:client-id", "value": ctx.submitter}},
            },
            {
                "type": {"coding": [dict(ASSEMBLER)]},
                "who": {"display": "fhir_kat mapping engine"},
            },
        ],
        "entity": [
            {
                "role": "source",
                "what": {"identifier": {"system": f"{BASE}/sid/{kind}", "value": source}},
            }
        ],
        "policy": sorted({f"{BASE}/{t.file}#v{t.version}" for t in used}),
    }


# ---------------------------------------------------------------------------- lint


def lint_mappings(root: Path | None = None) -> list[Issue]:
    """Check every mapping file: version, target type, source fields against the artifact
    schema, ConceptMaps and CodeSystems, references to targets, registered functions."""
    from fhir.resources.R4B import get_fhir_model_class

    folder = root or ROOT
    problems: list[Issue] = []
    term = load_terminology()
    for kind, schema in SCHEMAS.items():
        files = sorted((folder / kind).glob("*.yaml"))
        if not files:
            problems.append(issue("required", f"no mapping files for {kind}", f"mappings/{kind}"))
        names = {p.stem for p in files}
        for path in files:
            where = f"mappings/{kind}/{path.name}"
            try:
                spec = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError:
                problems.append(issue("structure", "not valid YAML", where))
                continue
            for key in ("version", "resourceType", "id", "resource"):
                if key not in spec:
                    problems.append(issue("required", f"missing '{key}'", where))
            try:
                get_fhir_model_class(spec.get("resourceType", ""))
            except (KeyError, ValueError, AttributeError):
                problems.append(
                    issue("value", "unknown FHIR resource type", f"{where}#resourceType")
                )
            repeat = spec.get("repeat")
            for op, arg in _ops(spec):
                if op == "$path":
                    base = arg
                    if arg.startswith("item."):
                        if not repeat:
                            problems.append(issue("value", f"'{arg}' outside a repeat", where))
                            continue
                        if not isinstance(repeat, str):
                            continue  # items built by a registered function
                        base = f"{repeat}.{arg[5:]}"
                    if arg not in ("item", "$index") and not _schema_has(schema, base):
                        problems.append(issue("value", f"unknown source field '{arg}'", where))
                elif op == "$map" and f"{BASE}/ConceptMap/{arg['map']}" not in term.concept_maps:
                    problems.append(issue("not-found", f"no ConceptMap {arg['map']}", where))
                elif op == "$cs" and f"{BASE}/CodeSystem/{arg['system']}" not in term.code_systems:
                    problems.append(issue("not-found", f"no CodeSystem {arg['system']}", where))
                elif op == "$ref" and arg.removesuffix("[*]") not in names:
                    problems.append(issue("not-found", f"no target '{arg}' in {kind}", where))
                elif op == "$fn":
                    ((name, _),) = arg.items()
                    if name not in functions.REGISTRY:
                        problems.append(issue("not-found", f"no registered function {name}", where))
                elif op not in OPS:
                    problems.append(issue("not-supported", f"unknown operation {op}", where))
    return problems


def _ops(node: Any) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        if len(node) == 1:
            ((key, arg),) = node.items()
            if key.startswith("$"):
                found.append((key, arg))
        for value in node.values():
            found += _ops(value)
    elif isinstance(node, list):
        for value in node:
            found += _ops(value)
    return found


def _schema_has(schema: Any, path: str) -> bool:
    from marshmallow import fields as mfields

    current: Any = schema
    for part in path.split("."):
        declared = current._declared_fields
        if part not in declared:
            return False
        f = declared[part]
        if isinstance(f, mfields.List):
            f = f.inner
        current = type(f.schema) if isinstance(f, mfields.Nested) else None
        if current is None:
            return part == path.split(".")[-1]
    return True


Function = Callable[..., Any]
