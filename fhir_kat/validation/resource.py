"""Validate one FHIR R4 JSON resource: R4B model structure, required bindings, service rules.

Owns: ``validate_resource`` and the list of resource types the service stores. Must not: store,
log, or echo element values into diagnostics (they may be PHI); issues name elements only.

The ``fhir.resources.R4B`` models are a structural check only (ADR 0001): they know no required
binding and no invariant, so ``bindings.check_required_bindings`` (generated from HL7's own
StructureDefinitions) runs after them.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from functools import cache
from typing import Any

from pydantic import ValidationError

from fhir_kat.errors import Issue, issue
from fhir_kat.validation.narrative import narrative_issues
from fhir_kat.validation.strings import string_issues
from fhir_kat.validation.temporal import temporal_issues

#: The resource types fhir_kat stores and serves (the CapabilityStatement lists exactly these).
SUPPORTED_TYPES: tuple[str, ...] = (
    "AdverseEvent",
    "AllergyIntolerance",
    "Appointment",
    "AuditEvent",
    "ClinicalImpression",
    "Communication",
    "Composition",
    "Condition",
    "Consent",
    "DocumentReference",
    "Encounter",
    "Endpoint",
    "Flag",
    "Group",
    "Measure",
    "MeasureReport",
    "Medication",
    "MedicationAdministration",
    "Observation",
    "Organization",
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Provenance",
    "Questionnaire",
    "QuestionnaireResponse",
    "ServiceRequest",
    "Subscription",
    "Task",
)

_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


def is_valid_id(value: str) -> bool:
    return bool(_ID_RE.match(value))


@cache
def _model(resource_type: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(resource_type)


def _expression(resource_type: str, loc: tuple[int | str, ...]) -> str:
    out = resource_type
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}"
    return out


def _safe_message(err: Any) -> str:
    """The model's message with any echo of the submitted value removed (it may be PHI)."""
    msg = str(err.get("msg", "invalid value"))
    value = err.get("input")
    if isinstance(value, str | int | float) and str(value) and str(value) in msg:
        msg = msg.replace(str(value), "<value>")
    return msg.split("\n", 1)[0][:300]


def structure_issues(resource: dict[str, Any], prefix: str | None = None) -> list[Issue]:
    """Issues from the R4B model; ``prefix`` replaces the resource type in expressions."""
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        return [issue("required", "resourceType is missing", prefix or "resourceType")]
    try:
        model = _model(resource_type)
    except (KeyError, ValueError, AttributeError):
        return [issue("not-supported", f"unknown resource type {resource_type}", prefix or "")]
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            kind = err.get("type", "")
            code = (
                "required"
                if "missing" in kind
                else "structure"
                if kind == "extra_forbidden"
                else "value"
            )
            expr = _expression(prefix or resource_type, tuple(err.get("loc", ())))
            problems.append(issue(code, _safe_message(err), expr))
        return problems
    return []


#: Digests of resources found valid lately (with the type and prefix they were checked
#: under): the checks are a pure function of the JSON, and the same content comes again and
#: again (an artifact's Practitioner, Organization and Endpoint; every identical re-send).
_VALID_CACHE_SIZE = 4096
_valid: OrderedDict[tuple[bytes, str | None, str | None], None] = OrderedDict()
_valid_lock = threading.Lock()


def _valid_key(
    resource: Any, expected_type: str | None, prefix: str | None
) -> tuple[bytes, str | None, str | None] | None:
    if not isinstance(resource, dict):
        return None
    try:
        text = json.dumps(
            resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError):
        return None  # not plain JSON (the check itself will say what is wrong): not cached
    digest = hashlib.blake2b(text.encode(), digest_size=20).digest()
    return digest, expected_type, prefix


def validate_resource(
    resource: Any, expected_type: str | None = None, prefix: str | None = None
) -> list[Issue]:
    """Every problem with ``resource`` as a list of issues (empty = valid).

    ``expected_type`` is the type named by the URL; ``prefix`` locates the resource inside a
    Bundle (``Bundle.entry[3].resource``) so expressions point at the right place. Content
    found valid recently is not checked again (a bounded cache of digests; only "valid" is
    remembered, so every problem is still reported from a fresh check).
    """
    key = _valid_key(resource, expected_type, prefix)
    if key is not None:
        with _valid_lock:
            if key in _valid:
                _valid.move_to_end(key)
                return []
    problems = _validate(resource, expected_type, prefix)
    if key is not None and not problems:
        with _valid_lock:
            _valid[key] = None
            while len(_valid) > _VALID_CACHE_SIZE:
                _valid.popitem(last=False)
    return problems


def _validate(resource: Any, expected_type: str | None, prefix: str | None) -> list[Issue]:
    from fhir_kat.validation.bindings import check_required_bindings

    where = prefix or (expected_type or "")
    if not isinstance(resource, dict):
        return [issue("structure", "a resource must be a JSON object", where or "$this")]
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        return [issue("required", "resourceType is missing", where or "resourceType")]
    if expected_type and resource_type != expected_type:
        return [
            issue(
                "invalid",
                f"resourceType {resource_type} does not match the URL ({expected_type})",
                f"{where}.resourceType" if prefix else "resourceType",
            )
        ]
    if resource_type not in SUPPORTED_TYPES:
        return [issue("not-supported", f"resource type {resource_type} is not supported", where)]
    rid = resource.get("id")
    if rid is not None and (not isinstance(rid, str) or not is_valid_id(rid)):
        return [
            issue("value", "id must be 1-64 characters of [A-Za-z0-9-.]", f"{resource_type}.id")
        ]
    problems = structure_issues(resource, prefix)
    if problems:
        return problems
    problems = check_required_bindings(resource)
    if prefix:
        problems = [
            Issue(
                code=p.code,
                diagnostics=p.diagnostics,
                expression=tuple(
                    prefix + e[len(resource_type) :] if e.startswith(resource_type) else e
                    for e in p.expression
                ),
                severity=p.severity,
            )
            for p in problems
        ]
    problems.extend(_service_rules(resource, prefix or resource_type))
    return problems


def validate_document(document: Any) -> list[Issue]:
    """A resource of a supported type, or a Bundle of them (any Bundle type), checked the way
    the service checks what it stores; used by ``fhir-kat validate``."""
    from fhir_kat.validation.bindings import check_required_bindings

    if isinstance(document, dict) and document.get("resourceType") == "Bundle":
        problems = structure_issues(document) or check_required_bindings(document)
        for i, entry in enumerate(document.get("entry", [])):
            if isinstance(entry, dict) and "resource" in entry:
                problems += _service_rules(entry["resource"], f"Bundle.entry[{i}].resource")
        return problems
    return validate_resource(document)


def _service_rules(resource: dict[str, Any], where: str) -> list[Issue]:
    """Rules the models and HL7's machine-checkable invariants leave to us."""
    # txt-1/txt-2: the models accept any string as a narrative div (narrative.py).
    problems: list[Issue] = narrative_issues(resource, where)
    # HL7's R4 JSON schema: no string holds a control character or non-FHIR whitespace.
    problems += string_issues(resource, where)
    # R4's date, dateTime and instant grammar (offsets within ±14:00), every element by type.
    problems += temporal_issues(resource, where)
    if resource["resourceType"] == "Consent":
        # R4's invariant ppc-1 ("privacy consent needs a patient") is written so it never fires:
        # check the intent ourselves. A privacy consent nobody can be matched to is unenforceable.
        scope_codes = {c.get("code") for c in resource.get("scope", {}).get("coding", [])}
        if "patient-privacy" in scope_codes and not resource.get("patient"):
            problems.append(
                issue(
                    "invariant",
                    "a patient-privacy Consent must name its patient",
                    f"{where}.patient",
                )
            )
    return problems
