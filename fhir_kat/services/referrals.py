"""The referral workflow (HL7 BSeR / Gravity pattern): Task status changes only along the
program's state machine (``mappings/workflow/referral-task.yaml``).

Owns: the write rule that guards referral Tasks (code ``fulfill``). Must not: parse HTTP.
"""

from __future__ import annotations

from typing import Any

from fhir_kat.errors import Conflict, Unprocessable, issue
from fhir_kat.store import StoredResource, Tx
from fhir_kat.workflow.states import allowed, machine, needs_reason

TASK_CODES = "http://hl7.org/fhir/CodeSystem/task-code"


def is_referral_task(resource: dict[str, Any]) -> bool:
    if resource.get("resourceType") != "Task":
        return False
    return any(
        c.get("system") == TASK_CODES and c.get("code") == "fulfill"
        for c in resource.get("code", {}).get("coding", [])
    )


def task_transition_rule(tx: Tx, body: dict[str, Any], current: StoredResource | None) -> None:
    """Refuse a referral Task status change the state machine does not allow (409), and a
    rejection, cancellation, failure or hold without a reason (422)."""
    if not is_referral_task(body):
        return
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
