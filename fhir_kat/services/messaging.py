"""FHIR messaging for referrals: ``POST [base]/$process-message`` (FHIR R4 messaging.html,
MessageHeader ``$process-message``), as Canadian eReferral networks send them.

Owns: reading a ``message`` Bundle whose MessageHeader announces a new or updated referral
(events in ``mappings/workflow/messaging.yaml``), storing its resources in one write
transaction through ``FhirService.update_in`` (so the same validation, workflow rules, triage,
audit and outbox apply as for REST and native referrals), and the synchronous response message
(``MessageHeader.response``: identifier = the request's MessageHeader.id, code ``ok`` |
``transient-error`` | ``fatal-error``, an OperationOutcome in ``details`` for errors).

Exactly once: every answered message is recorded in the ``message_inbox`` table under the
sender and ``Bundle.id``, in the same transaction as its resources; a resent message gets the
recorded response and is not processed again. ``transient-error`` answers are not recorded (the
sender should retry). Resources carrying a business identifier are stored under the id of the
resource that already has it (whatever route created it) or a deterministic one, so the same
referrer identifier never makes a second referral. Must not: parse HTTP.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Column, DateTime, String, Table, Text, insert, select

from fhir_kat.canonical import read_definition
from fhir_kat.errors import BadRequest, Conflict, FhirError, Forbidden, Issue, issue
from fhir_kat.search import Criterion, SearchQuery, iter_references
from fhir_kat.services.access import Access
from fhir_kat.services.fhir_rest import FhirService, require_access
from fhir_kat.services.referrals import keep_workflow_state, tasks_for_referral
from fhir_kat.store import Tx
from fhir_kat.store.schema import metadata
from fhir_kat.store.store import format_instant
from fhir_kat.validation.resource import SUPPORTED_TYPES
from fhir_kat.validation.temporal import temporal_issues

FILE = Path(__file__).resolve().parents[2] / "mappings" / "workflow" / "messaging.yaml"
RESPONSE_CODES = "http://hl7.org/fhir/response-code"
#: uuid5 namespace for the ids of resources received by message without an existing match.
NAMESPACE = uuid.UUID("6f1d3c52-7a0e-5b8e-9d4e-6b6174000002")

#: The inbox: one row per answered message (idempotent receiver).
message_inbox = Table(
    "message_inbox",
    metadata,
    Column("message_key", String(200), primary_key=True),
    Column("response", Text, nullable=False),
    Column("received_at", DateTime, nullable=False),
)


@cache
def message_rules(path: Path = FILE) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(read_definition(path))
    return data


def supported_events(rules: dict[str, Any] | None = None) -> str:
    """``system|code`` of every event that starts or updates a referral, for people."""
    events: dict[str, dict[str, Any]] = (rules or message_rules())["events"]
    return ", ".join(f"{system}|{code}" for system, codes in events.items() for code in codes)


@dataclass(frozen=True)
class MessageResult:
    response: dict[str, Any]
    code: str  # ok | transient-error | fatal-error
    replayed: bool = False


@dataclass
class _Header:
    bundle_id: str
    header_id: str
    event: dict[str, Any]
    source_endpoint: str
    focus: list[str]


class MessagingService:
    def __init__(
        self,
        fhir: FhirService,
        clock: Callable[[], datetime],
        id_namespace: uuid.UUID = NAMESPACE,
    ) -> None:
        self.fhir = fhir
        self.clock = clock
        #: Ids derived from business identifiers (a PHN): keyed by the installation's secret.
        self.id_namespace = id_namespace

    # ------------------------------------------------------------------ entry point

    def process(self, bundle: Any, base: str, access: Access | None) -> MessageResult:
        """Process one message; raises ``BadRequest`` only when it cannot be answered with a
        response message at all (no Bundle, no MessageHeader, no ids)."""
        header = _header(bundle)
        sender = access.principal.client_id if access is not None else "local"
        key = f"{sender}|{header.bundle_id}"[:200]
        store = self.fhir.store
        with store.read() as tx:
            seen = _recorded(tx, key)
        if seen is not None:
            return MessageResult(seen, _code_of(seen), replayed=True)
        try:
            problems = _check(bundle, header)
            if problems:
                raise BadRequest(problems)
            with self.fhir.write(access) as tx:
                tx.lock(f"message|{key}")
                again = _recorded(tx, key)
                if again is not None:  # a parallel copy of the same message won the race
                    return MessageResult(again, _code_of(again), replayed=True)
                task = self._store(tx, bundle, header, access)
                response = self._response(header, base, "ok", task=task)
                _record(tx, key, response, self.clock())
            return MessageResult(response, "ok")
        except Forbidden:
            raise  # who may send is not a property of the message: HTTP 403, nothing recorded
        except Conflict as exc:
            return MessageResult(
                self._response(header, base, "transient-error", exc), "transient-error"
            )
        except FhirError as exc:
            response = self._response(header, base, "fatal-error", exc)
            with store.write() as tx:
                tx.lock(f"message|{key}")
                if _recorded(tx, key) is None:
                    _record(tx, key, response, self.clock())
            return MessageResult(response, "fatal-error")

    # ------------------------------------------------------------------ storing

    def _store(
        self, tx: Tx, bundle: dict[str, Any], header: _Header, access: Access | None
    ) -> dict[str, Any] | None:
        entries = [e for e in bundle.get("entry", [])[1:] if isinstance(e, dict)]
        ids: dict[str, str] = {}  # every spelling of an entry -> Type/our-id
        planned: list[tuple[int, dict[str, Any], str]] = []
        problems: list[Issue] = []
        for index, entry in enumerate(entries, start=1):
            resource = entry.get("resource")
            where = f"Bundle.entry[{index}].resource"
            if not isinstance(resource, dict):
                problems.append(issue("required", "every entry needs a resource", where))
                continue
            rtype = resource.get("resourceType")
            if rtype not in SUPPORTED_TYPES:
                problems.append(
                    issue("not-supported", f"resource type {rtype} is not supported", where)
                )
                continue
            require_access(access, str(rtype), "update", where)
            local_id = self._local_id(tx, resource, header, entry)
            local = f"{rtype}/{local_id}"
            for spelling in _spellings(entry, resource):
                ids[spelling] = local
            planned.append((index, resource, local.split("/", 1)[1]))
        if problems:
            raise BadRequest(problems)
        for index, resource, local_id in planned:
            body = json.loads(json.dumps(resource))
            where = f"Bundle.entry[{index}].resource"
            for holder, path in iter_references(body, where):
                ref = holder["reference"]
                target = ids.get(ref) or ids.get(_tail(ref))
                if target is not None:
                    holder["reference"] = target
                elif ref.startswith(("urn:uuid:", "urn:oid:")):
                    problems.append(
                        issue("not-found", "reference to an entry that is not in this Bundle", path)
                    )
            rtype = body["resourceType"]
            body["id"] = local_id
            body.pop("meta", None)
            current = tx.system.get(rtype, body["id"], for_update=True)
            if rtype == "Task" and current is not None and not current.deleted:
                body = keep_workflow_state(current.json(), body)
            if problems:
                continue
            try:
                # As the sender: another sender's referral or patient data is never overwritten
                # (Access.may_change; a Forbidden leaves as HTTP 403, nothing stored).
                self.fhir.update_in(tx, body)
            except FhirError as exc:
                located = [
                    Issue(i.code, f"entry {index}: {i.diagnostics}", i.expression)
                    for i in exc.issues
                ]
                raise type(exc)(located, headers=exc.headers) from None
        if problems:
            raise BadRequest(problems)
        # Run the workflow (Task creation, triage) now, so the answer carries its outcome.
        tx.run_deferred()
        focus = ids.get(header.focus[0]) or ids.get(_tail(header.focus[0]))
        if focus is None:
            return None
        ftype, fid = focus.split("/", 1)
        if ftype == "Task":
            stored = tx.get("Task", fid)
            return stored.json() if stored is not None else None
        tasks = tasks_for_referral(tx, fid)
        return tasks[0].json() if tasks else None

    def _local_id(
        self, tx: Tx, resource: dict[str, Any], header: _Header, entry: dict[str, Any]
    ) -> str:
        """The id a received resource is stored under: that of the stored resource with the
        same business identifier (whichever route created it) among those the sender may see
        or change (the conditional-create rule: ``FhirService.match``), else a deterministic
        one."""
        rtype = str(resource["resourceType"])
        ident = _first_identifier(resource)
        if ident is not None:
            system, value = ident
            query = SearchQuery(
                rtype,
                criteria=(Criterion("identifier", "token", "", ((system, value, True),), ""),),
                count=2,
            )
            rows = self.fhir.match(tx, query)
            if len(rows) == 1:
                return rows[0].id
            return str(uuid.uuid5(self.id_namespace, f"{rtype}|{system}|{value}"))
        origin = entry.get("fullUrl") or f"{rtype}/{resource.get('id', '')}"
        return str(uuid.uuid5(self.id_namespace, f"{header.source_endpoint}|{origin}"))

    # ------------------------------------------------------------------ response

    def _response(
        self,
        header: _Header,
        base: str,
        code: str,
        error: FhirError | None = None,
        task: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        response_id = str(uuid.uuid4())
        message_header: dict[str, Any] = {
            "resourceType": "MessageHeader",
            "id": response_id,
            "eventCoding": header.event,
            "source": {"name": "fhir_kat", "endpoint": base},
            "response": {"identifier": header.header_id, "code": code},
        }
        if header.source_endpoint:
            message_header["destination"] = [{"endpoint": header.source_endpoint}]
        entries: list[dict[str, Any]] = [
            {"fullUrl": f"urn:uuid:{response_id}", "resource": message_header}
        ]
        if task is not None:
            task = {k: v for k, v in task.items() if k != "meta"}
            message_header["focus"] = [{"reference": f"{base}/Task/{task['id']}"}]
            entries.append({"fullUrl": f"{base}/Task/{task['id']}", "resource": task})
        if error is not None:
            outcome_id = str(uuid.uuid4())
            outcome = dict(error.outcome(), id=outcome_id)
            message_header["response"]["details"] = {"reference": f"urn:uuid:{outcome_id}"}
            entries.append({"fullUrl": f"urn:uuid:{outcome_id}", "resource": outcome})
        return {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "message",
            "timestamp": format_instant(self.clock()),
            "entry": entries,
        }


# ---------------------------------------------------------------------- helpers


def _header(bundle: Any) -> _Header:
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise BadRequest(issue("invalid", "$process-message needs a Bundle", "Bundle"))
    problems: list[Issue] = []
    if bundle.get("type") != "message":
        problems.append(issue("value", "Bundle.type must be message", "Bundle.type"))
    if not isinstance(bundle.get("id"), str) or not bundle["id"]:
        problems.append(
            issue("required", "a message needs a Bundle.id (it detects re-sends)", "Bundle.id")
        )
    entries = bundle.get("entry")
    first = entries[0] if isinstance(entries, list) and entries else None
    mh = first.get("resource") if isinstance(first, dict) else None
    if not isinstance(mh, dict) or mh.get("resourceType") != "MessageHeader":
        problems.append(
            issue("required", "the first entry must be a MessageHeader", "Bundle.entry[0]")
        )
        raise BadRequest(problems)
    if not isinstance(mh.get("id"), str) or not mh["id"]:
        problems.append(
            issue("required", "the MessageHeader needs an id", "Bundle.entry[0].resource.id")
        )
    # The Bundle's own elements and its header (the other entries are checked as written).
    problems += temporal_issues(bundle, "Bundle", skip_entry_resources=True)
    problems += temporal_issues(mh, "Bundle.entry[0].resource")
    if problems:
        raise BadRequest(problems)
    source = mh.get("source") if isinstance(mh.get("source"), dict) else {}
    focus = [
        f["reference"]
        for f in mh.get("focus", [])
        if isinstance(f, dict) and isinstance(f.get("reference"), str)
    ]
    event = mh.get("eventCoding") if isinstance(mh.get("eventCoding"), dict) else {}
    return _Header(
        bundle_id=bundle["id"],
        header_id=mh["id"],
        event=event or {},
        source_endpoint=str(source.get("endpoint", "")) if source else "",
        focus=focus,
    )


def _check(bundle: dict[str, Any], header: _Header) -> list[Issue]:
    """What makes a message one this service cannot act on (a ``fatal-error`` answer)."""
    rules = message_rules()
    mh = "Bundle.entry[0].resource"
    problems: list[Issue] = []
    event = header.event
    if event.get("code") not in rules["events"].get(event.get("system"), {}):
        problems.append(
            issue(
                "not-supported",
                "unknown event; supported: " + supported_events(rules),
                f"{mh}.eventCoding",
            )
        )
    if not header.source_endpoint:
        problems.append(issue("required", "MessageHeader.source.endpoint is required", mh))
    if len(header.focus) != 1:
        problems.append(
            issue("required", "the MessageHeader needs exactly one focus", f"{mh}.focus")
        )
        return problems
    entries = [e for e in bundle.get("entry", [])[1:] if isinstance(e, dict)]
    spellings: dict[str, str] = {}
    for entry in entries:
        res = entry.get("resource")
        if isinstance(res, dict):
            for s in _spellings(entry, res):
                spellings[s] = str(res.get("resourceType"))
    target = spellings.get(header.focus[0]) or spellings.get(_tail(header.focus[0]))
    if target is None:
        problems.append(
            issue("not-found", "the focus must be an entry of the message", f"{mh}.focus[0]")
        )
    elif target not in rules["focus_types"]:
        problems.append(
            issue(
                "not-supported",
                "the focus of a referral message is a ServiceRequest or a Task",
                f"{mh}.focus[0]",
            )
        )
    return problems


def _spellings(entry: dict[str, Any], resource: dict[str, Any]) -> list[str]:
    out = []
    full = entry.get("fullUrl")
    if isinstance(full, str) and full:
        out.append(full)
        out.append(_tail(full))
    if resource.get("id"):
        out.append(f"{resource.get('resourceType')}/{resource['id']}")
    return out


def _tail(reference: str) -> str:
    parts = reference.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:])


def _first_identifier(resource: dict[str, Any]) -> tuple[str, str] | None:
    idents = resource.get("identifier")
    if isinstance(idents, dict):
        idents = [idents]
    for ident in idents if isinstance(idents, list) else []:
        if isinstance(ident, dict) and ident.get("system") and ident.get("value"):
            return str(ident["system"]), str(ident["value"])
    return None


def _recorded(tx: Tx, key: str) -> dict[str, Any] | None:
    row = tx.conn.execute(
        select(message_inbox.c.response).where(message_inbox.c.message_key == key)
    ).first()
    if row is None:
        return None
    loaded: dict[str, Any] = json.loads(row[0])
    return loaded


def _record(tx: Tx, key: str, response: dict[str, Any], now: datetime) -> None:
    tx.conn.execute(
        insert(message_inbox).values(
            message_key=key,
            response=json.dumps(response, separators=(",", ":")),
            received_at=now.replace(tzinfo=None),
        )
    )


#: The inbox's read and write, shared with the HL7 v2 receiver (``services/v2_referrals``).
recorded_answer = _recorded
record_answer = _record


def _code_of(response: dict[str, Any]) -> str:
    code: str = response["entry"][0]["resource"]["response"]["code"]
    return code


__all__ = [
    "MessageResult",
    "MessagingService",
    "message_inbox",
    "message_rules",
    "record_answer",
    "recorded_answer",
    "supported_events",
]
