"""What the pages say to people about a referral's state, a safety Flag's urgency and an intake
step: the words a referring physician or a nurse acts on, as data.

Owns: the sentences, and the words for each Flag priority in the safety inbox. Codes come from
the program's own CodeSystems (kat-referral-status, kat-safety, kat-intake,
mappings/terminology) and flag-priority-code; a code missing here is shown with its CodeSystem
display, and a Flag without a priority first (unknown means review). Must not: read data, or
decide anything clinical — which priority a Flag has is the safety rules' (safety.yaml).
"""

from __future__ import annotations

from typing import Any

#: Task.businessStatus (kat-referral-status) -> what happens next, for the referring physician.
#: The intake steps are the paper's three (DOMAIN.md, "Referral and intake").
NEXT_STEP: dict[str, str] = {
    "received": "The program checks the referral against its criteria.",
    "eligible": "A registered psychiatric nurse contacts the patient for the intake interview.",
    "needs-review": "A program clinician reviews the referral before the intake goes on; "
    "the program may contact you for details.",
    "ineligible": "Not accepted: the reason is on the referral's page. You may refer again "
    "when things change.",
    "nurse-intake-cleared": "Nurse intake done. Next: the team psychiatrist's clearance and "
    "the contraindication check.",
    "psychiatrist-cleared": "Psychiatrist clearance given. The remaining intake steps follow.",
    "contraindications-cleared": "Contraindication check done. The remaining intake steps follow.",
    "intake-complete": "Accepted: the patient is booked into a cohort and its KaT sessions.",
    "intake-override": "Accepted by the program: the patient is booked into a cohort and its "
    "KaT sessions.",
    "intake-declined": "Declined at intake: the reason is on the referral's page.",
    "participating": "The patient is in the program (12 weeks). You receive a feedback "
    "document at the end.",
    "program-completed": "Program completed: the feedback document opens here when the "
    "patient's consent to share it with your clinic is on record.",
    "withdrawn": "The patient withdrew from the program. Nothing further is needed from you.",
    "discontinued": "The program was not completed: the feedback document says why, when the "
    "patient's consent to share it with your clinic is on record.",
}
#: Task.status that says more than its business status.
NEXT_FOR_STATUS: dict[str, str] = {
    "on-hold": "On hold: a program clinician reviews the referral before the intake goes on.",
    "cancelled": "Cancelled. Nothing further is needed from you.",
}

#: What the safety inbox calls each Flag priority (flag-priority-code), in its order. Which
#: priority a Flag has is not decided here: the safety rules give it (mappings/program/safety.yaml
#: ``flag_priority``) and the Flag carries it (extension flag-priority). A Flag without one
#: (raised before priorities were recorded) is shown first: unknown means review.
PRIORITY_WORDS: dict[str, dict[str, str]] = {
    "PH": {"key": "now", "label": "Act now", "rank": "0"},
    "PM": {"key": "today", "label": "Today", "rank": "1"},
    "PL": {"key": "low", "label": "Low priority", "rank": "2"},
    "PN": {"key": "info", "label": "For information", "rank": "3"},
}
UNKNOWN_PRIORITY = {"key": "now", "label": "Act now (priority not recorded)", "rank": "0"}

#: What a nurse does on the spot when a questionnaire raises a Flag (kat-safety code).
ACT_ON: dict[str, str] = {
    "phq9-item9-positive": "The participant reported thoughts of being better off dead or of "
    "self-harm. Do not leave them alone: assess suicide risk now, following the program's "
    "safety plan, and tell the clinician on duty.",
    "phq9-item9-unanswered": "The question about thoughts of self-harm was left unanswered, and "
    "the other answers show at least moderate depression. Ask the participant about it now and "
    "tell the clinician on duty.",
    "phq9-rise": "The depression score rose markedly since the last response. Tell the "
    "clinician on duty today.",
    "pcl5-rise": "The PTSD score rose markedly since the last response. Tell the clinician on "
    "duty today.",
}
DEFAULT_ACT_ON = "A safety flag was raised for the care team: tell the clinician on duty."


def priority_words() -> dict[str, Any]:
    """The pages' words for Flag priorities (by flag-priority code) and for a Flag without one."""
    return {"codes": PRIORITY_WORDS, "unknown": UNKNOWN_PRIORITY}
