"""The referral workflow (HL7 BSeR / Gravity pattern): triage, intake steps, state machine.

Owns: the write rules that guard referral Tasks (code ``fulfill``) to the state machine of
``mappings/workflow/referral-task.yaml`` and to the intake gate (a referral is ``accepted`` for
dosing only when the three-step intake is complete and every hold is cleared by the step that
owns it, or staff record an override), and that refuse a referrer's ServiceRequest that is not
a program referral (422 naming the code to send); the write hooks that (1) give a referral
ServiceRequest its Task when the referrer sent none, (2) triage a new referral from its coded
data (``mappings/workflow/eligibility.yaml``) at the end of its transaction, (3) move the Task
as intake steps are recorded, and (4) mark it in progress at the participant's first KaT
session. Must not: parse HTTP. Every change goes through ``FhirService.update_in``, so the
same rules, audit and outbox apply.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from fhir_kat.errors import BadRequest, Conflict, Forbidden, NotFound, Unprocessable, issue
from fhir_kat.search import Criterion, SearchQuery, parse_date_range, split_reference
from fhir_kat.services.access import Access
from fhir_kat.services.fhir_rest import FhirService, WriteResult, caller_of, require_access
from fhir_kat.store import StoredResource, Tx
from fhir_kat.store.store import format_instant
from fhir_kat.terminology.criteria import Subsumption
from fhir_kat.workflow.chart import age_on, chart_facts, codings_of
from fhir_kat.workflow.shapes import (
    INTAKE,
    SERVICE,
    TASK_CODES,
    booking_problems,
    is_intake_step,
    is_program_referral,
    is_referral_task,
    is_session_booking,
)
from fhir_kat.workflow.states import (
    allowed,
    business_status,
    intake,
    machine,
    needs_reason,
    referrer_may_set,
)
from fhir_kat.workflow.triage import Decision, Finding, ReferralFacts, triage

PROGRAM_CODE = "kat-program"
#: Statuses in which a referral has been accepted for dosing (reached only through the gate).
DOSING = frozenset({"accepted", "in-progress", "completed"})
#: Statuses the intake steps move a referral between.
IN_INTAKE = frozenset({"requested", "received", "on-hold", "accepted"})
NAMESPACE = uuid.UUID("6f1d3c52-7a0e-5b8e-9d4e-6b6174000001")  # the mapping engine's


#: A referral Task's elements that belong to the workflow (program staff and the service).
WORKFLOW_ELEMENTS = ("status", "businessStatus", "statusReason", "output", "owner")


def session_booking_rule(tx: Tx, body: dict[str, Any], current: StoredResource | None) -> None:
    """A KaT session booking (an Appointment of kat-service#kat-session) names its one
    Patient, its session number, and when (``booking_problems``); 422 naming each problem."""
    if not is_session_booking(body):
        return
    problems = booking_problems(body)
    if problems:
        raise Unprocessable([issue("business-rule", m, f"Appointment.{e}") for m, e in problems])


def referrer_request_rule(tx: Tx, body: dict[str, Any], current: StoredResource | None) -> None:
    """A referrer's ServiceRequest is a referral to the program: it carries the program's
    service code and intent ``order``, or it is refused (422) saying what to send — a request
    the service would store without a Task would never be answered (issue 17). Staff may store
    other ServiceRequests."""
    access = caller_of(tx)
    if body.get("resourceType") != "ServiceRequest" or access is None or access.role != "referrer":
        return
    problems = []
    if not any(
        c.get("system") == SERVICE and c.get("code") == PROGRAM_CODE
        for c in body.get("code", {}).get("coding", [])
    ):
        problems.append(
            issue(
                "code-invalid",
                "a referral to the program needs ServiceRequest.code with the coding "
                f"{SERVICE}|{PROGRAM_CODE}",
                "ServiceRequest.code",
            )
        )
    if body.get("intent") != "order":
        problems.append(
            issue("value", "a referral to the program has intent 'order'", "ServiceRequest.intent")
        )
    if problems:
        raise Unprocessable(problems)


def task_transition_rule(tx: Tx, body: dict[str, Any], current: StoredResource | None) -> None:
    """Refuse a referral Task status change the state machine does not allow (409), and a
    rejection, cancellation, failure or hold without a reason (422). Moving a referral is a
    program staff decision on every route: a referrer creates its Task as ``requested`` and
    may afterwards only withdraw it (``referrer_may`` in ``referral-task.yaml``); an intake
    step (which moves the Task) is recorded by staff alone (403 otherwise)."""
    access = caller_of(tx)
    referrer = access is not None and access.role == "referrer"
    if referrer and is_intake_step(body):
        raise Forbidden(
            issue("forbidden", "intake steps are recorded by program staff", "Observation.code")
        )
    if not is_referral_task(body):
        return
    if referrer:
        _referrer_task_change(body, current)
    new = body.get("status", "")
    if current is not None and not current.deleted:
        old = current.json().get("status", "")
        if not allowed(old, new):
            nexts = ", ".join(machine()["transitions"].get(old, [])) or "none (final)"
            raise Conflict(
                issue(
                    "business-rule",
                    f"a referral cannot move from {old} to {new}; allowed next: {nexts}",
                    "Task.status",
                )
            )
        changed = old != new
    else:
        changed = True
    if changed and needs_reason(new) and not body.get("statusReason"):
        raise Unprocessable(
            issue("required", f"a {new} referral needs a statusReason", "Task.statusReason")
        )


@dataclass(frozen=True)
class IntakeState:
    """Where a referral's intake stands: the latest decision of each step, and the triage
    findings (holds) no owning step has cleared yet."""

    decisions: dict[str, str]  # step code -> cleared | declined | needs-review
    open_holds: tuple[Finding, ...]
    decision: Decision

    @property
    def cleared(self) -> set[str]:
        return {s for s, d in self.decisions.items() if d == "cleared"}

    @property
    def complete(self) -> bool:
        return set(intake()["steps"]) <= self.cleared and not self.waiting

    @property
    def declined(self) -> list[str]:
        return [s for s, d in self.decisions.items() if d == "declined"]

    @property
    def waiting(self) -> list[str]:
        """Steps whose latest decision asks for clinician review."""
        return [s for s, d in self.decisions.items() if d == "needs-review"]


def _referrer_task_change(body: dict[str, Any], current: StoredResource | None) -> None:
    old = current.json() if current is not None and not current.deleted else None
    if old is None:
        received = {
            (c.get("system"), c.get("code"))
            for c in (body.get("businessStatus") or {}).get("coding", [])
        } <= {(machine()["business_status_system"], "received")}
        if (
            body.get("status") != "requested"
            or not received
            or body.get("statusReason")
            or (body.get("output"))
        ):
            raise Forbidden(
                issue(
                    "forbidden",
                    "a referrer creates its referral Task as requested (businessStatus, if "
                    "any, received), without statusReason or output",
                    "Task.status",
                )
            )
        return
    changed = {k for k in WORKFLOW_ELEMENTS if old.get(k) != body.get(k)}
    if not changed:
        return
    new = body.get("status", "")
    withdrawing = new != old.get("status") and new in referrer_may_set(old.get("status", ""))
    if not withdrawing or changed - {"status", "statusReason", "businessStatus"}:
        raise Forbidden(
            issue(
                "forbidden",
                "moving a referral is a program staff decision; a referrer may only withdraw "
                "its referral (status cancelled, with a statusReason) before the program starts",
                "Task.status",
            )
        )


class ReferralWorkflow:
    def __init__(
        self,
        fhir: FhirService,
        *,
        clock: Callable[[], datetime] | None = None,
        minimum_age: int | None = None,
        oracle: Subsumption | None = None,
    ) -> None:
        self.fhir = fhir
        self.clock = clock
        self.minimum_age = minimum_age
        self.oracle = oracle

    def on_write(self, tx: Tx, stored: StoredResource, created: bool) -> None:
        if stored.deleted:
            return
        if stored.type == "ServiceRequest" and created:
            resource = stored.json()
            if is_program_referral(resource):
                tx.defer(f"referral-task:{stored.id}", lambda t: self._ensure_task(t, stored.id))
        elif stored.type == "Task" and created:
            resource = stored.json()
            if is_referral_task(resource) and resource.get("status") in ("requested", "received"):
                tx.defer(f"triage:{stored.id}", lambda t: self._triage(t, stored.id))
        elif stored.type == "Observation":
            self._intake_step(tx, stored.json())
        elif stored.type == "MedicationAdministration" and created:
            self._first_session(tx, stored.json())

    # ------------------------------------------------------------------ task and triage

    def _ensure_task(self, tx: Tx, sr_id: str) -> None:
        if self._tasks_for(tx, "focus", ("ServiceRequest", sr_id)):
            return
        sr = tx.get("ServiceRequest", sr_id)
        if sr is None:
            return
        body = sr.json()
        task_id = str(uuid.uuid5(NAMESPACE, f"Task|ServiceRequest/{sr_id}"))
        task: dict[str, Any] = {
            "resourceType": "Task",
            "id": task_id,
            # The referrer's identifier when it sent one; else the Task's own, as a URI.
            "identifier": body.get("identifier")
            or [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{task_id}"}],
            "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
            "status": "requested",
            "businessStatus": business_status("received"),
            "intent": "order",
            "code": {"coding": [{"system": TASK_CODES, "code": "fulfill"}]},
            "focus": {"reference": f"ServiceRequest/{sr_id}"},
            "for": body.get("subject"),
            "authoredOn": body.get("authoredOn"),
            "requester": body.get("requester"),
            "owner": (body.get("performer") or [None])[0],
        }
        self.fhir.update_in(tx, {k: v for k, v in task.items() if v not in (None, [], {})})

    def _tasks_for(self, tx: Tx, param: str, target: tuple[str, str]) -> list[StoredResource]:
        query = SearchQuery(
            "Task", criteria=(Criterion(param, "reference", "", (target,), ""),), count=50
        )
        rows = tx.matches(query)
        return [r for r in rows if is_referral_task(r.json())]

    def facts(
        self, tx: Tx, sr: dict[str, Any], task: dict[str, Any] | None = None
    ) -> ReferralFacts:
        """What triage reads: every Condition and AllergyIntolerance of the patient (with their
        status), those the ServiceRequest references, its coded reasons, the referral facts it
        points at (kat-intake Observations), and the patient's age when the referral was
        written — read by ``workflow.chart``, as the CDS Hooks service reads an EHR's chart."""
        patient = split_reference(sr.get("subject", {}).get("reference", ""))
        found: dict[str, dict[str, Any]] = {}
        if patient is not None and patient[0] == "Patient":
            for rtype, param in (("Condition", "patient"), ("AllergyIntolerance", "patient")):
                query = SearchQuery(
                    rtype, criteria=(Criterion(param, "reference", "", (patient,), ""),), count=1000
                )
                for row in tx.matches(query):
                    if not row.deleted:
                        found[f"{row.type}/{row.id}"] = row.json()
        refs = [
            r.get("reference", "")
            for r in sr.get("reasonReference", []) + sr.get("supportingInfo", [])
        ]
        targets = [t for t in (split_reference(ref) for ref in refs) if t]
        tx.preload(targets + ([patient] if patient else []))  # one query for all of them
        for target in targets:
            referenced = tx.get(*target)
            if referenced is not None and not referenced.deleted:
                found.setdefault(f"{referenced.type}/{referenced.id}", referenced.json())
        return chart_facts(
            found.values(), sr.get("reasonCode", []), self._age(tx, patient, sr, task)
        )

    def _age(
        self,
        tx: Tx,
        patient: tuple[str, str] | None,
        sr: dict[str, Any],
        task: dict[str, Any] | None,
    ) -> int | None:
        """Whole years from Patient.birthDate to the referral's date (ServiceRequest.authoredOn,
        else the Task's, else now); None when no birth date is known."""
        stored = tx.get(*patient) if patient is not None and patient[0] == "Patient" else None
        if stored is None:
            return None
        when = parse_date_range(str(sr.get("authoredOn") or (task or {}).get("authoredOn") or ""))
        on: date = (
            when[0].date() if when else (self.clock() if self.clock else datetime.now()).date()
        )
        return age_on(str(stored.json().get("birthDate", "")), on)

    def judge(self, facts: ReferralFacts) -> Decision:
        """Triage of ``facts`` with this installation's settings (minimum age, terminology
        server): the one decision the referral workflow and the CDS Hooks cards share."""
        return triage(facts, minimum_age=self.minimum_age, oracle=self.oracle)

    def decide(self, tx: Tx, task: dict[str, Any]) -> Decision | None:
        """Triage of the referral the Task is about (None when its ServiceRequest is gone)."""
        focus = split_reference(task.get("focus", {}).get("reference", ""))
        sr = tx.get(*focus) if focus else None
        if sr is None or sr.deleted:
            return None
        return self.judge(self.facts(tx, sr.json(), task))

    def _triage(self, tx: Tx, task_id: str) -> None:
        stored = tx.get("Task", task_id)
        if stored is None or stored.deleted:
            return
        task = stored.json()
        if task.get("status") not in ("requested", "received"):
            return
        decision = self.decide(tx, task)
        if decision is None:
            return
        status = {"eligible": "received", "rejected": "rejected", "on-hold": "on-hold"}[
            decision.outcome
        ]
        updated = dict(
            task, status=status, businessStatus=business_status(decision.business_status)
        )
        if decision.findings:
            label = "Not eligible" if decision.outcome == "rejected" else "Needs clinician review"
            updated["statusReason"] = {"text": reason_text(label, decision.findings)}
        else:
            updated.pop("statusReason", None)
        updated.pop("meta", None)
        self.fhir.update_in(tx, updated)

    # ------------------------------------------------------------------ intake and sessions

    def intake_state(self, tx: Tx, task: dict[str, Any]) -> IntakeState | None:
        """The latest decision of each intake step recorded for this referral (Observations
        whose focus is the Task), and the holds of its triage that no owning step has cleared."""
        decision = self.decide(tx, task)
        if decision is None:
            return None
        query = SearchQuery(
            "Observation",
            criteria=(Criterion("focus", "reference", "", (("Task", task["id"]),), ""),),
            count=1000,
        )
        steps = intake()["steps"]
        latest: dict[str, tuple[datetime, int, str]] = {}
        for row in tx.matches(query):
            obs = row.json()
            if row.deleted or obs.get("status") not in ("final", "amended", "corrected"):
                continue
            step = next(
                (
                    c.code
                    for c in codings_of(obs.get("code"))
                    if c.system == INTAKE and c.code in steps
                ),
                None,
            )
            value = next(
                (c.code for c in codings_of(obs.get("valueCodeableConcept")) if c.system == INTAKE),
                None,
            )
            when = parse_date_range(str(obs.get("effectiveDateTime", "")))
            if step is None or value is None:
                continue
            key = (when[0] if when else datetime.min, row.seq, value)
            if step not in latest or key[:2] > latest[step][:2]:
                latest[step] = key
        decisions = {step: v[2] for step, v in latest.items()}
        cleared = {s for s, d in decisions.items() if d == "cleared"}
        open_holds = tuple(f for f in decision.findings if not (set(f.cleared_by) & cleared))
        return IntakeState(decisions, open_holds, decision)

    def _intake_step(self, tx: Tx, obs: dict[str, Any]) -> None:
        steps = intake()["steps"]
        step = next(
            (c.code for c in codings_of(obs.get("code")) if c.system == INTAKE and c.code in steps),
            None,
        )
        if step is None:
            return
        for focus in obs.get("focus", []):
            target = split_reference(focus.get("reference", ""))
            if target is None or target[0] != "Task":
                continue
            stored = tx.get(*target)
            if stored is None or stored.deleted:
                continue
            task = stored.json()
            if not is_referral_task(task) or task.get("status") not in IN_INTAKE:
                continue
            state = self.intake_state(tx, task)
            if state is None:
                continue
            new = self._after_intake(task, state, step)
            if new != task and allowed(task.get("status", ""), new["status"]):
                self.fhir.update_in(tx, new)

    def _after_intake(self, task: dict[str, Any], state: IntakeState, step: str) -> dict[str, Any]:
        """The Task once ``step`` has been recorded: declined by any step → rejected; a step
        asking for review, or a hold its owner has not cleared → on-hold naming what waits for
        whom; all three steps cleared → accepted (intake complete); else received, showing the
        step just cleared. A staff override stands until a step declines or asks for review."""
        task = {k: v for k, v in task.items() if k != "meta"}
        if state.declined:
            return dict(
                task,
                status="rejected",
                businessStatus=business_status("intake-declined"),
                statusReason={"text": f"Declined at intake step {state.declined[0]}"},
            )
        overridden = (
            task.get("status") == "accepted"
            and _code(task.get("businessStatus")) == intake()["override"]
        )
        if state.waiting:
            lines = [f"Needs clinician review after {s}" for s in state.waiting]
            return dict(
                task,
                status="on-hold",
                businessStatus=business_status("needs-review"),
                statusReason={"text": "; ".join(lines)[:1000]},
            )
        if overridden:
            return task
        if state.open_holds:
            return dict(
                task,
                status="on-hold",
                businessStatus=business_status("needs-review"),
                statusReason={"text": reason_text("Needs clinician review", state.open_holds)},
            )
        steps = intake()["steps"]
        if state.complete:
            new = dict(
                task, status="accepted", businessStatus=business_status(intake()["complete"])
            )
        else:
            code = steps[step]["cleared"] if state.decisions.get(step) == "cleared" else "eligible"
            new = dict(task, status="received", businessStatus=business_status(code))
        new.pop("statusReason", None)
        return new

    def acceptance_rule(self, tx: Tx, body: dict[str, Any], current: StoredResource | None) -> None:
        """The intake gate: a referral Task reaches a dosing status (accepted, in-progress,
        completed) from outside them only when its intake is complete with every hold cleared
        by its owner, or with staff's explicit override (businessStatus intake-override and a
        statusReason) — 422 naming what is missing otherwise."""
        if not is_referral_task(body) or body.get("status") not in DOSING:
            return
        before = (
            current.json().get("status") if current is not None and not current.deleted else None
        )
        if before in DOSING:
            return
        override = intake()["override"]
        if _code(body.get("businessStatus")) == override:
            if not (body.get("statusReason") or {}).get("text"):
                raise Unprocessable(
                    issue(
                        "required",
                        "an intake override needs the reason in statusReason.text",
                        "Task.statusReason",
                    )
                )
            return
        state = self.intake_state(tx.system, body) if body.get("id") else None
        if state is not None and state.complete and not state.open_holds:
            return
        missing = [s for s in intake()["steps"] if state is None or s not in state.cleared]
        waits = [
            f"{f.text} (cleared by {' or '.join(f.cleared_by)})"
            for f in (state.open_holds if state is not None else ())
        ]
        parts = [f"intake steps not cleared: {', '.join(missing)}"] if missing else []
        parts += [f"open holds: {'; '.join(waits)}"] if waits else []
        raise Unprocessable(
            issue(
                "business-rule",
                "a referral is accepted for dosing only after the three-step intake ("
                + "; ".join(parts or ["intake incomplete"])
                + f"), or with businessStatus {override} and a statusReason",
                "Task.status",
            )
        )

    def _first_session(self, tx: Tx, ma: dict[str, Any]) -> None:
        subject = split_reference(ma.get("subject", {}).get("reference", ""))
        if subject is None:
            return
        given = ma.get("effectiveDateTime") or (ma.get("effectivePeriod") or {}).get("start")
        for stored in self._tasks_for(tx, "patient", subject):
            task = stored.json()
            if task.get("status") == "accepted":
                task.pop("meta", None)
                # The program's start on the referral (the outcome measure's timeline when no
                # cohort Group records one): the first KaT session.
                period = dict(task.get("executionPeriod") or {})
                if given and not period.get("start"):
                    period["start"] = given
                self.fhir.update_in(
                    tx,
                    dict(
                        task,
                        status="in-progress",
                        businessStatus=business_status("participating"),
                        **({"executionPeriod": period} if period else {}),
                    ),
                )


def reason_text(label: str, findings: tuple[Finding, ...] | list[Finding]) -> str:
    """``Needs clinician review: breastfeeding (…) [cleared by contraindication-check]; …``."""
    parts = []
    for f in findings:
        owners = (
            f" [cleared by {' or '.join(f.cleared_by)}]" if f.cleared_by and not f.rejects else ""
        )
        parts.append(f"{f.text}{owners}")
    return f"{label}: {'; '.join(parts)}"[:1000]


def _code(concept: Any) -> str:
    return next((c.code for c in codings_of(concept)), "")


def end_referral(
    fhir: FhirService,
    task_id: str,
    outcome: Any,
    reason: Any,
    access: Access | None,
    *,
    date: Any = None,
    now: datetime | None = None,
) -> WriteResult:
    """Program end by hand: the referral Task becomes ``completed``, ``cancelled`` or
    ``failed`` with the businessStatus of ``referral-task.yaml`` (``program_end``), the reason
    as ``statusReason`` and the end as ``executionPeriod.end`` (``date``, a FHIR dateTime, when
    staff record it later; else now) — the outcome measure's program end; the state machine
    still decides (409 / 422), and the same write hooks push the change to the referrer and
    write the feedback document."""
    ends: dict[str, str] = machine()["program_end"]
    problems = []
    if outcome not in ends:
        problems.append(issue("value", f"outcome must be one of {', '.join(ends)}", "outcome"))
    if reason is not None and (not isinstance(reason, str) or not reason.strip()):
        problems.append(issue("value", "reason must be a non-empty string", "reason"))
    if date is not None and (not isinstance(date, str) or parse_date_range(date) is None):
        problems.append(issue("value", "date must be a FHIR date or dateTime", "date"))
    if problems:
        raise BadRequest(problems)
    require_access(access, "Task", "update")
    with fhir.write(access) as tx:
        stored = tx.get("Task", task_id, for_update=True)
        if stored is None or stored.deleted or not is_referral_task(stored.json()):
            raise NotFound(issue("not-found", f"no referral Task {task_id}", "Task"))
        task = stored.json()
        task.pop("meta", None)
        task.update(status=outcome, businessStatus=business_status(ends[outcome]))
        ended = date or (format_instant(now) if now is not None else None)
        if ended:
            task["executionPeriod"] = {**(task.get("executionPeriod") or {}), "end": ended}
        if reason:
            task["statusReason"] = {"text": reason.strip()[:1000]}
        else:
            task.pop("statusReason", None)
        return fhir.update_in(tx, task)


def tasks_for_referral(tx: Tx, sr_id: str) -> list[StoredResource]:
    """The referral Tasks whose focus is ``ServiceRequest/<sr_id>``."""
    query = SearchQuery(
        "Task",
        criteria=(Criterion("focus", "reference", "", (("ServiceRequest", sr_id),), ""),),
        count=50,
    )
    rows = tx.matches(query)
    return [r for r in rows if is_referral_task(r.json()) and not r.deleted]


def keep_workflow_state(current: dict[str, Any], mapped: dict[str, Any]) -> dict[str, Any]:
    """A re-sent referral must not reset its Task's workflow: status, businessStatus,
    statusReason and output belong to the workflow, not to the artifact."""
    merged = dict(mapped)
    for key in ("status", "businessStatus", "statusReason", "output"):
        if key in current:
            merged[key] = current[key]
        else:
            merged.pop(key, None)
    return merged


def stored_json(stored: StoredResource) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(stored.content)
    return loaded
