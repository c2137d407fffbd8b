"""AuditEvents for every access, following the IHE Basic Audit Log Patterns (BALP).

Owns: building the AuditEvent of one request and writing it. Audit records hold who (the
client; for a person signed in through an OpenID Provider, the person as the requestor — BALP's
user agent, identified by the provider's issuer and ``sub``, with the name it gave — and the
web pages as the application agent),
what (resource references, the search query), which patient(s), when and the outcome; they live
in the protected store (admins only) and are never changed or deleted through the API. They are
the one place where a search query is kept (base64, as BALP asks); logs never hold one.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fhir_kat.security.tokens import Person
from fhir_kat.store import Store, Tx
from fhir_kat.store.store import format_instant

DCM = "http://dicom.nema.org/resources/ontology/DCM"
AUDIT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
INTERACTION = "http://hl7.org/fhir/restful-interaction"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
PURPOSE = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
CLIENT_SYSTEM = "urn:fhir-kat:client-id"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
#: BALP's user agent: the recipient of what is read or searched, the author of what is
#: written (its DataSources value set).
USER_READS = {"code": "IRCP", "display": "information recipient"}
USER_WRITES = {"code": "AUT", "display": "author (originator)"}

#: interaction -> BALP action code (C/R/U/D/E)
ACTIONS = {
    "create": "C",
    "read": "R",
    "vread": "R",
    "history-instance": "R",
    "search-type": "E",
    "update": "U",
    "delete": "D",
    "transaction": "E",
    "batch": "E",
    "operation": "E",
    "capabilities": "R",
}
#: ``outcomeDesc`` of a write that wrote nothing: a conditional create that matched, an
#: update identical to the current version (a no-op update), a re-sent artifact.
NOTHING_WRITTEN = "nothing written: matched or unchanged"


@dataclass
class AuditRecord:
    """What one request did; filled in as the request runs."""

    interaction: str = "operation"
    client_id: str | None = None
    role: str | None = None
    purpose: str | None = None
    address: str | None = None
    entities: list[str] = field(default_factory=list)  # "Type/id"
    patients: set[str] = field(default_factory=set)
    query: str | None = None
    status: int = 200
    detail: str | None = None  # e.g. "token issued", "denied: no token"
    #: The client id a refused sign-in presented (never its secret): who was tried.
    presented_client_id: str | None = None
    security: bool = False  # authentication event (token endpoint, rejected token)
    #: The person acting through the client (a web-page sign-in), and the access token's id.
    person: Person | None = None
    token_id: str | None = None
    #: The status already audited inside the request's own committed transaction (None:
    #: not yet). The response-time audit is skipped only when the response has this status.
    audited_status: int | None = None


def outcome_code(status: int) -> str:
    if status < 400:
        return "0"
    if status < 500:
        return "4"  # minor failure: the request was refused
    return "8"


def build_audit_event(record: AuditRecord, recorded: datetime) -> dict[str, Any]:
    if record.security:
        event_type = {"system": DCM, "code": "110114", "display": "User Authentication"}
        subtype = [{"system": DCM, "code": "110122", "display": "Login"}]
    else:
        event_type = {"system": AUDIT_TYPE, "code": "rest", "display": "Restful Operation"}
        subtype = [{"system": INTERACTION, "code": record.interaction}]
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": DCM, "code": "110150", "display": "Application"}]},
        "requestor": True,
    }
    if record.client_id:
        agent["who"] = {"identifier": {"system": CLIENT_SYSTEM, "value": record.client_id}}
        if record.role:
            agent["who"]["display"] = f"{record.client_id} ({record.role})"
    elif record.presented_client_id and (presented := _printable(record.presented_client_id)):
        agent["who"] = {
            "identifier": {"system": CLIENT_SYSTEM, "value": presented},
            "display": "presented client id (not authenticated)",
        }
    else:
        agent["who"] = {"display": "unauthenticated client"}
    if record.address:
        agent["network"] = {"address": record.address, "type": "2"}
    if record.purpose:
        agent["purposeOfUse"] = [{"coding": [{"system": PURPOSE, "code": record.purpose}]}]
    person = record.person
    agents = [agent] if person is None else [_user_agent(record, person), _app_agent(agent)]
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(uuid.uuid4()),
        "type": event_type,
        "subtype": subtype,
        "action": ACTIONS.get(record.interaction, "E"),
        "recorded": format_instant(recorded),
        "outcome": outcome_code(record.status),
        "agent": agents,
        "source": {
            "observer": {"display": "fhir_kat"},
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
    }
    if record.detail or record.status >= 400:
        event["outcomeDesc"] = record.detail or f"HTTP {record.status}"
    entities: list[dict[str, Any]] = [
        {
            "what": {"reference": f"Patient/{patient}"},
            "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
            "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
        }
        for patient in sorted(record.patients)
    ]
    entities += [
        {
            "what": {"reference": ref},
            "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
            "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
        }
        for ref in _unique(record.entities)
        if not (ref.startswith("Patient/") and ref[8:] in record.patients)
    ]
    if record.query:
        entities.append(
            {
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": OBJECT_ROLE, "code": "24", "display": "Query"},
                "query": base64.b64encode(record.query.encode()).decode(),
            }
        )
    if entities:
        event["entity"] = entities
    return event


def _user_agent(record: AuditRecord, person: Person) -> dict[str, Any]:
    """BALP's user (OAUTHaccessTokenUse.Comprehensive ``oUser``): the person, identified as
    its provider identifies it (``who.identifier``: system = the issuer, value = ``sub``),
    the requestor, with its role and purpose of use in this service."""
    kind = USER_WRITES if ACTIONS.get(record.interaction) in ("C", "U", "D") else USER_READS
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": PARTICIPATION, **kind}]},
        "who": {
            "identifier": {"system": person.issuer, "value": person.subject},
            "display": person.name,
        },
        "name": person.name,
        "requestor": True,
    }
    if record.role:
        agent["role"] = [{"text": record.role}]
    if record.token_id:
        agent["policy"] = [f"urn:ietf:params:oauth:jti:{record.token_id}"]
    if record.purpose:
        agent["purposeOfUse"] = [{"coding": [{"system": PURPOSE, "code": record.purpose}]}]
    return agent


def _app_agent(client_agent: dict[str, Any]) -> dict[str, Any]:
    """BALP's ``oClient``: the application the person used (the web pages as registered at
    the person's provider), with the network address; the person is the requestor."""
    agent = {k: v for k, v in client_agent.items() if k != "purposeOfUse"}
    agent["requestor"] = False
    who = agent.get("who", {})
    if "identifier" in who:
        provider = who["identifier"]["value"].split(":", 1)[-1]
        agent["who"] = {
            "identifier": who["identifier"],
            "display": f"fhir_kat web pages (sign-in through {provider})",
        }
    return agent


def _printable(text: str, limit: int = 128) -> str:
    """``text`` as a FHIR string: control characters and unpaired surrogates dropped, at most
    ``limit`` characters, no surrounding whitespace (a presented id is whatever was sent)."""
    kept = "".join(
        c for c in text[: limit * 2] if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF
    )
    return kept[:limit].strip()


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def write_audit_event(store: Store, event: dict[str, Any]) -> None:
    """Audit writes bypass the API (no client may write AuditEvents) but not the store. The
    record of a request that wrote nothing else: committed before this returns, and on
    SQLite without waiting for the database's writers (``Store.record_audit``, ADR 0023)."""
    store.record_audit(event)


def write_audit_event_in(tx: Tx, event: dict[str, Any]) -> None:
    """The audit record inside a transaction that also writes what it records (one commit:
    the record and the data it describes commit together, or neither does)."""
    tx.put(event, current=None)
