"""The referral workflow (HL7 BSeR / Gravity pattern): triage, intake steps, state machine.

Owns: the write rule that guards referral Tasks (code ``fulfill``) to the state machine of
``mappings/workflow/referral-task.yaml``; the write hooks that (1) give a referral
ServiceRequest its Task when the referrer sent none, (2) triage a new referral from its coded
data (``mappings/workflow/eligibility.yaml``) at the end of its transaction, (3) move the Task
as intake steps are recorded, and (4) mark it in progress at the participant's first KaT
session. Must not: parse HTTP. Every change goes through ``FhirService.update_in``, so the
same rules, audit and outbox apply.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from fhir_kat.errors import BadRequest, Conflict, Forbidden, NotFound, Unprocessable, issue
from fhir_kat.search import Criterion, SearchQuery, split_reference
from fhir_kat.services.access import Access
from fhir_kat.services.fhir_rest import FhirService, WriteResult, caller_of, require_access
from fhir_kat.store import StoredResource, Tx
from fhir_kat.workflow.shapes import (
    INTAKE,
    TASK_CODES,
    is_intake_step,
    is_program_referral,
    is_referral_task,
)
from fhir_kat.workflow.states import (
    allowed,
    business_status,
    machine,
    needs_reason,
    referrer_may_set,
)
from fhir_kat.workflow.triage import Coding, ReferralFacts, triage

#: Referral facts (kat-intake codes) -> the flag names eligibility.yaml reads.
FACT_FLAGS = {
    "prior-treatment-failure": "prior_treatment_failure",
    "extreme-emotional-lability": "extreme_emotional_lability",
    "recent-mood-medication-change": "recent_mood_medication_change",
    "uncontrolled-hypertension": "uncontrolled",
    "aneurysm": "aneurysm",
}
STEP_CLEARED = {
    "nurse-intake": "nurse-intake-cleared",
    "psychiatrist-clearance": "psychiatrist-cleared",
    "contraindication-check": "contraindications-cleared",
}
NAMESPACE = uuid.UUID("6f1d3c52-7a0e-5b8e-9d4e-6b6174000001")  # the mapping engine's


#: A referral Task's elements that belong to the workflow (program staff and the service).
WORKFLOW_ELEMENTS = ("status", "businessStatus", "statusReason", "output", "owner")


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
    def __init__(self, fhir: FhirService) -> None:
        self.fhir = fhir

    def on_write(self, tx: Tx, stored: StoredResource, created: bool) -> None:
        if stored.deleted:
            return
        if stored.type == "ServiceRequest" and created:
            resource = stored.json()
            if is_program_referral(resource):
                tx.defer(f"referral-task:{stored.id}", lambda t: self._ensure_task(t, stored.id))
        elif stored.type == "Task" and created:
            resource = stored.json()
            if is_referral_task(resource) and resource.get("status") == "requested":
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

    def facts(self, tx: Tx, sr: dict[str, Any]) -> ReferralFacts:
        conditions: list[Coding] = []
        uncoded = 0
        allergies: list[Coding] = []
        flags: dict[str, bool | None] = {}
        refs = [
            r.get("reference", "")
            for r in sr.get("reasonReference", []) + sr.get("supportingInfo", [])
        ]
        targets = [split_reference(ref) for ref in refs]
        tx.preload([t for t in targets if t])  # one query for all of them
        for target in targets:
            found = tx.get(*target) if target else None
            if found is None or found.deleted:
                continue
            res = found.json()
            codings = [
                Coding(c.get("system", ""), c.get("code", ""))
                for c in res.get("code", {}).get("coding", [])
            ]
            if res["resourceType"] == "Condition":
                if codings:
                    conditions += codings
                else:
                    uncoded += 1
            elif res["resourceType"] == "AllergyIntolerance":
                allergies += codings
            elif res["resourceType"] == "Observation":
                for c in codings:
                    if c.system == INTAKE and c.code in FACT_FLAGS:
                        flags[FACT_FLAGS[c.code]] = res.get("valueBoolean")
        for concept in sr.get("reasonCode", []):
            coded = [
                Coding(c.get("system", ""), c.get("code", "")) for c in concept.get("coding", [])
            ]
            conditions += coded
        return ReferralFacts(tuple(conditions), uncoded, tuple(allergies), flags)

    def _triage(self, tx: Tx, task_id: str) -> None:
        stored = tx.get("Task", task_id)
        if stored is None or stored.deleted:
            return
        task = stored.json()
        if task.get("status") != "requested":
            return
        focus = split_reference(task.get("focus", {}).get("reference", ""))
        sr = tx.get(*focus) if focus else None
        if sr is None:
            return
        decision = triage(self.facts(tx, sr.json()))
        updated = dict(
            task, status=decision.outcome, businessStatus=business_status(decision.business_status)
        )
        if decision.findings:
            reasons = "; ".join(f.text for f in decision.findings)
            label = {
                "rejected": "Not eligible",
                "on-hold": "Needs clinician review",
                "accepted": "Eligible",
            }[decision.outcome]
            updated["statusReason"] = {"text": f"{label}: {reasons}"[:1000]}
        else:
            updated.pop("statusReason", None)
        updated.pop("meta", None)
        self.fhir.update_in(tx, updated)

    # ------------------------------------------------------------------ intake and sessions

    def _intake_step(self, tx: Tx, obs: dict[str, Any]) -> None:
        steps = [
            c.get("code")
            for c in obs.get("code", {}).get("coding", [])
            if c.get("system") == INTAKE and c.get("code") in STEP_CLEARED
        ]
        if not steps:
            return
        decisions = [
            c.get("code")
            for c in obs.get("valueCodeableConcept", {}).get("coding", [])
            if c.get("system") == INTAKE
        ]
        for focus in obs.get("focus", []):
            target = split_reference(focus.get("reference", ""))
            if target is None or target[0] != "Task":
                continue
            stored = tx.get(*target)
            if stored is None or stored.deleted:
                continue
            task = stored.json()
            task.pop("meta", None)
            step = steps[0]
            if "declined" in decisions:
                new = dict(
                    task,
                    status="rejected",
                    businessStatus=business_status("intake-declined"),
                    statusReason={"text": f"Declined at intake step {step}"},
                )
            elif "needs-review" in decisions:
                new = dict(
                    task,
                    status="on-hold",
                    businessStatus=business_status("needs-review"),
                    statusReason={"text": f"Needs clinician review after {step}"},
                )
            else:
                status = (
                    "accepted" if task.get("status") in ("requested", "on-hold") else task["status"]
                )
                new = dict(task, status=status, businessStatus=business_status(STEP_CLEARED[step]))
                if status == "accepted":
                    new.pop("statusReason", None)
            if new != task and allowed(task.get("status", ""), new["status"]):
                self.fhir.update_in(tx, new)

    def _first_session(self, tx: Tx, ma: dict[str, Any]) -> None:
        subject = split_reference(ma.get("subject", {}).get("reference", ""))
        if subject is None:
            return
        for stored in self._tasks_for(tx, "patient", subject):
            task = stored.json()
            if task.get("status") == "accepted":
                task.pop("meta", None)
                self.fhir.update_in(
                    tx,
                    dict(
                        task, status="in-progress", businessStatus=business_status("participating")
                    ),
                )


def end_referral(
    fhir: FhirService, task_id: str, outcome: Any, reason: Any, access: Access | None
) -> WriteResult:
    """Program end by hand: the referral Task becomes ``completed``, ``cancelled`` or
    ``failed`` with the businessStatus of ``referral-task.yaml`` (``program_end``) and the
    reason as ``statusReason``; the state machine still decides (409 / 422), and the same write
    hooks push the change to the referrer and write the feedback document."""
    ends: dict[str, str] = machine()["program_end"]
    problems = []
    if outcome not in ends:
        problems.append(issue("value", f"outcome must be one of {', '.join(ends)}", "outcome"))
    if reason is not None and (not isinstance(reason, str) or not reason.strip()):
        problems.append(issue("value", "reason must be a non-empty string", "reason"))
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
