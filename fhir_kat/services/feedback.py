"""Closing the loop with the referring provider: status pushes and the feedback document.

Owns: (1) the write hook that queues, in the same transaction, a conditional Task update for
the referrer's registered endpoint (``[partners.*]`` with ``artifact_kinds =
["referral-status"]`` and the referrer's ``organization``) whenever a referral Task's status
or businessStatus changes; (2) at program end (``completed``), the feedback document — a
Composition (LOINC 34133-9 "Summary of episode note", from HL7's R4 ``c80-doc-typecodes``)
summarising attendance, KaT sessions, baseline vs post scores and safety events — stored,
referenced from ``Task.output`` and queued for the referrer, **only** when the participant's
consent permits sharing with the referrer's Organization for TREAT (the same decision point as
every other disclosure; checked again by the worker at send time); (3) ``document_bundle``,
the ``document`` Bundle of a stored Composition (``Composition/<id>/$document``).
Must not: parse HTTP, send anything (the outbox worker does), or write a document without
that consent.
"""

from __future__ import annotations

import html
import logging
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from fhir_kat.errors import Hidden, NotFound, issue
from fhir_kat.exchange import PartnerConfig
from fhir_kat.exchange.partners import REFERRAL_STATUS
from fhir_kat.exchange.routing import enqueue_referral_status, referrer_partners
from fhir_kat.instruments.definitions import Catalogue
from fhir_kat.search import Criterion, SearchQuery, iter_references, split_reference
from fhir_kat.security.consent import ConsentDecisionPoint, actor_for
from fhir_kat.services.access import Access
from fhir_kat.services.fhir_rest import FhirService
from fhir_kat.store import StoredResource, Tx
from fhir_kat.store.store import format_instant
from fhir_kat.workflow.shapes import is_referral_task

log = logging.getLogger("fhir_kat.feedback")

#: Sharing clinical content with the referring provider serves the participant's care.
FEEDBACK_PURPOSE = "TREAT"
LOINC = "http://loinc.org"
#: LOINC 34133-9 "Summary of episode note": in HL7 R4 ValueSet c80-doc-typecodes (the
#: DocumentReference/Composition type codes), checked in hl7.fhir.r4.examples 4.0.1.
DOCUMENT_TYPE = {"system": LOINC, "code": "34133-9", "display": "Summary of episode note"}
SECTIONS = "https://fhir-kat.example.org/fhir/CodeSystem/kat-feedback-section"
DOCUMENT_IDS = "https://fhir-kat.example.org/fhir/sid/feedback-document"
EMPTY = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/list-empty-reason",
            "code": "nilknown",
            "display": "Nil Known",
        }
    ]
}
FINAL = ("final", "amended", "corrected")
NAMESPACE = uuid.UUID("6f1d3c52-7a0e-5b8e-9d4e-6b6174000003")
#: A document carries what its sections point at, and what those point at, up to this many.
MAX_DOCUMENT_RESOURCES = 500


class ReferrerFeedback:
    def __init__(
        self,
        fhir: FhirService,
        partners: Mapping[str, PartnerConfig],
        consent: ConsentDecisionPoint,
        catalogue: Catalogue,
        clock: Callable[[], datetime],
    ) -> None:
        self.fhir = fhir
        self.partners = partners
        self.consent = consent
        self.catalogue = catalogue
        self.clock = clock
        #: Any referrer endpoint configured at all? (Spares the look-ups on every Task write.)
        self.pushing = any(REFERRAL_STATUS in (p.artifact_kinds or ()) for p in partners.values())

    # ------------------------------------------------------------------ hook

    def on_write(self, tx: Tx, stored: StoredResource, created: bool) -> None:
        if stored.type != "Task" or stored.deleted:
            return
        task = stored.json()
        if not is_referral_task(task):
            return
        before = tx.vread("Task", stored.id, stored.version_id - 1) if not created else None
        old = before.json() if before is not None and not before.deleted else {}
        status_changed = old.get("status") != task.get("status")
        if self.pushing and (
            status_changed or old.get("businessStatus") != task.get("businessStatus")
        ):
            orgs = referrer_organizations(tx, task)
            if referrer_partners(self.partners, orgs):
                enqueue_referral_status(tx, self.partners, task, orgs, stored.patient_id)
        if status_changed and task.get("status") == "completed":
            tx.defer(f"feedback:{stored.id}", lambda t: self._feedback(t, stored.id))

    # ------------------------------------------------------------------ reading it

    def document(self, composition_id: str, access: Access | None) -> dict[str, Any]:
        """``Composition/<id>/$document``. Whoever may read the Composition gets it, with what
        it refers to as far as they may read that too. A referrer (who reads no Composition)
        gets the feedback document of its own program referral, whole, while the
        participant's consent permits sharing with its Organization for TREAT. Anything else:
        404, as for a Composition never stored."""
        with self.fhir.store.read(viewer=access) as tx:
            if tx.get("Composition", composition_id) is not None:
                return document_bundle(tx, composition_id, self.clock())
            if access is not None and self._referrers_feedback(tx, composition_id, access):
                return document_bundle(tx.system, composition_id, self.clock())
            hidden = tx.system.get("Composition", composition_id) is not None
            raise (Hidden if hidden else NotFound)(
                issue("not-found", f"Composition/{composition_id} is not known", "Composition")
            )

    def _referrers_feedback(self, tx: Tx, composition_id: str, access: Access) -> bool:
        """Whether the Composition is the feedback document of one of this referrer's own
        referral Tasks (its id is derived from the Task's, so a Task that merely points its
        ``output`` at another referral's document does not qualify) and consent permits."""
        if access.role != "referrer":
            return False
        found = tx.system.get("Composition", composition_id)
        if found is None or found.deleted or found.patient_id is None:
            return False
        about = Criterion("patient", "reference", "", (("Patient", found.patient_id),), "")
        own_tasks = tx.matches(SearchQuery("Task", criteria=(about,), count=100))
        if not any(
            is_referral_task(task.json()) and feedback_id(task.id) == composition_id
            for task in own_tasks
        ):
            return False
        return self.consent.permits(
            tx.system,
            found.patient_id,
            access.actor(tx),
            FEEDBACK_PURPOSE,
            "Composition",
            self.clock(),
        )

    # ------------------------------------------------------------------ the document

    def permits(self, tx: Tx, task: dict[str, Any], patient_id: str) -> bool:
        """Does the participant's consent permit sharing with (one of) the referrer's
        Organization(s) for TREAT? Deny when the referrer names no Organization."""
        now = self.clock()
        for org in sorted(referrer_organizations(tx, task)):
            actor = actor_for(tx, org)
            if actor is not None and self.consent.permits(
                tx, patient_id, actor, FEEDBACK_PURPOSE, "Composition", now
            ):
                return True
        return False

    def _feedback(self, tx: Tx, task_id: str) -> None:
        stored = tx.get("Task", task_id)
        if stored is None or stored.deleted or stored.patient_id is None:
            return
        task = stored.json()
        if task.get("status") != "completed" or task.get("output"):
            return
        if not self.permits(tx, task, stored.patient_id):
            log.info("feedback document withheld: consent", extra={"task": task_id})
            return
        composition = self.compose(tx, task, stored.patient_id)
        self.fhir.update_in(tx, composition)
        task.pop("meta", None)
        task["output"] = [
            {
                "type": {
                    "coding": [DOCUMENT_TYPE],
                    "text": "Program feedback document",
                },
                "valueReference": {"reference": f"Composition/{composition['id']}"},
            }
        ]
        self.fhir.update_in(tx, task)
        orgs = referrer_organizations(tx, task) if self.pushing else set()
        if referrer_partners(self.partners, orgs):
            enqueue_referral_status(
                tx,
                self.partners,
                task,
                orgs,
                stored.patient_id,
                document=document_bundle(tx, composition["id"], self.clock()),
                consent_purpose=FEEDBACK_PURPOSE,
            )

    def compose(self, tx: Tx, task: dict[str, Any], patient_id: str) -> dict[str, Any]:
        now = format_instant(self.clock())
        cid = feedback_id(task["id"])
        patient = ("Patient", patient_id)
        sessions = _search(tx, "MedicationAdministration", "patient", patient)
        sessions.sort(key=lambda r: str(_effective(r)))
        encounters = _search(tx, "Encounter", "patient", patient)
        events = _search(tx, "AdverseEvent", "subject", patient)
        flags = _search(tx, "Flag", "patient", patient)
        business = task.get("businessStatus", {}).get("text", "")
        attendance = [
            f"Referral received: {task.get('authoredOn', 'not recorded')}.",
            f"Program status: {task.get('status')}" + (f" ({business})." if business else "."),
            f"KaT sessions given: {len(sessions)}; program encounters recorded: {len(encounters)}.",
        ]
        session_lines = [
            f"{_effective(ma) or 'date not recorded'}: {ma.get('status', '')}"
            + (f", {_route(ma)}" if _route(ma) else "")
            + (f", {_dose(ma)}" if _dose(ma) else "")
            for ma in sessions
        ]
        score_lines, score_refs = self._scores(tx, patient)
        safety_lines = [
            "Adverse event: "
            + _text(ae.get("event"), "unspecified")
            + (f" ({_text(ae.get('seriousness'), '')})" if ae.get("seriousness") else "")
            + f", {ae.get('date', 'date not recorded')}"
            for ae in events
        ] + [
            f"Safety flag ({f.get('status')}): {_text(f.get('code'), 'unspecified')}" for f in flags
        ]
        sections = [
            _section("attendance", "Attendance", attendance, []),
            _section("kat-sessions", "KaT sessions", session_lines, _refs(sessions)),
            _section("outcome-scores", "Baseline and post scores", score_lines, score_refs),
            _section("safety-events", "Safety events", safety_lines, _refs(events + flags)),
        ]
        composition: dict[str, Any] = {
            "resourceType": "Composition",
            "id": cid,
            "identifier": {"system": DOCUMENT_IDS, "value": cid},
            "status": "final",
            "type": {"coding": [DOCUMENT_TYPE], "text": "Program feedback"},
            "subject": {"reference": f"Patient/{patient_id}"},
            "date": now,
            "author": [task["owner"]] if task.get("owner") else [{"display": "KaT program"}],
            "title": "Ketamine-assisted therapy program: feedback to the referring provider",
            "section": sections,
        }
        return composition

    def _scores(self, tx: Tx, patient: tuple[str, str]) -> tuple[list[str], list[str]]:
        lines: list[str] = []
        refs: list[str] = []
        for inst in self.catalogue.instruments.values():
            query = SearchQuery(
                "Observation",
                criteria=(
                    Criterion("patient", "reference", "", (patient,), ""),
                    Criterion(
                        "code", "token", "", ((inst.total["system"], inst.total["code"], True),), ""
                    ),
                ),
                count=1000,
            )
            rows = tx.matches(query)
            points = []
            for row in rows:
                obs = row.json()
                value = obs.get("valueQuantity", {}).get("value", obs.get("valueInteger"))
                when = obs.get("effectiveDateTime")
                if obs.get("status") in FINAL and value is not None and isinstance(when, str):
                    points.append((when, float(value), row.id))
            if not points:
                continue
            points.sort()
            first, last = points[0], points[-1]
            band = inst.band(first[1]).display
            line = f"{inst.title}: baseline {first[1]:g} ({band}) on {first[0][:10]}"
            refs.append(f"Observation/{first[2]}")
            if last[0] > first[0]:
                verdict = "improved" if inst.improved(first[1], last[1]) else "not improved"
                line += (
                    f"; post {last[1]:g} ({inst.band(last[1]).display}) on {last[0][:10]}"
                    f": {verdict} by the program's definition"
                )
                refs.append(f"Observation/{last[2]}")
            else:
                line += "; no post-program score recorded"
            lines.append(line + ".")
        return lines, refs


# ---------------------------------------------------------------------- the referrer


def feedback_id(task_id: str) -> str:
    """The id of a referral Task's feedback Composition: derived from the Task's, so the
    document belongs to that referral and to no Task that merely points at it."""
    return str(uuid.uuid5(NAMESPACE, f"feedback|Task/{task_id}"))


def referrer_organizations(tx: Tx, task: Mapping[str, Any]) -> set[str]:
    """``system|value`` identifiers of the Organization the referral came from: the Task's
    requester (an Organization, or a PractitionerRole in one)."""
    target = split_reference(task.get("requester", {}).get("reference", ""))
    found = tx.get(*target) if target else None
    if found is None or found.deleted:
        return set()
    resource = found.json()
    if found.type == "PractitionerRole":
        org = split_reference(resource.get("organization", {}).get("reference", ""))
        found = tx.get(*org) if org else None
        if found is None or found.deleted:
            return set()
        resource = found.json()
    if found.type != "Organization":
        return set()
    return {
        f"{i['system']}|{i['value']}"
        for i in resource.get("identifier", [])
        if i.get("system") and i.get("value")
    }


# ---------------------------------------------------------------------- $document


def document_bundle(tx: Tx, composition_id: str, now: datetime) -> dict[str, Any]:
    """The ``document`` Bundle of a stored Composition (FHIR R4 documents.html): the
    Composition first, then every resource it refers to, directly or through those, with
    ``urn:uuid:`` fullUrls and the references rewritten to them."""
    found = tx.get("Composition", composition_id)
    if found is None or found.deleted:
        raise NotFound(issue("not-found", f"Composition/{composition_id} is not known"))
    collected: dict[str, dict[str, Any]] = {f"Composition/{composition_id}": found.json()}
    queue = [found.json()]
    while queue and len(collected) < MAX_DOCUMENT_RESOURCES:
        resource = queue.pop(0)
        for holder, _ in iter_references(resource, ""):
            target = split_reference(holder["reference"])
            key = f"{target[0]}/{target[1]}" if target else None
            if key is None or key in collected or target is None:
                continue
            stored = tx.get(*target)
            if stored is None or stored.deleted:
                continue
            collected[key] = stored.json()
            queue.append(collected[key])
    urls = {key: f"urn:uuid:{uuid.uuid5(NAMESPACE, key)}" for key in collected}
    entries = []
    for key, resource in collected.items():
        body = {k: v for k, v in resource.items() if k != "meta"}
        for holder, _ in iter_references(body, ""):
            target = split_reference(holder["reference"])
            if target and f"{target[0]}/{target[1]}" in urls:
                holder["reference"] = urls[f"{target[0]}/{target[1]}"]
        entries.append({"fullUrl": urls[key], "resource": body})
    composition = collected[f"Composition/{composition_id}"]
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid5(NAMESPACE, f"document|{composition_id}")),
        "identifier": composition.get("identifier")
        or {"system": DOCUMENT_IDS, "value": composition_id},
        "type": "document",
        "timestamp": composition.get("date") or format_instant(now),
        "entry": entries,
    }


# ---------------------------------------------------------------------- helpers


def _search(tx: Tx, rtype: str, param: str, target: tuple[str, str]) -> list[dict[str, Any]]:
    query = SearchQuery(
        rtype, criteria=(Criterion(param, "reference", "", (target,), ""),), count=1000
    )
    rows = tx.matches(query)
    return [r.json() for r in rows if not r.deleted]


def _refs(resources: list[dict[str, Any]]) -> list[str]:
    return [f"{r['resourceType']}/{r['id']}" for r in resources]


def _section(code: str, title: str, lines: list[str], refs: list[str]) -> dict[str, Any]:
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    div = (
        f'<div xmlns="http://www.w3.org/1999/xhtml"><ul>{items}</ul></div>'
        if lines
        else '<div xmlns="http://www.w3.org/1999/xhtml"><p>None recorded.</p></div>'
    )
    section: dict[str, Any] = {
        "title": title,
        "code": {"coding": [{"system": SECTIONS, "code": code, "display": title}]},
        "text": {"status": "generated", "div": div},
    }
    if refs:
        section["entry"] = [{"reference": r} for r in refs]
    else:
        section["emptyReason"] = EMPTY  # cmp-2: only a section without entries has one
    return section


def _effective(ma: Mapping[str, Any]) -> str | None:
    value = ma.get("effectiveDateTime") or ma.get("effectivePeriod", {}).get("start")
    return str(value) if value else None


def _route(ma: Mapping[str, Any]) -> str:
    return _text(ma.get("dosage", {}).get("route"), "")


def _dose(ma: Mapping[str, Any]) -> str:
    dose = ma.get("dosage", {}).get("dose", {})
    if "value" not in dose:
        return ""
    return f"{dose['value']:g} {dose.get('unit', dose.get('code', ''))}".strip()


def _text(concept: Any, default: str) -> str:
    if not isinstance(concept, Mapping):
        return default
    if concept.get("text"):
        return str(concept["text"])
    for coding in concept.get("coding", []):
        if coding.get("display"):
            return str(coding["display"])
    for coding in concept.get("coding", []):
        if coding.get("code"):
            return str(coding["code"])
    return default


__all__ = [
    "DOCUMENT_TYPE",
    "FEEDBACK_PURPOSE",
    "ReferrerFeedback",
    "document_bundle",
    "referrer_organizations",
]
