"""Closing the loop with the referring provider: status pushes and the feedback document.

Owns: (1) the write hook that queues, in the same transaction, a conditional Task update for
the referrer's registered endpoint (``[partners.*]`` with ``artifact_kinds =
["referral-status"]`` and the referrer's ``organization``) whenever a referral Task's status
or businessStatus changes; (2) at program end (``completed``, ``cancelled`` or ``failed``), the
feedback document as a **draft** — a Composition (LOINC 34133-9 "Summary of episode note", from
HL7's R4 ``c80-doc-typecodes``, status ``preliminary``) with the reason for referral and
diagnoses, attendance, each KaT session's dose in mg and mg/kg, baseline and post scores on the
outcome measure's windows with PHQ-9 item 9 answers, safety events with their resolution, and
an empty recommendations / plan section for a program clinician; (3) the rule that a feedback
Composition becomes ``final`` only attested by a clinician (``Composition.attester``) with the
plan written (422 otherwise), and the hook that then references it from ``Task.output`` and
queues it for the referrer, **only** when the participant's consent permits sharing with the
referrer's Organization for TREAT (the same decision point as every other disclosure; checked
again by the worker at send time); (4) ``document_bundle``, the ``document`` Bundle of a stored
Composition (``Composition/<id>/$document``). Must not: parse HTTP, send anything (the outbox
worker does), or link or send a document that is not final or not consented to.
"""

from __future__ import annotations

import html
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from fhir_kat.errors import Hidden, NotFound, Unprocessable, issue
from fhir_kat.exchange import PartnerConfig
from fhir_kat.exchange.partners import REFERRAL_STATUS
from fhir_kat.exchange.routing import enqueue_referral_status, referrer_partners
from fhir_kat.instruments.definitions import Catalogue, Instrument, MeasureRules
from fhir_kat.instruments.outcomes import ScorePoint, Timeline, baseline_of, post_of
from fhir_kat.search import (
    Criterion,
    SearchQuery,
    iter_references,
    parse_date_range,
    split_reference,
)
from fhir_kat.security.consent import ConsentDecisionPoint, actor_for
from fhir_kat.services.access import Access
from fhir_kat.services.fhir_rest import FhirService
from fhir_kat.store import StoredResource, Tx
from fhir_kat.store.store import format_instant
from fhir_kat.terminology import BASE, IDENTIFIERS
from fhir_kat.workflow.shapes import is_referral_task

log = logging.getLogger("fhir_kat.feedback")
#: Each participant's program timeline for a set of patients (``OutcomeService.timelines``).
Timelines = Callable[[Tx, set[str]], dict[str, Timeline]]

#: Sharing clinical content with the referring provider serves the participant's care.
FEEDBACK_PURPOSE = "TREAT"
LOINC = "http://loinc.org"
#: LOINC 34133-9 "Summary of episode note": in HL7 R4 ValueSet c80-doc-typecodes (the
#: DocumentReference/Composition type codes), checked in hl7.fhir.r4.examples 4.0.1.
DOCUMENT_TYPE = {"system": LOINC, "code": "34133-9", "display": "Summary of episode note"}
SECTIONS = f"{BASE}/CodeSystem/kat-feedback-section"
#: LOINC section codes (all in HL7 R4 ValueSet doc-section-codes, hl7.fhir.r4.examples 4.0.1),
#: as HL7 C-CDA uses them: Reason for Referral Section (IHE 1.3.6.1.4.1.19376.1.5.3.1.3.1),
#: Encounters Section (2.16.840.1.113883.10.20.22.2.22.1), Medications Administered Section
#: (2.16.840.1.113883.10.20.22.2.38, CONF:1098-15384), Plan of Treatment Section
#: (2.16.840.1.113883.10.20.22.2.10). Scores and safety events have no verified LOINC section
#: code: local codes (CodeSystem kat-feedback-section).
REASON_SECTION = {"system": LOINC, "code": "42349-1", "display": "Reason for referral"}
ATTENDANCE_SECTION = {"system": LOINC, "code": "46240-8", "display": "History of encounters"}
SESSIONS_SECTION = {"system": LOINC, "code": "29549-3", "display": "Medications administered"}
PLAN_SECTION = {"system": LOINC, "code": "18776-5", "display": "Plan of care note"}
NOT_STARTED = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/list-empty-reason",
            "code": "notstarted",
            "display": "Not Started",
        }
    ]
}
SERVICE_SYSTEM = f"{BASE}/CodeSystem/kat-service"
PHQ9_URL = f"{BASE}/Questionnaire/phq-9"
ITEM9 = "phq9-9"
#: Referral Task statuses that end the program: each gets a draft feedback document.
ENDED = ("completed", "cancelled", "failed")
#: Writes that change what a draft document says (scores come with their response).
REFRESHED_BY = frozenset(
    {"QuestionnaireResponse", "AdverseEvent", "Flag", "MedicationAdministration"}
)
SYSTEM_NAMES = {
    "http://snomed.info/sct": "SNOMED CT",
    "http://hl7.org/fhir/sid/icd-10": "ICD-10",
    "http://hl7.org/fhir/sid/icd-10-ca": "ICD-10-CA",
}
DOCUMENT_IDS = f"{IDENTIFIERS}/feedback-document"
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
        timelines: Timelines | None = None,
    ) -> None:
        self.fhir = fhir
        self.partners = partners
        self.consent = consent
        self.catalogue = catalogue
        self.clock = clock
        #: Each participant's program (``OutcomeService.timelines``): the same windows as the
        #: outcome measure. Without it, the referral Task's own executionPeriod.
        self.timelines = timelines
        #: Any referrer endpoint configured at all? (Spares the look-ups on every Task write.)
        self.pushing = any(REFERRAL_STATUS in (p.artifact_kinds or ()) for p in partners.values())

    # ------------------------------------------------------------------ hooks and rule

    def on_write(self, tx: Tx, stored: StoredResource, created: bool) -> None:
        if stored.deleted:
            return
        if stored.type == "Composition":
            self._on_composition(tx, stored, created)
            return
        if stored.type in REFRESHED_BY and stored.patient_id is not None:
            # New data for a participant whose document is still a draft: the draft follows,
            # once per transaction (a response's Observations and Flags come with it).
            pid = stored.patient_id
            tx.defer(f"feedback-refresh:{pid}", lambda t: self._refresh(t, pid))
            return
        if stored.type != "Task":
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
        if status_changed and task.get("status") in ENDED:
            tx.defer(f"feedback:{stored.id}", lambda t: self._draft(t, stored.id))

    def check_rule(self, tx: Tx, body: dict[str, Any], current: StoredResource | None) -> None:
        """A feedback document is final only when a clinician attests it (an attester with a
        party and a time) and the recommendations / plan section has been written."""
        if not is_feedback(body) or body.get("status") not in ("final", "amended"):
            return
        problems = []
        attesters = [
            a
            for a in body.get("attester", [])
            if a.get("party", {}).get("reference") and a.get("time")
        ]
        if not attesters:
            problems.append(
                issue(
                    "required",
                    "a final feedback document is attested by a program clinician "
                    "(attester with party and time)",
                    "Composition.attester",
                )
            )
        plan = next(
            (
                (i, sec)
                for i, sec in enumerate(body.get("section", []))
                if _code(sec.get("code")) == PLAN_SECTION["code"]
            ),
            None,
        )
        if plan is None or plan[1].get("emptyReason") or not _narrative(plan[1]):
            where = f"Composition.section[{plan[0]}]" if plan else "Composition.section"
            problems.append(
                issue(
                    "required",
                    "a final feedback document carries the clinician's recommendations / plan "
                    "(section 18776-5 with text, no emptyReason)",
                    where,
                )
            )
        if problems:
            raise Unprocessable(problems)

    def _on_composition(self, tx: Tx, stored: StoredResource, created: bool) -> None:
        body = stored.json()
        if not is_feedback(body) or body.get("status") not in ("final", "amended"):
            return
        before = tx.vread("Composition", stored.id, stored.version_id - 1) if not created else None
        was = before.json().get("status") if before is not None and not before.deleted else None
        if was in ("final", "amended"):
            return
        tx.defer(f"feedback-release:{stored.id}", lambda t: self._release(t, stored.id))

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
        if found.json().get("status") not in ("final", "amended"):
            return False  # a draft is the program's until a clinician attests it
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

    def _draft(self, tx: Tx, task_id: str) -> None:
        """At program end: the draft document, written once (a clinician completes it)."""
        stored = tx.get("Task", task_id)
        if stored is None or stored.deleted or stored.patient_id is None:
            return
        task = stored.json()
        if task.get("status") not in ENDED:
            return
        cid = feedback_id(task_id)
        existing = tx.get("Composition", cid)
        if existing is not None and not existing.deleted:
            return
        self.fhir.update_in(tx, self.compose(tx, task, stored.patient_id))

    def _refresh(self, tx: Tx, patient_id: str) -> None:
        """Re-compose every draft feedback document of the participant from the current data,
        keeping what a clinician has written in the plan section."""
        query = SearchQuery(
            "Task",
            criteria=(Criterion("patient", "reference", "", (("Patient", patient_id),), ""),),
            count=50,
        )
        for row in tx.matches(query):
            task = row.json()
            if row.deleted or not is_referral_task(task) or task.get("status") not in ENDED:
                continue
            current = tx.get("Composition", feedback_id(row.id))
            if current is None or current.deleted:
                continue
            draft = current.json()
            if draft.get("status") != "preliminary":
                continue
            fresh = self.compose(tx, task, patient_id)
            written = [
                sec
                for sec in draft.get("section", [])
                if _code(sec.get("code")) == PLAN_SECTION["code"]
            ]
            fresh["section"] = [
                written[0] if written and _code(sec.get("code")) == PLAN_SECTION["code"] else sec
                for sec in fresh["section"]
            ]
            same = {k: v for k, v in draft.items() if k not in ("meta", "date")} == {
                k: v for k, v in fresh.items() if k != "date"
            }
            if not same:
                self.fhir.update_in(tx, fresh)

    def _release(self, tx: Tx, composition_id_: str) -> None:
        """A feedback document just became final: linked from the referral Task and sent to
        the referrer — only with the participant's consent to share with it for TREAT."""
        stored = tx.get("Composition", composition_id_)
        if stored is None or stored.deleted:
            return
        composition = stored.json()
        target = next(
            (
                split_reference(d.get("reference", ""))
                for e in composition.get("event", [])
                for d in e.get("detail", [])
            ),
            None,
        )
        task_row = tx.get(*target) if target and target[0] == "Task" else None
        if task_row is None or task_row.deleted or task_row.patient_id is None:
            return
        task = task_row.json()
        wanted = f"Composition/{composition_id_}"
        if any(
            o.get("valueReference", {}).get("reference") == wanted for o in task.get("output", [])
        ):
            return
        if not self.permits(tx, task, task_row.patient_id):
            log.info("feedback document withheld: consent", extra={"task": task_row.id})
            return
        task.pop("meta", None)
        task["output"] = [
            {
                "type": {"coding": [DOCUMENT_TYPE], "text": "Program feedback document"},
                "valueReference": {"reference": wanted},
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
                task_row.patient_id,
                document=document_bundle(tx, composition_id_, self.clock()),
                consent_purpose=FEEDBACK_PURPOSE,
            )

    def compose(self, tx: Tx, task: dict[str, Any], patient_id: str) -> dict[str, Any]:
        """The draft document of a referral that has ended."""
        now = format_instant(self.clock())
        cid = feedback_id(task["id"])
        patient = ("Patient", patient_id)
        timeline = self._timeline(tx, task, patient_id)
        window = _window(timeline, self.catalogue.measure, task)
        sessions = _search(tx, "MedicationAdministration", "patient", patient)
        sessions.sort(key=lambda r: str(_effective(r)))
        encounters = _search(tx, "Encounter", "patient", patient)
        events = _search(tx, "AdverseEvent", "subject", patient)
        flags = [f for f in _search(tx, "Flag", "patient", patient) if _flag_in_program(f, window)]
        business = task.get("businessStatus", {}).get("text", "")
        began = _day(timeline.start[0]) if timeline else "not recorded"
        ended = _day(timeline.end[0]) if timeline and timeline.end else "not recorded"
        attendance = [
            f"Referral received: {task.get('authoredOn', 'not recorded')}.",
            f"Program status: {task.get('status')}" + (f" ({business})." if business else "."),
            f"Program period: {began} to {ended}.",
            f"KaT sessions given: {len(sessions)}; program encounters recorded: {len(encounters)}.",
        ]
        reason_lines, reason_refs = _referral_reason(tx, task)
        weights = _weights(tx, sessions)
        session_lines = [_session_line(ma, weights.get(ma["id"])) for ma in sessions]
        score_lines, score_refs = self._scores(tx, patient, timeline)
        score_lines += _item9_lines(tx, patient, window)
        safety_lines = [_event_line(ae) for ae in events] + [_flag_line(f) for f in flags]
        sections = [
            _section(
                REASON_SECTION, "Reason for referral and diagnoses", reason_lines, reason_refs
            ),
            _section(ATTENDANCE_SECTION, "Attendance", attendance, []),
            _section(SESSIONS_SECTION, "KaT sessions", session_lines, _refs(sessions)),
            _section(_local("outcome-scores"), "Baseline and post scores", score_lines, score_refs),
            _section(_local("safety-events"), "Safety events", safety_lines, _refs(events + flags)),
            _plan_placeholder(),
        ]
        event: dict[str, Any] = {
            "code": [{"coding": [{"system": SERVICE_SYSTEM, "code": "kat-program"}]}],
            "detail": [{"reference": f"Task/{task['id']}"}],
        }
        if timeline is not None:
            event["period"] = {"start": _day(timeline.start[0])}
            if timeline.end is not None:
                event["period"]["end"] = _day(timeline.end[0])
        return {
            "resourceType": "Composition",
            "id": cid,
            "identifier": {"system": DOCUMENT_IDS, "value": cid},
            "status": "preliminary",
            "type": {"coding": [DOCUMENT_TYPE], "text": "Program feedback"},
            "subject": {"reference": f"Patient/{patient_id}"},
            "date": now,
            "author": [task["owner"]] if task.get("owner") else [{"display": "KaT program"}],
            "title": "Ketamine-assisted therapy program: feedback to the referring provider",
            "event": [event],
            "section": sections,
        }

    def _timeline(self, tx: Tx, task: dict[str, Any], patient_id: str) -> Timeline | None:
        if self.timelines is not None:
            found = self.timelines(tx, {patient_id}).get(patient_id)
            if found is not None:
                return found
        period = task.get("executionPeriod") or {}
        start = parse_date_range(str(period.get("start", "")))
        end = parse_date_range(str(period.get("end", ""))) if period.get("end") else None
        if start is None:
            return None
        return Timeline(start, end, task.get("status") == "completed")

    def _scores(
        self, tx: Tx, patient: tuple[str, str], timeline: Timeline | None
    ) -> tuple[list[str], list[str]]:
        """Per instrument, the baseline and post scores on the outcome measure's windows, and
        what changed: "improved" (by the program's definition) only when the baseline screened
        positive and the score did not rise by the instrument's safety threshold; otherwise the
        change and its direction."""
        lines: list[str] = []
        refs: list[str] = []
        rules = self.catalogue.measure
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
            points: list[ScorePoint] = []
            ids: dict[tuple[datetime, float], str] = {}
            for row in tx.matches(query):
                obs = row.json()
                value = obs.get("valueQuantity", {}).get("value", obs.get("valueInteger"))
                when = parse_date_range(str(obs.get("effectiveDateTime", "")))
                derived = any(
                    d.get("reference", "").startswith("QuestionnaireResponse/")
                    for d in obs.get("derivedFrom", [])
                )
                if obs.get("status") in FINAL and value is not None and when and derived:
                    point = ScorePoint(patient[1], when[0], float(value))
                    points.append(point)
                    ids.setdefault((point.when, point.score), row.id)
            if not points:
                continue
            if timeline is None:
                lines.append(f"{inst.title}: no program period recorded to place the scores on.")
                continue
            baseline = baseline_of(points, timeline, rules)
            post = post_of(points, timeline, rules)
            if baseline is None:
                lines.append(f"{inst.title}: no baseline score in the month before the program.")
                continue
            refs.append(f"Observation/{ids[(baseline.when, baseline.score)]}")
            line = (
                f"{inst.title}: baseline {baseline.score:g} ({inst.band(baseline.score).display}) "
                f"on {_day(baseline.when)}"
            )
            if post is None:
                lines.append(line + "; no post-program score in the window after the program.")
                continue
            refs.append(f"Observation/{ids[(post.when, post.score)]}")
            line += (
                f"; post {post.score:g} ({inst.band(post.score).display}) on {_day(post.when)}"
                f": {verdict(inst, baseline.score, post.score)}"
            )
            lines.append(line + ".")
        return lines, refs


def verdict(inst: Instrument, baseline: float, post: float) -> str:
    """How the feedback document describes a change: "improved" / "not improved" by the
    program's definition only when the baseline screened positive; never "improved" when the
    score rose by the instrument's safety threshold (issue 17: PCL-5 12 → 30 was "improved")."""
    change = post - baseline
    direction = "lower (better)" if change < 0 else "higher (worse)" if change > 0 else "unchanged"
    moved = f"change {change:+g}, {direction}" if change else "unchanged"
    rise = inst.safety.get("rise")
    if rise is not None and change >= rise:
        return f"{moved} — a rise at or above the safety threshold ({rise:g} points)"
    if not inst.positive(baseline):
        return f"baseline below the screening cut-off ({inst.positive_at:g}); {moved}"
    word = "improved" if inst.improved(baseline, post) else "not improved"
    return f"{word} by the program's definition ({moved})"


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


def is_feedback(resource: Mapping[str, Any]) -> bool:
    ident = resource.get("identifier") or {}
    return resource.get("resourceType") == "Composition" and ident.get("system") == DOCUMENT_IDS


def _local(code: str) -> dict[str, str]:
    return {"system": SECTIONS, "code": code}


def _code(concept: Any) -> str:
    if not isinstance(concept, Mapping):
        return ""
    return next((str(c.get("code", "")) for c in concept.get("coding", [])), "")


def _narrative(section: Mapping[str, Any]) -> str:
    """The section's narrative as plain text ("" when it has none)."""
    div = section.get("text", {}).get("div", "")
    return html.unescape(re.sub(r"<[^>]+>", " ", str(div))).strip()


def _plan_placeholder() -> dict[str, Any]:
    section = _section(
        PLAN_SECTION,
        "Recommendations and plan",
        [],
        [],
        empty_text="To be written by a program clinician before this document is final.",
    )
    section["emptyReason"] = NOT_STARTED
    return section


def _day(moment: datetime) -> str:
    return moment.date().isoformat()


def _window(
    timeline: Timeline | None, rules: MeasureRules, task: Mapping[str, Any]
) -> tuple[datetime, datetime]:
    """The span the document covers: the baseline window before the program to the post
    window after it (or the referral's date to far ahead when no period is recorded)."""
    if timeline is None:
        start = parse_date_range(str(task.get("authoredOn", "")))
        low = start[0] if start else datetime.min
        return low, datetime.max
    low = timeline.start[0] - timedelta(days=rules.baseline_days_before_start)
    high = (
        timeline.end[1] + timedelta(days=rules.post_days_after_end[1])
        if timeline.end
        else datetime.max
    )
    return low, high


def _flag_in_program(flag: Mapping[str, Any], window: tuple[datetime, datetime]) -> bool:
    """Raised before the document's span ended, and still active or resolved (status inactive
    with period.end) during it; a Flag raised after it belongs to no program the document
    describes."""
    raised = parse_date_range(str(flag.get("period", {}).get("start", "")))
    if raised is not None and raised[0] > window[1]:
        return False
    if flag.get("status") == "active":
        return True
    if flag.get("status") != "inactive":
        return False  # entered-in-error
    ended = parse_date_range(str(flag.get("period", {}).get("end", "")))
    return ended is not None and window[0] <= ended[0] <= window[1]


def _flag_line(flag: Mapping[str, Any]) -> str:
    period = flag.get("period", {})
    raised = str(period.get("start", "date not recorded"))[:10]
    if flag.get("status") == "active":
        state = "still active"
    else:
        state = f"resolved {str(period.get('end', ''))[:10]}"
    return f"Safety flag: {_text(flag.get('code'), 'unspecified')} — raised {raised}, {state}."


def _event_line(ae: Mapping[str, Any]) -> str:
    line = "Adverse event: " + _text(ae.get("event"), "unspecified")
    if ae.get("seriousness"):
        line += f" ({_text(ae.get('seriousness'), '')})"
    line += f", {str(ae.get('date', 'date not recorded'))[:16]}"
    if ae.get("outcome"):
        line += f"; outcome: {_text(ae.get('outcome'), '')}"
    return line + "."


def _referral_reason(tx: Tx, task: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The referrer's reason and the diagnoses the referral carried (its ServiceRequest's
    reasonCode and reasonReference Conditions)."""
    target = split_reference(task.get("focus", {}).get("reference", ""))
    found = tx.get(*target) if target else None
    if found is None or found.deleted:
        return ["No referral request on record."], []
    sr = found.json()
    lines = [
        f"Reason for referral: {c['text']}." for c in sr.get("reasonCode", []) if c.get("text")
    ]
    refs = []
    for ref in sr.get("reasonReference", []):
        cond_ref = split_reference(ref.get("reference", ""))
        cond = tx.get(*cond_ref) if cond_ref else None
        if cond is None or cond.deleted:
            continue
        body = cond.json()
        codes = ", ".join(
            f"{SYSTEM_NAMES.get(c.get('system', ''), c.get('system', ''))} {c.get('code')}"
            for c in body.get("code", {}).get("coding", [])
            if c.get("system") in SYSTEM_NAMES
        )
        lines.append(
            f"Diagnosis: {_text(body.get('code'), 'not coded')}"
            + (f" ({codes})." if codes else ".")
        )
        refs.append(f"Condition/{cond.id}")
    return lines or ["No reason or diagnosis on record."], refs


def _weights(tx: Tx, sessions: list[dict[str, Any]]) -> dict[str, float]:
    """Each session's body weight in kg (the Observation its MedicationAdministration cites)."""
    out = {}
    for ma in sessions:
        for info in ma.get("supportingInformation", []):
            target = split_reference(info.get("reference", ""))
            found = tx.get(*target) if target and target[0] == "Observation" else None
            if found is None or found.deleted:
                continue
            q = found.json().get("valueQuantity", {})
            if q.get("code") == "kg" and isinstance(q.get("value"), int | float):
                out[ma["id"]] = float(q["value"])
    return out


def _session_line(ma: Mapping[str, Any], weight: float | None) -> str:
    line = f"{_effective(ma) or 'date not recorded'}: {ma.get('status', '')}"
    if _route(ma):
        line += f", {_route(ma)}"
    dose = ma.get("dosage", {}).get("dose", {})
    if isinstance(dose.get("value"), int | float) and dose.get("code", dose.get("unit")) == "mg":
        line += f", {dose['value']:g} mg"
        if weight:
            line += f" ({dose['value'] / weight:.2f} mg/kg at {weight:g} kg)"
    elif _dose(ma):
        line += f", {_dose(ma)}"
    return line


def _item9_lines(tx: Tx, patient: tuple[str, str], window: tuple[datetime, datetime]) -> list[str]:
    """Every PHQ-9 item 9 answer in the span the document covers (the suicidal-ideation item)."""
    query = SearchQuery(
        "QuestionnaireResponse",
        criteria=(Criterion("patient", "reference", "", (patient,), ""),),
        count=1000,
    )
    answers = []
    for row in tx.matches(query):
        qr = row.json()
        if str(qr.get("questionnaire", "")).split("|")[0] != PHQ9_URL:
            continue
        when = parse_date_range(str(qr.get("authored", "")))
        if when is None or not window[0] <= when[0] <= window[1]:
            continue
        item = next((i for i in qr.get("item", []) if i.get("linkId") == ITEM9), None)
        coding = ((item or {}).get("answer") or [{}])[0].get("valueCoding") or {}
        answers.append((when[0], coding.get("display") or coding.get("code") or "not answered"))
    if not answers:
        return []
    answers.sort()
    told = "; ".join(f"{_day(w)}: {a}" for w, a in answers)
    return [f"PHQ-9 item 9 (thoughts of being better off dead or of self-harm): {told}."]


def _search(tx: Tx, rtype: str, param: str, target: tuple[str, str]) -> list[dict[str, Any]]:
    query = SearchQuery(
        rtype, criteria=(Criterion(param, "reference", "", (target,), ""),), count=1000
    )
    rows = tx.matches(query)
    return [r.json() for r in rows if not r.deleted]


def _refs(resources: list[dict[str, Any]]) -> list[str]:
    return [f"{r['resourceType']}/{r['id']}" for r in resources]


def _section(
    code: Mapping[str, str],
    title: str,
    lines: list[str],
    refs: list[str],
    *,
    empty_text: str = "None recorded.",
) -> dict[str, Any]:
    items = "".join(f"<li>{html.escape(line, quote=False)}</li>" for line in lines)
    div = (
        f'<div xmlns="http://www.w3.org/1999/xhtml"><ul>{items}</ul></div>'
        if lines
        else f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{html.escape(empty_text)}</p></div>'
    )
    section: dict[str, Any] = {
        "title": title,
        "code": {"coding": [{**code, "display": code.get("display", title)}]},
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
    "is_feedback",
    "referrer_organizations",
    "verdict",
]
