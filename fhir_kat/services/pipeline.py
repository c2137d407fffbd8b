"""The write pipeline, top to bottom: what happens, in order, when any path stores a resource.

Every version the service stores — a REST create/update, a transaction or batch entry, a native
artifact, a FHIR message, an HL7 v2 referral, a hook's own derived write — passes
``FhirService._put``, which runs this pipeline inside the write's own database transaction:

1. **Checks** (``CHECKS``), in order, before the version is stored. A check may refuse the
   write (a FHIR error: 403/409/422); it never stores anything, and it changes the incoming
   resource only where its row says so (an accepted Subscription becomes active; a referral
   form's response is about the referral's Patient; our profiles are declared).
2. **The store**: a generated narrative where the service owns it (R4 dom-6:
   ``FhirService._put``), the version and its index rows — none for an identical update
   (ADR 0020); the caller's write policy (``Access.after_write``).
3. **Steps** (``STEPS``), in order, after the version is stored, as the service
   (``tx.system``). A step may store only the resource types its row names (each such write
   passes this whole pipeline again) and queue outbox rows; work it defers (``tx.defer``)
   runs before the commit under the same limits. One step writes as the caller instead: the
   referral a ``kat-referral`` response answers is the sender's referral, written with the
   sender's rights exactly as the native route writes it (``ArtifactService.on_referral_form``;
   its check, run as the caller, prepared it).

Deletes pass the delete checks (``DELETE_CHECKS``) and then the same steps.

Nothing here is decided by the order services happen to be constructed in ``create_app``: the
app factory builds the services (``build_services``) and installs this pipeline, nothing more.
Under ``pipeline_strict`` (the test suite sets it) a step that stores a type its row does not
name, or a check that changes a resource it may not, fails the request loudly; in production
the same finding is logged (without PHI) and the write goes on — clinical data is never lost
to a bookkeeping rule.
"""

from __future__ import annotations

import contextvars
import copy
import logging
import textwrap
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fhir_kat.clinical.protocol import ProgramProtocol
from fhir_kat.clinical.safety import SafetyRules
from fhir_kat.exchange import PartnerConfig
from fhir_kat.exchange.netguard import EndpointPolicy
from fhir_kat.exchange.terminology import TerminologyServer
from fhir_kat.instruments.definitions import Catalogue
from fhir_kat.mapping.functions import all_questionnaires
from fhir_kat.security.cds_clients import CdsHooksConfig
from fhir_kat.security.clients import ClientRegistry
from fhir_kat.security.consent import ConsentDecisionPoint
from fhir_kat.services.artifacts import ArtifactService, referral_types
from fhir_kat.services.cds_hooks import CdsHooksService
from fhir_kat.services.conformance import profile_rule
from fhir_kat.services.delivery import PartnerCopies, requeue_on_consent
from fhir_kat.services.feedback import ReferrerFeedback
from fhir_kat.services.fhir_rest import DeleteRule, FhirService, WriteHook, WriteRule
from fhir_kat.services.instruments import InstrumentService
from fhir_kat.services.messaging import MessagingService
from fhir_kat.services.outcomes import OutcomeService
from fhir_kat.services.referrals import (
    ReferralWorkflow,
    referrer_request_rule,
    session_booking_rule,
    task_transition_rule,
)
from fhir_kat.services.safety import SafetyService
from fhir_kat.services.subscriptions import SubscriptionService
from fhir_kat.services.v2_referrals import V2ReferralService, V2Sender
from fhir_kat.store import Store
from fhir_kat.workflow.triage import TriageSettings

log = logging.getLogger("fhir_kat.pipeline")


@dataclass(frozen=True)
class Check:
    """A rule run before a version is stored: it refuses (raises a FHIR error) or passes."""

    name: str
    #: What it refuses, in a line.
    refuses: str
    rule: WriteRule
    #: What it may change in the incoming resource ("" = nothing).
    changes: str = ""


@dataclass(frozen=True)
class DeleteCheck:
    name: str
    refuses: str
    rule: DeleteRule


@dataclass(frozen=True)
class Step:
    """Work run after a version is stored, in the same transaction, as the service."""

    name: str
    #: What it does, in a line.
    does: str
    hook: WriteHook
    #: The resource types it may store (each such write passes the whole pipeline again).
    stores: frozenset[str] = frozenset()
    #: What it may queue in the outbox ("" = nothing).
    queues: str = ""


@dataclass(frozen=True)
class Services:
    """The domain services, typed: what the HTTP layer, the CLI and the workers use."""

    fhir: FhirService
    outcomes: OutcomeService
    workflow: ReferralWorkflow
    feedback: ReferrerFeedback
    safety: SafetyService
    instruments: InstrumentService
    artifacts: ArtifactService
    subscriptions: SubscriptionService
    messaging: MessagingService
    v2: V2ReferralService
    #: CDS Hooks cards, from the referral workflow's own triage (ADR 0019).
    cds_hooks: CdsHooksService
    #: What each partner was sent, so later versions follow (docs/exchange.md).
    copies: PartnerCopies


@dataclass(frozen=True)
class WritePipeline:
    checks: tuple[Check, ...]
    steps: tuple[Step, ...]
    delete_checks: tuple[DeleteCheck, ...]

    def describe(self) -> str:
        """The pipeline as text, in order (README.md, "The write pipeline")."""
        lines = ["Before a version is stored (a check refuses or passes):"]
        for n, c in enumerate(self.checks, 1):
            lines += _item(f"{n}. {c.name}: refuses {c.refuses}")
            if c.changes:
                lines += _item(f"changes: {c.changes}", indent=5)
        lines.append("Before a resource is deleted:")
        for n, d in enumerate(self.delete_checks, 1):
            lines += _item(f"{n}. {d.name}: refuses {d.refuses}")
        lines.append("After a version is stored (same transaction, as the service):")
        for n, s in enumerate(self.steps, 1):
            lines += _item(f"{n}. {s.name}: {s.does}")
            stores = ", ".join(sorted(s.stores)) or "nothing"
            lines += _item(f"stores: {stores}" + (f"; queues: {s.queues}" if s.queues else ""), 5)
        return "\n".join(lines)


def _item(text: str, indent: int = 2) -> list[str]:
    return textwrap.wrap(
        text,
        width=96,
        initial_indent=" " * indent,
        subsequent_indent=" " * (indent + 3),
        break_on_hyphens=False,
    )


def write_pipeline(s: Services) -> WritePipeline:
    """The pipeline, in the order it runs. Read this to know what a write sets off."""
    return WritePipeline(
        checks=(
            Check(
                "referral Task transitions",
                "a referral Task status change the state machine does not allow "
                "(mappings/workflow/referral-task.yaml), a hold or rejection without a reason, "
                "a referrer moving a Task other than withdrawing it",
                task_transition_rule,
            ),
            Check(
                "intake gate",
                "a referral Task reaching a dosing status before intake is complete with every "
                "hold cleared, unless staff override it with a reason",
                s.workflow.acceptance_rule,
            ),
            Check(
                "referrer requests",
                "a referrer's ServiceRequest that is not a program referral (code, intent)",
                referrer_request_rule,
            ),
            Check(
                "KaT session bookings",
                "an Appointment booking a KaT session without one Patient, its session number, "
                "or a start and end (R4 app-3)",
                session_booking_rule,
            ),
            Check(
                "feedback attestation",
                "a final feedback document without an attesting clinician or the plan section",
                s.feedback.check_rule,
            ),
            Check(
                "clinical plausibility",
                "entry errors the safety rules catch (diastolic above systolic, ...)",
                s.safety.check_rule,
            ),
            Check(
                "instrument responses",
                "a response to a program Questionnaire that does not fit it (items, answers, "
                "calculated totals) and a total score Observation that contradicts its items",
                s.instruments.check_rule,
            ),
            Check(
                "referral form",
                "a completed or amended response to Questionnaire/kat-referral that is not a "
                "referral the caller may send, exactly as POST /api/v1/referrals refuses it "
                "(answers, own organisation, each mapped resource)",
                s.artifacts.referral_form_rule,
                changes="QuestionnaireResponse.subject → the referral's Patient",
            ),
            Check(
                "subscriptions",
                "a Subscription with a bad criteria, channel or endpoint, or not the caller's",
                s.subscriptions.check_rule,
                changes="Subscription.status requested → active",
            ),
            Check(
                "profiles",
                "a resource declaring one of the program's profiles that breaks it, or a profile "
                "of ours that does not exist (ADR 0022)",
                profile_rule,
                changes="meta.profile: the service's own writes declare their profile",
            ),
        ),
        delete_checks=(
            DeleteCheck(
                "safety Flags are kept",
                "deleting a safety Flag (it is resolved or marked entered-in-error)",
                s.safety.delete_rule,
            ),
        ),
        steps=(
            Step(
                "referral workflow",
                "a program referral gets its Task; a new referral Task is triaged; an intake "
                "step moves its Task; the first dosing session starts it",
                s.workflow.on_write,
                stores=frozenset({"Task"}),
            ),
            Step(
                "scoring and extraction",
                "a response to a program instrument is scored; its score Observations and their "
                "Provenance are stored; its safety items raise Flags",
                s.instruments.on_write,
                stores=frozenset({"Observation", "Provenance", "Flag"}),
                queues="the safety Flag's care-team delivery",
            ),
            Step(
                "referral form",
                "a completed or amended response to Questionnaire/kat-referral becomes the "
                "referral the native route stores, as its sender, its Provenance naming the "
                "response; a re-sent response updates the same referral",
                s.artifacts.on_referral_form,
                stores=referral_types(),
                queues="the referral for the partners receiving referrals",
            ),
            Step(
                "safety signals",
                "vital signs, weight, dose and adverse events are checked against the safety "
                "rules (mappings/program/safety.yaml); a signal raises a Flag",
                s.safety.on_write,
                stores=frozenset({"Flag"}),
                queues="the safety Flag's care-team delivery",
            ),
            Step(
                "referrer feedback",
                "an ended referral gets its draft feedback document, a draft follows new data, "
                "an attested document is linked from the Task",
                s.feedback.on_write,
                stores=frozenset({"Composition", "Task"}),
                queues="referral-status pushes to the referrer's endpoint",
            ),
            Step(
                "subscriptions",
                "active Subscriptions whose criteria match are notified",
                s.subscriptions.on_write,
                queues="rest-hook notifications",
            ),
            Step(
                "consent re-queue",
                "a Consent releases the patient's deliveries that waited for consent",
                requeue_on_consent,
                queues="releases consent-blocked deliveries",
            ),
            Step(
                "partner copies",
                "a later version of a resource a partner was sent (a Task status change, a "
                "resolved Flag, a correction) is queued for it at the end of the transaction, "
                "so its copy converges to the record (docs/exchange.md)",
                s.copies.on_write,
                queues="later versions for the partners sent earlier ones",
            ),
        ),
    )


def build_services(
    store: Store,
    *,
    clock: Callable[[], datetime],
    default_page_size: int,
    max_page_size: int,
    catalogue: Catalogue,
    min_cell_size: int,
    triage: TriageSettings,
    protocol: ProgramProtocol,
    safety_rules: SafetyRules,
    partners: Mapping[str, PartnerConfig],
    clients: ClientRegistry,
    consent: ConsentDecisionPoint,
    endpoint_policy: EndpointPolicy,
    id_namespace: uuid.UUID,
    v2_senders: Mapping[str, V2Sender],
    mllp_processing_ids: tuple[str, ...],
    cds_hooks: CdsHooksConfig,
) -> Services:
    """Construct the services; no service depends on construction order for what it does."""
    fhir = FhirService(store, default_page_size=default_page_size, max_page_size=max_page_size)
    outcomes = OutcomeService(store, catalogue, clock, min_cell_size)
    workflow = ReferralWorkflow(
        fhir,
        clock=clock,
        minimum_age=triage.minimum_age,
        oracle=TerminologyServer(triage.terminology_server) if triage.terminology_server else None,
    )
    feedback = ReferrerFeedback(
        fhir, dict(partners), consent, catalogue, clock, timelines=outcomes.timelines
    )
    safety = SafetyService(fhir, safety_rules, protocol, dict(partners), clock, id_namespace)
    instruments = InstrumentService(
        fhir, outcomes.catalogue, all_questionnaires(), clock, raise_signal=safety.raise_signal
    )
    artifacts = ArtifactService(fhir, protocol, clock, dict(partners), id_namespace)
    return Services(
        fhir=fhir,
        outcomes=outcomes,
        workflow=workflow,
        feedback=feedback,
        safety=safety,
        instruments=instruments,
        artifacts=artifacts,
        subscriptions=SubscriptionService(consent, clock, clients, endpoint_policy),
        messaging=MessagingService(fhir, clock, id_namespace),
        v2=V2ReferralService(
            artifacts, clients, consent, v2_senders, clock, processing_ids=mllp_processing_ids
        ),
        cds_hooks=CdsHooksService(workflow, outcomes.catalogue, cds_hooks, clock),
        copies=PartnerCopies(partners),
    )


# ------------------------------------------------------------------ installing and guarding

#: The step whose work is running (deferred work keeps the step that deferred it: Tx.defer
#: runs an action in the context it was deferred in).
_STEP: contextvars.ContextVar[Step | None] = contextvars.ContextVar("kat_step", default=None)


class PipelineViolation(AssertionError):
    """A step stored a type its row does not name, or a check changed what it may not."""


def install(fhir: FhirService, pipeline: WritePipeline, *, strict: bool) -> None:
    """Make ``pipeline`` the one ``fhir`` runs (replacing whatever was there)."""

    def report(message: str) -> None:
        if strict:
            raise PipelineViolation(message)
        log.error("write pipeline: %s", message)

    def guarded_check(check: Check) -> WriteRule:
        if not strict or check.changes:
            return check.rule

        def run(tx: Any, body: dict[str, Any], current: Any) -> None:
            before = copy.deepcopy(body)
            check.rule(tx, body, current)
            if body != before:
                report(f"check {check.name!r} changed the {body.get('resourceType')} it checked")

        return run

    def guarded_step(step: Step) -> WriteHook:
        def run(tx: Any, stored: Any, created: bool) -> None:
            token = _STEP.set(step)
            try:
                step.hook(tx, stored, created)
            finally:
                _STEP.reset(token)

        return run

    def guard(body: dict[str, Any]) -> None:
        step = _STEP.get()
        rtype = body.get("resourceType")
        if step is not None and rtype not in step.stores:
            report(f"step {step.name!r} stored {rtype}, which its row does not name")

    fhir.write_rules = [guarded_check(c) for c in pipeline.checks]
    fhir.delete_rules = [d.rule for d in pipeline.delete_checks]
    fhir.write_hooks = [guarded_step(s) for s in pipeline.steps]
    fhir.write_guard = guard


__all__ = [
    "Check",
    "DeleteCheck",
    "PipelineViolation",
    "Services",
    "Step",
    "WritePipeline",
    "build_services",
    "install",
    "write_pipeline",
]
