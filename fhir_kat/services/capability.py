"""The CapabilityStatement: exactly what this server implements, derived from the same tables
the code runs on (supported types, search parameters, the roles' rights, the authorization
server's description), so it cannot drift from the behaviour: an interaction no role may
perform is not listed."""

from __future__ import annotations

from typing import Any

from fhir_kat import FHIR_VERSION, __version__
from fhir_kat.canonical import canonical_base
from fhir_kat.search import params_for
from fhir_kat.security.policy import ROLES, role_allows
from fhir_kat.services.messaging import supported_events
from fhir_kat.validation.resource import SUPPORTED_TYPES

_SPEC = "http://hl7.org/fhir/SearchParameter"
BULK_DATA_SERVER = "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"
#: Role letters (``security.policy``) -> the interactions they allow, in the listed order.
INTERACTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("r", ("read", "vread")),
    ("u", ("update",)),
    ("d", ("delete",)),
    ("r", ("history-instance",)),
    ("c", ("create",)),
    ("s", ("search-type",)),
)
#: An operation the server implements: (name, canonical definition, resource type or None).
Operation = tuple[str, str, str | None]
BULK_EXPORT = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition"
SDC_OPERATION = "http://hl7.org/fhir/uv/sdc/OperationDefinition"
OPERATIONS: tuple[Operation, ...] = (
    ("export", f"{BULK_EXPORT}/export", None),
    ("export", f"{BULK_EXPORT}/patient-export", "Patient"),
    ("export", f"{BULK_EXPORT}/group-export", "Group"),
    (
        "evaluate-measure",
        "http://hl7.org/fhir/OperationDefinition/Measure-evaluate-measure",
        "Measure",
    ),
    (
        "process-message",
        "http://hl7.org/fhir/OperationDefinition/MessageHeader-process-message",
        None,
    ),
    ("document", "http://hl7.org/fhir/OperationDefinition/Composition-document", "Composition"),
    # SDC's own definitions (https://hl7.org/fhir/uv/sdc/): $populate of the referral form,
    # $extract of any response (the program's OperationDefinition kat-extract says how).
    ("populate", f"{SDC_OPERATION}/Questionnaire-populate", "Questionnaire"),
    ("extract", f"{SDC_OPERATION}/QuestionnaireResponse-extract", "QuestionnaireResponse"),
)


#: The program's published definitions (fhir_kat.api.definitions, ADR 0022): read and a
#: search by ``url``, for any signed-in caller; the terminology operations on our own content.
DEFINITION_TYPES = (
    "StructureDefinition",
    "OperationDefinition",
    "SearchParameter",
    "CodeSystem",
    "ValueSet",
    "ConceptMap",
    "ImplementationGuide",
)
_HL7_OPERATION = "http://hl7.org/fhir/OperationDefinition"
TERMINOLOGY_OPERATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "ValueSet": (
        ("expand", f"{_HL7_OPERATION}/ValueSet-expand"),
        ("validate-code", f"{_HL7_OPERATION}/ValueSet-validate-code"),
    ),
    "CodeSystem": (("lookup", f"{_HL7_OPERATION}/CodeSystem-lookup"),),
    "ConceptMap": (("translate", f"{_HL7_OPERATION}/ConceptMap-translate"),),
}


def _definition_entries() -> list[dict[str, Any]]:
    entries = []
    for rtype in DEFINITION_TYPES:
        entry: dict[str, Any] = {
            "type": rtype,
            "profile": f"http://hl7.org/fhir/StructureDefinition/{rtype}",
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "searchParam": [
                {"name": "url", "definition": f"{_SPEC}/conformance-url", "type": "uri"},
                {"name": "_id", "definition": f"{_SPEC}/Resource-id", "type": "token"},
            ],
        }
        ops = TERMINOLOGY_OPERATIONS.get(rtype, ())
        if rtype == "ImplementationGuide":  # no HL7 definition: the program's own (ADR 0022)
            ops = (("package", f"{canonical_base()}/OperationDefinition/kat-package"),)
        if ops:
            entry["operation"] = [{"name": n, "definition": d} for n, d in ops]
        entries.append(entry)
    return entries


def capability_statement(
    base: str,
    security: dict[str, Any] | None = None,
    operations: tuple[Operation, ...] = OPERATIONS,
) -> dict[str, Any]:
    resources = []
    for rtype in SUPPORTED_TYPES:
        params = params_for(rtype)
        letters = {
            letter for role in ROLES for letter in "cruds" if role_allows(role, rtype, letter)
        }
        interactions = [
            code for letter, codes in INTERACTIONS for code in codes if letter in letters
        ]
        if not interactions:
            continue  # no role may do anything with it
        entry: dict[str, Any] = {
            "type": rtype,
            "profile": f"http://hl7.org/fhir/StructureDefinition/{rtype}",
            "interaction": [{"code": code} for code in interactions],
            "versioning": "versioned-update",
            "readHistory": "r" in letters,
            "updateCreate": "u" in letters,
            "conditionalCreate": "c" in letters,
            "conditionalRead": "not-supported",
            "conditionalUpdate": "u" in letters,
            "conditionalDelete": "not-supported",
            "searchInclude": sorted(
                f"{rtype}:{n}" for n, p in params.items() if p.type == "reference"
            ),
            "searchRevInclude": sorted(
                f"{other}:{n}"
                for other in SUPPORTED_TYPES
                for n, p in params_for(other).items()
                if p.type == "reference" and (not p.targets or rtype in p.targets)
            ),
            "searchParam": [
                {"name": "_id", "definition": f"{_SPEC}/Resource-id", "type": "token"},
                {
                    "name": "_lastUpdated",
                    "definition": f"{_SPEC}/Resource-lastUpdated",
                    "type": "date",
                },
            ]
            + [
                {"name": n, "definition": f"{_SPEC}/{rtype}-{n}", "type": p.type}
                if p.definition is None
                else {
                    "name": n,
                    "definition": p.definition,
                    "type": p.type,
                    "documentation": f"Not an R4 parameter: {rtype}.{'.'.join(p.paths[0])} "
                    "as a token (fhir_kat's own).",
                }
                for n, p in sorted(params.items())
            ],
        }
        ops = [o for o in operations if o[2] == rtype]
        if ops:
            entry["operation"] = [{"name": n, "definition": d} for n, d, _ in ops]
        resources.append(entry)
    rest: dict[str, Any] = {
        "mode": "server",
        "documentation": "Search results page with _count and a next link; _sort supports "
        "_lastUpdated only. Unknown parameters are ignored unless Prefer: handling=strict.",
        "resource": resources,
        "interaction": [{"code": "transaction"}, {"code": "batch"}],
    }
    resources += _definition_entries()
    system_ops = [o for o in operations if o[2] is None]
    if system_ops:
        rest["operation"] = [{"name": n, "definition": d} for n, d, _ in system_ops]
    if security:
        rest["security"] = security
    statement: dict[str, Any] = {
        "resourceType": "CapabilityStatement",
        # The Bulk Data Access IG's server CapabilityStatement, whose $export operations
        # (system, Patient, Group) this server implements.
        "instantiates": [BULK_DATA_SERVER],
        "status": "active",
        "date": "2026-11-22",
        "publisher": "fhir_kat",
        "kind": "instance",
        "software": {"name": "fhir_kat", "version": __version__},
        "implementation": {"description": "fhir_kat FHIR R4 service", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [rest],
    }
    if any(o[0] == "process-message" for o in operations):
        statement["messaging"] = [
            {
                "endpoint": [
                    {
                        "protocol": {
                            "system": "http://terminology.hl7.org/CodeSystem/message-transport",
                            "code": "http",
                        },
                        "address": f"{base}/$process-message",
                    }
                ],
                "documentation": "Synchronous referral messages (events in "
                f"mappings/workflow/messaging.yaml: {supported_events()}); re-sent "
                "messages (same Bundle.id) get the recorded response.",
            }
        ]
    return statement
