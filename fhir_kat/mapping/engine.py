"""The mapping engine: artifact → FHIR R4 transaction Bundle, driven by ``mappings/<kind>/*.yaml``.

Owns: loading each mapping file once, the interpreter of its closed set of operations, the
deterministic ids, the Provenance of each mapped artifact, and ``lint_mappings``. Must not:
import flask, requests or the store, read the clock (``MappingContext.now``), or produce a value
the mapping files and terminology do not name (no defaults, no pass-through of unknown codes).

A mapping file describes one target resource (or one per item of a list with ``repeat``)::

    version: 1
    resourceType: Condition
    repeat: diagnoses                 # optional: one resource per item; ``item.*`` paths
    when: {$path: reason}             # optional: only when truthy
    id: [Condition, {$path: source_id}, {$path: item.code}]   # uuid5 of these parts
    resource:                         # a template: plain values are constants
      subject: {$ref: Patient}
      code: {coding: {$map: {map: kat-diagnosis-to-snomed, code: {$path: item.code}}}}

The operations (a closed set; lint refuses any other):

- ``$path: a.b`` — a value of the artifact (``item.x`` inside a repeat or ``$each``; ``$index``);
- ``$const: v`` — ``v`` as is (for a value that looks like an operation);
- ``$fn: {name: [args]}`` — a function of ``functions.REGISTRY``;
- ``$map: {map, code, optional?, as?}`` — the target Codings of a ConceptMap of ours;
- ``$cs: {system, code}`` — a Coding of a CodeSystem of ours, display included;
- ``$ref: Target`` / ``$ref: Target[*]`` — reference(s) to another target's deterministic id;
- ``$each: {in, do}`` — ``do`` for each item of a list (spliced into the surrounding list);
- ``$if: {test, then, else?}`` — a condition;
- ``$id: urn`` — this resource's own deterministic id as ``urn:uuid:<id>`` (an Identifier value
  under ``urn:ietf:rfc:3986`` for resources with no natural business identifier, so that every
  resource can be conditionally created at a partner and re-sends match).

Empty values (None, "", [], {}) are dropped, so no output carries an empty element. Every problem
(schema, clinical, terminology) of an artifact is raised together as one ``Unprocessable``.
"""

from __future__ import annotations

import typing
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from fhir_kat.artifacts import MAPPED_SCHEMAS, validate_artifact
from fhir_kat.canonical import read_definition
from fhir_kat.clinical.protocol import ProgramProtocol, load_protocol
from fhir_kat.errors import Issue, Unprocessable, issue
from fhir_kat.instruments.definitions import load_catalogue
from fhir_kat.instruments.scoring import computed_by_service, is_calculated
from fhir_kat.mapping import functions
from fhir_kat.mapping.narrative import narrative
from fhir_kat.profiles import declare
from fhir_kat.terminology import (
    BASE,
    IDENTIFIERS,
    TerminologyError,
    UnmappedCode,
    canonical,
    load_terminology,
    safe_code,
)

ROOT = Path(__file__).resolve().parents[2] / "mappings"
#: Namespace of every deterministic id (uuid5); changing it changes every id: never do that.
NAMESPACE = uuid.UUID("6f1d3c52-7a0e-5b8e-9d4e-6b6174000001")
OPS = ("$path", "$const", "$fn", "$map", "$cs", "$ref", "$each", "$if", "$id")
#: ``$id: urn`` — the business identifier of a resource with no natural one: its own
#: deterministic id (uuid5 of the business keys) as ``urn:uuid:``, under ``urn:ietf:rfc:3986``.
ID_FORMS = ("urn",)
FILE_KEYS = {"version", "resourceType", "id", "repeat", "when", "resource"}
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
#: How the submitting client is identified in Provenance.agent.who.
CLIENT_SYSTEM = f"{IDENTIFIERS}/api-client"


@dataclass(frozen=True)
class MappingContext:
    """What a mapping may know besides the artifact: the clock, the client, the protocol."""

    now: datetime
    submitter: str
    protocol: ProgramProtocol
    #: The uuid5 namespace of deterministic ids: the installation's own in the service
    #: (``security.identity``), the repository's in golden tests and ``fhir-kat map``.
    id_namespace: uuid.UUID = NAMESPACE


#: A compiled template node: evaluates itself in an environment.
Compiled = Callable[["_Env"], Any]


@dataclass(frozen=True)
class Target:
    """One mapping file, compiled once: the interpreter walks closures, not YAML, per call."""

    name: str  # file stem, e.g. "Condition-diagnosis"
    file: str  # "mappings/referrals/Condition-diagnosis.yaml"
    version: str
    resource_type: str
    id_parts: tuple[Compiled, ...]
    repeat: str | Compiled | None  # a list's field path, or an operation producing a list
    when: Compiled | None
    template: Compiled


@dataclass
class _Env:
    kind: str
    artifact: Mapping[str, Any]
    ctx: MappingContext
    ids: dict[str, list[str]]
    types: dict[str, str]
    issues: list[Issue] = field(default_factory=list)
    item: Any = None
    item_path: str = ""
    index: int = 0
    own_id: str = ""


def _spec_version(spec: Mapping[str, Any]) -> str:
    return str(spec["version"])


@cache
def targets(kind: str) -> tuple[Target, ...]:
    """The parsed mapping files of a kind, read once per process."""
    out = []
    for path in sorted((ROOT / kind).glob("*.yaml")):
        spec = yaml.safe_load(read_definition(path))
        out.append(
            Target(
                name=path.stem,
                file=f"mappings/{kind}/{path.name}",
                version=_spec_version(spec),
                resource_type=spec["resourceType"],
                id_parts=tuple(_compile(p) for p in spec["id"]),
                repeat=_compile_repeat(spec.get("repeat")),
                when=_compile(spec["when"]) if spec.get("when") is not None else None,
                template=_compile(spec["resource"]),
            )
        )
    return tuple(out)


def mapping_versions() -> dict[str, str]:
    """``{"mappings/referrals/Patient.yaml": "1", ...}`` for every mapping file."""
    return {t.file: t.version for kind in MAPPED_SCHEMAS for t in targets(kind)}


def deterministic_id(*parts: Any, namespace: uuid.UUID = NAMESPACE) -> str:
    """uuid5 of business identifiers: the same artifact always yields the same ids."""
    return str(uuid.uuid5(namespace, "|".join(str(p) for p in parts)))


def map_artifact(kind: str, payload: Mapping[str, Any], ctx: MappingContext) -> dict[str, Any]:
    """The FHIR transaction Bundle an artifact becomes (PUT entries with deterministic ids), or
    one ``Unprocessable`` listing every problem: schema, then clinical, then terminology."""
    if kind not in MAPPED_SCHEMAS:
        raise Unprocessable(issue("not-supported", f"unknown artifact kind {kind}", "kind"))
    if ctx.now.tzinfo is None:
        raise ValueError("MappingContext.now must be timezone-aware (FHIR instants need one)")
    checked = validate_artifact(kind, payload)
    problems = list(checked.issues)
    problems += functions.clinical_checks(kind, checked.data, ctx.protocol, checked.invalid)
    # The resources are built even when the artifact is already refused: their terminology
    # problems belong in the same answer ("every problem at once").
    entries, env = _build(kind, checked.data, ctx)
    problems = _merge(problems, env.issues)
    if problems:
        raise Unprocessable(problems)
    used = [t for t in targets(kind) if t.name in env.ids]
    entries.append(_provenance(kind, checked.data, entries, ctx, used))
    # dom-6: each resource carries a narrative of exactly its own elements (narrative.py).
    entries = [
        {"resourceType": r["resourceType"], "id": r["id"], "text": narrative(r), **r}
        for r in entries
    ]
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


def _build(
    kind: str, artifact: Mapping[str, Any], ctx: MappingContext
) -> tuple[list[dict[str, Any]], _Env]:
    all_targets = targets(kind)
    env = _Env(kind, artifact, ctx, {}, {t.name: t.resource_type for t in all_targets})
    plan = [(t, items) for t in all_targets for items in [_instances(t, env)] if items]
    # Ids first, so that any target may reference any other regardless of file order.
    for target, items in plan:
        env.ids[target.name] = [_id(target, env, item, i) for i, item in items]
    entries = []
    for target, items in plan:
        for (i, item), rid in zip(items, env.ids[target.name], strict=True):
            _bind(env, target, item, i)
            env.own_id = rid
            resource: dict[str, Any] = {"resourceType": target.resource_type, "id": rid}
            body = target.template(env)
            if isinstance(body, dict):
                resource.update(body)
            # What the service writes declares its profile (ADR 0022) when it conforms; one
            # that does not stays undeclared and fails tests/test_ig.py, naming the element.
            declare(resource)
            entries.append(resource)
    return _dedupe(entries, env.issues), env


def _merge(first: list[Issue], later: list[Issue]) -> list[Issue]:
    """``first`` then ``later``, without repeats: a later code problem on a field that already
    has one (its code is not in the ValueSet) is a consequence, not news."""
    out: list[Issue] = []
    seen: set[Issue] = set()
    coded = {e for i in first if i.code == "code-invalid" for e in i.expression}
    for item in first + later:
        if item in seen:
            continue
        if item in later and item.code == "code-invalid" and set(item.expression) & coded:
            continue
        seen.add(item)
        out.append(item)
    return out


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
                        "business-rule",
                        f"two different {key[0]} records share one identifier",
                        "$",
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
            items = target.repeat(env)
        # A None item failed its own validation (reported already); indexes keep their meaning.
        candidates = [(i, x) for i, x in enumerate(items or []) if x is not None]
    else:
        candidates = [(0, None)]
    out = []
    for i, item in candidates:
        _bind(env, target, item, i)
        if target.when is None or _truthy(target.when(env)):
            out.append((i, item))
    return out


def _bind(env: _Env, target: Target, item: Any, index: int) -> None:
    env.item = item
    env.index = index
    env.item_path = f"{target.repeat}[{index}]" if isinstance(target.repeat, str) else ""


def _id(target: Target, env: _Env, item: Any, index: int) -> str:
    _bind(env, target, item, index)
    return deterministic_id(
        *[part(env) for part in target.id_parts], namespace=env.ctx.id_namespace
    )


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
    if path == "item":
        return env.item_path or "$"
    if path.startswith("item."):
        return f"{env.item_path}.{path[5:]}" if env.item_path else "$"
    return path or "$"


def _fhir(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value


def _source_of(arg: Any) -> str:
    return arg.get("$path", "") if isinstance(arg, dict) else ""


def _empty(value: Any) -> bool:
    # False and 0 are values (valueBoolean false), not empty elements
    return value is None or (isinstance(value, (str, list, dict)) and not value)


_EXTENSION_KEYS = frozenset(["extension", "modifierExtension"])


def _hollow_extension(value: Any) -> bool:
    """An extension with neither a value[x] nor sub-extensions (only its url, perhaps an id)."""
    return isinstance(value, dict) and not any(
        k == "extension" or k.startswith("value") for k in value
    )


def _prune(value: Any) -> Any:
    """Drop empty elements from a value a function or a path produced."""
    if isinstance(value, dict):
        pruned = {k: _prune(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if not _empty(v)}
    if isinstance(value, list):
        items = [_prune(v) for v in value]
        return [v for v in items if not _empty(v)]
    return value


def _is_op(node: Any) -> bool:
    return isinstance(node, dict) and len(node) == 1 and str(next(iter(node))).startswith("$")


def _compile_repeat(node: Any) -> str | Compiled | None:
    if node is None or isinstance(node, str):
        return node
    return _compile(node)


def _compile(node: Any) -> Compiled:
    """A template node → a closure. Containers are rebuilt on every call (nothing of the template
    is ever shared with an output), empty elements are dropped as they are built."""
    if isinstance(node, list):
        # A list-valued operation ($each, $ref X[*], $map) splices into the surrounding list.
        children = [
            (_compile(c), _is_op(c) and next(iter(c)) in ("$each", "$ref", "$map")) for c in node
        ]

        def run_list(env: _Env) -> list[Any]:
            out: list[Any] = []
            for child, splices in children:
                value = child(env)
                if splices and isinstance(value, list):
                    out.extend(v for v in value if not _empty(v))
                elif not _empty(value):
                    out.append(value)
            return out

        return run_list
    if isinstance(node, dict):
        if _is_op(node):
            ((key, arg),) = node.items()
            return _compile_op(key, arg)
        members = [(key, _compile(value)) for key, value in node.items()]

        def run_dict(env: _Env) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key, member in members:
                value = member(env)
                if key in _EXTENSION_KEYS and isinstance(value, list):
                    # R4 ext-1: an extension whose value and sub-extensions all came out empty
                    # is no extension at all (dropped, as any other empty element).
                    value = [v for v in value if not _hollow_extension(v)]
                if not _empty(value):
                    out[key] = value
            return out

        return run_dict
    return lambda env: node  # a scalar constant


def _compile_op(op: str, arg: Any) -> Compiled:
    if op == "$path":
        path = str(arg)

        def run_path(env: _Env) -> Any:
            value = _fhir(_path(env, path))
            return _prune(value) if isinstance(value, (dict, list)) else value

        return run_path
    if op == "$const":
        return lambda env: arg
    if op == "$fn":
        ((name, raw_args),) = arg.items()
        fn = functions.REGISTRY[name]
        args = [_compile(a) for a in (raw_args if isinstance(raw_args, list) else [raw_args])]

        def run_fn(env: _Env) -> Any:
            value = fn(env.ctx, *[a(env) for a in args])
            return _prune(value) if isinstance(value, (dict, list)) else value

        return run_fn
    if op == "$map":
        return _compile_map(arg)
    if op == "$cs":
        return _compile_cs(arg)
    if op == "$ref":
        name, many = (arg[:-3], True) if arg.endswith("[*]") else (arg, False)

        def run_ref(env: _Env) -> Any:
            # A target whose ``when`` was false has no ids: the reference is simply absent.
            refs = [{"reference": f"{env.types[name]}/{i}"} for i in env.ids.get(name, [])]
            if many:
                return refs
            return refs[0] if refs else None

        return run_ref
    if op == "$each":
        source, body = str(arg["in"]), _compile(arg["do"])

        def run_each(env: _Env) -> list[Any]:
            items = _path(env, source) or []
            saved = (env.item, env.item_path, env.index)
            base = _field_path(env, source)
            out = []
            for i, item in enumerate(items):
                if item is None:
                    continue  # failed its own validation, reported already
                env.item, env.item_path, env.index = item, f"{base}[{i}]", i
                out.append(body(env))
            env.item, env.item_path, env.index = saved
            return out

        return run_each
    if op == "$id":
        return lambda env: f"urn:uuid:{env.own_id}" if env.own_id else None
    if op == "$if":
        test = _compile(arg["test"])
        then = _compile(arg["then"])
        otherwise = _compile(arg["else"]) if arg.get("else") is not None else None

        def run_if(env: _Env) -> Any:
            if _truthy(test(env)):
                return then(env)
            return otherwise(env) if otherwise is not None else None

        return run_if
    raise ValueError(f"unknown mapping operation {op}")  # lint names these first


def _compile_map(arg: Mapping[str, Any]) -> Compiled:
    code_of, source = _compile(arg["code"]), _source_of(arg["code"])
    name, optional, as_code = arg["map"], bool(arg.get("optional", False)), arg.get("as") == "code"

    def run_map(env: _Env) -> Any:
        code = code_of(env)
        if code is None:
            return None
        try:
            codings = load_terminology().translate(name, str(code), optional=optional)
        except UnmappedCode as exc:
            env.issues.append(issue("code-invalid", str(exc), _field_path(env, source)))
            return None
        if as_code:
            return codings[0]["code"] if codings else None
        return codings

    return run_map


def _compile_cs(arg: Mapping[str, Any]) -> Compiled:
    system = canonical("CodeSystem", arg["system"])
    code_of, source = _compile(arg["code"]), _source_of(arg["code"])

    def run_cs(env: _Env) -> Any:
        code = code_of(env)
        if code is None:
            return None
        display = load_terminology().display(system, str(code))
        if display is None:
            env.issues.append(
                issue(
                    "code-invalid",
                    f"code '{safe_code(str(code))}' is not in CodeSystem {system}",
                    _field_path(env, source),
                )
            )
            return None
        coding = {"system": system, "code": code}
        if display:
            coding["display"] = display
        return coding

    return run_cs


def _provenance(
    kind: str,
    artifact: Mapping[str, Any],
    resources: list[dict[str, Any]],
    ctx: MappingContext,
    used: list[Target],
) -> dict[str, Any]:
    """One Provenance per mapped artifact (FHIR-Converter's habit): what it produced, from which
    mapping files and protocol versions, for which submitting client, when."""
    source = str(artifact["source_id"])
    policies = {f"{BASE}/{t.file}#v{t.version}" for t in used}
    policies.add(f"{BASE}/protocol/{ctx.protocol.reference}")
    return {
        "resourceType": "Provenance",
        "id": deterministic_id("Provenance", kind, source, namespace=ctx.id_namespace),
        "target": [{"reference": f"{r['resourceType']}/{r['id']}"} for r in resources],
        "recorded": ctx.now.isoformat(),
        "policy": sorted(policies),
        "activity": {"coding": [dict(ACTIVITY)]},
        "agent": [
            {
                "type": {"coding": [dict(AUTHOR)]},
                "who": {
                    "identifier": {"system": CLIENT_SYSTEM, "value": ctx.submitter},
                    "display": f"API client {ctx.submitter}",
                },
            },
            {
                "type": {"coding": [dict(ASSEMBLER)]},
                "who": {"display": "fhir_kat mapping engine"},
            },
        ],
        "entity": [
            {
                "role": "source",
                "what": {
                    "identifier": {"system": f"{IDENTIFIERS}/{kind}", "value": source},
                    "display": f"{kind} artifact",
                },
            }
        ],
    }


# ---------------------------------------------------------------------------- lint


def lint_mappings(root: Path | None = None) -> list[Issue]:
    """Check every mapping file and the terminology and protocol they rely on: versions, target
    types and elements, source fields against the artifact schema, ConceptMaps, CodeSystems and
    ValueSets, references to targets, registered functions, the shipped Questionnaires."""
    folder = root or ROOT
    problems: list[Issue] = []
    try:
        term = load_terminology(folder / "terminology") if root else load_terminology()
    except (TerminologyError, KeyError, ValueError) as exc:
        return [issue("structure", f"terminology: {exc}", "mappings/terminology")]
    problems += _lint_terminology(term)
    protocol_file = folder / "program" / "protocol.yaml"
    try:
        load_protocol(protocol_file)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problems.append(issue("invalid", f"protocol: {exc}", "mappings/program/protocol.yaml"))
    problems += _lint_questionnaires(folder / "questionnaires", term)
    for kind, schema in MAPPED_SCHEMAS.items():
        files = sorted((folder / kind).glob("*.yaml"))
        if not files:
            problems.append(issue("required", f"no mapping files for {kind}", f"mappings/{kind}"))
        names = {p.stem for p in files}
        for path in files:
            problems += _lint_file(path, f"mappings/{kind}/{path.name}", kind, schema, names, term)
    return problems


def _lint_file(
    path: Path, where: str, kind: str, schema: Any, names: set[str], term: Any
) -> list[Issue]:
    try:
        spec = yaml.safe_load(read_definition(path))
    except yaml.YAMLError:
        return [issue("structure", "not valid YAML", where)]
    if not isinstance(spec, dict):
        return [issue("structure", "a mapping file is a YAML mapping", where)]
    out: list[Issue] = []
    for key in ("version", "resourceType", "id", "resource"):
        if spec.get(key) in (None, "", []):
            out.append(issue("required", f"missing '{key}'", where))
    for key in sorted(set(spec) - FILE_KEYS):
        out.append(issue("structure", f"unknown key '{key}'", where))
    model = _model(spec.get("resourceType", ""))
    if model is None:
        out.append(issue("value", "unknown FHIR resource type", f"{where}#resourceType"))
    elif isinstance(spec.get("resource"), dict):
        for key in ("resourceType", "id"):
            if key in spec["resource"]:
                out.append(issue("value", f"'{key}' is set by the engine", f"{where}#{key}"))
        out += [
            issue("value", message, f"{where}#resource.{at}")
            for at, message in _elements(model, spec["resource"], "")
        ]
    repeat = spec.get("repeat")
    if isinstance(repeat, str) and not _schema_list(schema, repeat):
        out.append(issue("value", f"repeat '{repeat}' is not a list field of {kind}", where))
    # ``item`` means: a repeat's item (base = the repeat's field path; None = built by $fn).
    item_base = repeat if isinstance(repeat, str) else ("" if repeat else None)
    for section in ("id", "when", "repeat", "resource"):
        ctx_base = None if section == "repeat" else item_base
        for op, arg, base in _ops(spec.get(section), ctx_base):
            out += _lint_op(op, arg, base, where, kind, schema, names, term)
    return out


def _lint_op(
    op: str,
    arg: Any,
    base: str | None,
    where: str,
    kind: str,
    schema: Any,
    names: set[str],
    term: Any,
) -> list[Issue]:
    if op == "$mixed":
        return [issue("structure", "an operation must stand alone in its mapping", where)]
    if op not in OPS:
        return [issue("not-supported", f"unknown operation {op}", where)]
    if op == "$path":
        if not isinstance(arg, str):
            return [issue("value", "$path takes a field path", where)]
        if arg in ("$index",) or (arg == "item" and base is not None):
            return []
        if arg == "item" or arg.startswith("item."):
            if base is None:
                return [issue("value", f"'{arg}' outside a repeat or $each", where)]
            if base == "":
                return []  # items built by a registered function
            full = base if arg == "item" else f"{base}.{arg[5:]}"
        else:
            full = arg
        if not _schema_has(schema, full):
            return [issue("value", f"unknown source field '{arg}'", where)]
        return []
    if op == "$map":
        if not isinstance(arg, dict) or not {"map", "code"} <= set(arg):
            return [issue("structure", "$map needs map and code", where)]
        if canonical("ConceptMap", str(arg["map"])) not in term.concept_maps:
            return [issue("not-found", f"no ConceptMap {arg['map']}", where)]
        if arg.get("as") not in (None, "code"):
            return [issue("value", "$map 'as' may only be 'code'", where)]
        return []
    if op == "$cs":
        if not isinstance(arg, dict) or not {"system", "code"} <= set(arg):
            return [issue("structure", "$cs needs system and code", where)]
        system = canonical("CodeSystem", str(arg["system"]))
        if system not in term.code_systems:
            return [issue("not-found", f"no CodeSystem {arg['system']}", where)]
        constant = arg["code"]
        if isinstance(constant, str) and not term.has_code(system, constant):
            return [issue("not-found", f"no code '{constant}' in CodeSystem {system}", where)]
        return []
    if op == "$ref":
        if not isinstance(arg, str) or arg.removesuffix("[*]") not in names:
            return [issue("not-found", f"no target '{arg}' in {kind}", where)]
        return []
    if op == "$fn":
        if not isinstance(arg, dict) or len(arg) != 1:
            return [issue("structure", "$fn takes one {name: [args]}", where)]
        ((name, _),) = arg.items()
        if name not in functions.REGISTRY:
            return [issue("not-found", f"no registered function {name}", where)]
        return []
    if op == "$each":
        if not isinstance(arg, dict) or set(arg) != {"in", "do"}:
            return [issue("structure", "$each takes exactly in and do", where)]
        return []
    if op == "$if" and (not isinstance(arg, dict) or "test" not in arg or "then" not in arg):
        return [issue("structure", "$if needs test and then", where)]
    if op == "$id" and arg not in ID_FORMS:
        return [issue("value", f"$id takes one of {', '.join(ID_FORMS)}", where)]
    return []


def _ops(node: Any, base: str | None) -> Iterator[tuple[str, Any, str | None]]:
    """Every operation under ``node`` with the ``item`` base it sees ($each rebinds it)."""
    if isinstance(node, dict):
        dollar = [k for k in node if isinstance(k, str) and k.startswith("$")]
        if dollar and len(node) > 1:
            yield "$mixed", node, base  # an operation must stand alone in its mapping
            return
        if dollar:
            ((key, arg),) = node.items()
            yield key, arg, base
            if key == "$each" and isinstance(arg, dict):
                yield from _ops(arg.get("in") and {"$path": arg["in"]}, base)
                inner = _each_base(arg.get("in"), base)
                yield from _ops(arg.get("do"), inner)
                return
            if key in ("$path", "$ref", "$const", "$id"):
                return
            if key == "$fn" and isinstance(arg, dict):
                for args in arg.values():
                    yield from _ops(args, base)
                return
            if isinstance(arg, dict):
                for value in arg.values():
                    yield from _ops(value, base)
            return
        for value in node.values():
            yield from _ops(value, base)
    elif isinstance(node, list):
        for value in node:
            yield from _ops(value, base)


def _each_base(path: Any, base: str | None) -> str | None:
    if not isinstance(path, str):
        return None
    if path.startswith("item."):
        return None if base is None else (f"{base}.{path[5:]}" if base else "")
    return path


def _schema_field(schema: Any, path: str) -> Any:
    from marshmallow import fields as mfields

    current: Any = schema
    found: Any = None
    for part in path.split("."):
        if current is None:
            return None
        declared = current._declared_fields
        if part not in declared:
            return None
        found = declared[part]
        inner = found.inner if isinstance(found, mfields.List) else found
        current = type(inner.schema) if isinstance(inner, mfields.Nested) else None
    return found


def _schema_has(schema: Any, path: str) -> bool:
    return _schema_field(schema, path) is not None


def _schema_list(schema: Any, path: str) -> bool:
    from marshmallow import fields as mfields

    return isinstance(_schema_field(schema, path), mfields.List)


@cache
def _model(type_name: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    try:
        return get_fhir_model_class(type_name)
    except (KeyError, ValueError, AttributeError, ImportError):
        return None


def _element_model(annotation: Any) -> Any:
    """The model class of an element's type (None for a primitive)."""
    for arg in typing.get_args(annotation) or ():
        found = _element_model(arg)
        if found is not None:
            return found
    name = getattr(annotation, "__name__", "")
    if getattr(annotation, "__module__", "") == "abc" and name.endswith("Type"):
        if name in ("ResourceType", "FHIRPrimitiveExtensionType"):
            return None
        return _model(name[: -len("Type")])
    return None


def _elements(model: Any, template: Any, at: str) -> Iterator[tuple[str, str]]:
    """Template keys that are not elements of the FHIR type (``at`` is the element path)."""
    if isinstance(template, list):
        for value in template:
            yield from _elements(model, value, at)
        return
    if not isinstance(template, dict) or any(
        isinstance(k, str) and k.startswith("$") for k in template
    ):
        if isinstance(template, dict) and "$if" in template and isinstance(template["$if"], dict):
            for branch in ("then", "else"):
                yield from _elements(model, template["$if"].get(branch), at)
        if (
            isinstance(template, dict)
            and "$each" in template
            and isinstance(template["$each"], dict)
        ):
            yield from _elements(model, template["$each"].get("do"), at)
        return  # another operation's value is checked by the R4B validation of golden outputs
    fields_by_alias = {f.alias or n: f for n, f in model.model_fields.items()}
    for key, value in template.items():
        here = f"{at}.{key}" if at else str(key)
        if key not in fields_by_alias:
            yield here, f"'{key}' is not an element of {model.__name__}"
            continue
        sub = _element_model(fields_by_alias[key].annotation)
        if sub is not None:
            yield from _elements(sub, value, here)
        elif isinstance(value, dict) and not any(str(k).startswith("$") for k in value):
            yield here, f"'{key}' of {model.__name__} is a primitive, not an object"


def _lint_terminology(term: Any) -> list[Issue]:
    out: list[Issue] = []
    for table in term.concept_maps.values():
        where = f"mappings/terminology/{term.files[table.url]}"
        if table.source_value_set and table.source_value_set not in term.value_sets:
            out.append(issue("not-found", f"source ValueSet {table.source_value_set}", where))
        for system in table.source_systems:
            if system.startswith(BASE) and system not in term.code_systems:
                out.append(issue("not-found", f"source CodeSystem {system}", where))
        for system, code in [*table.targets, *table.unmatched]:
            if system in term.code_systems and not term.has_code(system, code):
                out.append(issue("not-found", f"code '{code}' is not in {system}", where))
    for url, members in term.value_sets.items():
        for system, code in members:
            if system in term.code_systems and not term.has_code(system, code):
                out.append(
                    issue(
                        "not-found",
                        f"code '{code}' is not in {system}",
                        f"mappings/terminology/{term.files[url]}",
                    )
                )
    return out


def _lint_questionnaires(folder: Path, term: Any) -> list[Issue]:
    import json

    out: list[Issue] = []
    model = _model("Questionnaire")
    for instrument, stem in functions.INSTRUMENT_FILES.items():
        path = folder / f"Questionnaire-{stem}.json"
        where = f"mappings/questionnaires/{path.name}"
        if not path.exists():
            out.append(issue("not-found", f"no Questionnaire for {instrument}", where))
            continue
        doc = json.loads(read_definition(path))
        try:
            model.model_validate(doc)
        except ValueError as exc:
            out.append(
                issue("structure", f"not a valid R4 Questionnaire ({type(exc).__name__})", where)
            )
        for coding in _codings(doc):
            system, code = coding.get("system", ""), coding.get("code", "")
            if system.startswith(BASE) and not term.has_code(system, code):
                out.append(issue("not-found", f"code '{code}' is not in {system}", where))
        if not doc.get("version") or not doc.get("url", "").startswith(BASE):
            out.append(issue("required", "a canonical url of ours and a version", where))
        out += _lint_against_catalogue(folder.parent, instrument, doc, where)
    return out


def _lint_against_catalogue(
    root: Path, instrument: str, doc: dict[str, Any], where: str
) -> list[Issue]:
    """The Questionnaire and instruments.yaml agree: a response naming the served version is
    accepted, and every calculated item is one the service computes and so can check."""
    catalogue = load_catalogue(path=root / "instruments" / "instruments.yaml")
    definition = catalogue.instruments.get(instrument)
    if definition is None:
        return [issue("not-found", f"{instrument} is not in instruments.yaml", where)]
    out = []
    if doc.get("url") != definition.questionnaire:
        out.append(issue("value", "url differs from instruments.yaml's questionnaire", where))
    if str(doc.get("version")) not in definition.questionnaire_versions:
        out.append(
            issue("value", "version is not in instruments.yaml's questionnaire_versions", where)
        )
    for item in doc.get("item", []):
        if is_calculated(item) and not computed_by_service(item, definition):
            out.append(
                issue(
                    "value",
                    f"calculated item '{item.get('linkId')}' is not the total the service "
                    "computes (its code must be the instrument's total)",
                    where,
                )
            )
    return out


def _codings(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if isinstance(node.get("system"), str) and isinstance(node.get("code"), str):
            yield node
        for value in node.values():
            yield from _codings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _codings(value)
